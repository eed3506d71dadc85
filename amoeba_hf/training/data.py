"""Fine-tuning data: Alpaca-style instructions with response-only labels, or plain text packed into blocks."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from datasets import Dataset, load_dataset
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
TEMPLATES = ("auto", "chat", "alpaca")
INSTRUCTION_FIELDS = ("instruction", "output")
TEXT_FIELDS = ("text",)


def _check_json(text: str, path: Path, label: str) -> None:
    """Parse JSON or JSON Lines with the standard library first: its error names the line, the `datasets` one does not."""
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as error:
        whole_file_error = error
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) <= 1:
        raise ValueError(f"{label} {path} is not valid JSON: {whole_file_error}")
    for number, line in lines:
        try:
            json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{label} {path} is neither JSON nor JSON Lines: line {number}: {error}") from None


@contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Reading a file is quick; its progress bar would only sit between the user and a one-line error."""
    already_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not already_disabled:
            enable_progress_bars()


def load_records(path: str | Path, fields: tuple[str, ...], label: str = "training data") -> Dataset:
    """The records of a `.txt` (one per line) or JSON/JSONL file, which must have `fields`; one-line errors that
    name the file as `label`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"{label} {path} is empty")
    builder = "text" if path.suffix == ".txt" else "json"
    if builder == "json":
        _check_json(text, path, label)
    try:
        with _without_progress_bars():
            dataset = load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:
        raise ValueError(f"cannot read {label} {path} as {builder}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"{label} {path} is empty")
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise ValueError(f"{label} {path} lacks field(s) {missing}; it has {dataset.column_names}")
    for field in fields:
        check_text_column(dataset, field, path, label)
    return dataset


def check_text_column(dataset: Dataset, field: str, path: str | Path, label: str) -> None:
    """Every value of `field` is a string or missing (null): a number or a list there is a malformed file."""
    for number, value in enumerate(dataset[field], 1):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{label} {path}: record {number} has `{field}` {value!r}; it must be a string")


def load_instructions(path: str | Path) -> Dataset:
    """Alpaca records with `instruction` and `output` strings, at least one answer non-empty (labels sit on the
    answers only: with every answer empty the model would learn nothing but to stop)."""
    dataset = load_records(path, INSTRUCTION_FIELDS)
    if "input" in dataset.column_names:
        check_text_column(dataset, "input", path, "training data")
    if not any(output and output.strip() for output in dataset["output"]):
        raise ValueError(f"training data {path}: every `output` (answer) is empty; there is nothing to learn from")
    return dataset


def instruction_prompt(tokenizer: PreTrainedTokenizerBase, instruction: str, context: str, template: str) -> str:
    """The prompt text before the response: the tokenizer's chat template, or the Alpaca template."""
    if template == "auto":
        template = "chat" if tokenizer.chat_template else "alpaca"
    if template == "chat":
        user = instruction if not context else f"{instruction}\n\n{context}"
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    if template == "alpaca":
        return ALPACA_TEMPLATE.format(
            with_input=", paired with an input that provides further context" if context else "",
            instruction=instruction,
            input_block=f"### Input:\n{context}\n\n" if context else "",
        )
    raise ValueError(f"unknown prompt template {template!r}; choose from {TEMPLATES}")


def instruction_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    max_response_tokens: int,
    template: str = "auto",
) -> Dataset:
    """Alpaca JSON/JSONL (`instruction`, optional `input`, `output`) tokenised with labels on the response only.

    The lengths have no defaults here: `FinetuneSettings` holds them (one source for the CLI and Python).

    Prompts keep their last `max_prompt_tokens` tokens (the instruction's end and the response header matter
    most); responses keep their first `max_response_tokens` tokens and end with EOS when it fits.
    """
    dataset = load_instructions(path)

    def encode(record: dict) -> dict:
        prompt = instruction_prompt(tokenizer, record["instruction"], record.get("input") or "", template)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        response_ids = response_ids[:max_response_tokens]
        return {
            "input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        }

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising instructions")


def text_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, block_size: int = 256) -> Dataset:
    """Plain text (`.txt` lines or JSON `text`) joined with EOS and packed into full blocks, labels = inputs."""
    dataset = load_records(path, TEXT_FIELDS)
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(t for t in dataset["text"] if t and t.strip()), add_special_tokens=False)["input_ids"]
    blocks = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"training data {path} has {len(ids)} tokens, fewer than one block of {block_size}")
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})
