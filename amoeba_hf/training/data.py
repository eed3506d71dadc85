"""Fine-tuning data: Alpaca-style instructions with response-only labels, or plain text packed into blocks.

Reading and tokenising data lives here for every stage (training, calibration, evaluation), so all read a source
the same way: a local file, or a Hub dataset given as `name[:config][@split]`. Each document is tokenised on its
own with the tokenizer's default special tokens (Llama's tokenizers add a BOS, SmolLM2's adds none), and documents
are joined with the EOS id, so no token spans two documents.
"""

import json
import random
import re
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from datasets import Dataset, IterableDataset, get_dataset_config_names, get_dataset_split_names, load_dataset
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
TEMPLATES = ("auto", "chat", "alpaca")
INSTRUCTION_FIELDS = ("instruction", "output")
# The column names each field is detected under, first found first; a setting names any other column.
FIELD_NAMES = {"text": ("text", "content"), "instruction": ("instruction",), "input": ("input",),
               "output": ("output",)}
FILE_SUFFIXES = (".txt", ".json", ".jsonl")
DATASET_SPEC = "name[:config][@split]"
# The one split slice a stream can take without reading the rest: its first N records.
FIRST_RECORDS = re.compile(r"(?P<split>[^\[]+)\[:(?P<count>\d+)\]")
# A stream is shuffled through a buffer of this many records (a full shuffle would read it all).
SHUFFLE_BUFFER = 10_000
# Documents per tokenizer call: batched calls are fast, and a caller that needs few tokens stops early.
ENCODE_BATCH = 256


@dataclass(frozen=True)
class DataFields:
    """The columns holding plain text, or an instruction, its optional input and the answer.

    `None` detects the usual name (`FIELD_NAMES`), so Alpaca-style files and most Hub datasets need no setting.
    """

    text: str | None = None
    instruction: str | None = None
    input: str | None = None
    output: str | None = None


def is_file_source(source: str | Path) -> bool:
    """A local data file (existing, or named like one so that a typo is "does not exist"), not a dataset spec."""
    path = Path(source)
    if path.exists() and not path.is_file() and not path.is_dir():
        # A FIFO would block the reader and /dev/zero never ends: refuse what is not a regular file, and say what it is.
        kinds = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                 stat.S_IFSOCK: "a socket"}
        kind = kinds.get(stat.S_IFMT(path.stat().st_mode), "not a regular file")
        raise ValueError(f"data {source} is {kind}, not a data file; give a .txt, .json or .jsonl file")
    return path.is_file() or path.suffix in FILE_SUFFIXES


def parse_dataset_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`name[:config][@split]` as (name, config, split); a split may slice, as in `train[:1000]`."""
    rest, at, split = spec.rpartition("@")
    if not at:
        rest, split = spec, ""
    name, colon, config = rest.partition(":")
    if not name or (colon and not config) or (at and not split):
        raise ValueError(f"bad dataset {spec!r}: expected {DATASET_SPEC}, e.g. wikitext:wikitext-2-raw-v1@train")
    return name, config or None, split or None


def _check_json(text: str, path: Path, label: str) -> None:
    """Parse JSON or JSON Lines with the standard library first: its error names the line, the `datasets` one does not."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as error:
        whole_file_error = error
    else:
        for number, record in enumerate(whole if isinstance(whole, list) else (), 1):
            if not isinstance(record, dict):
                raise ValueError(f"{label} {path}: record {number} is a JSON {type(record).__name__}, not an object "
                                 "with fields (e.g. {\"text\": ...} or Alpaca's instruction/input/output)")
        return
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) <= 1:
        raise ValueError(f"{label} {path} is not valid JSON: {whole_file_error}")
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{label} {path} is neither JSON nor JSON Lines: line {number}: {error}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{label} {path}: line {number} is a JSON {type(record).__name__}, not an object with "
                             "fields (e.g. {\"text\": ...} or Alpaca's instruction/input/output)")


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


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _load_failure(name: str, config: str | None, split: str, error: Exception) -> str:
    """Why `load_dataset` failed, in one line that lists the valid configs or splits when one of those was wrong."""
    try:
        configs = get_dataset_config_names(name)
    except Exception as lookup_error:
        if Path(name).is_dir():
            return (f"{name} is a folder, not a data file, and holds no data files a dataset loader recognises; give a "
                    ".txt, .json or .jsonl file")
        return f"no such file, and no dataset {name!r} on the Hub or in its cache ({_first_line(lookup_error)})"
    if config is not None and config not in configs:
        return f"no config {config!r}; its configs: {', '.join(configs)} ({DATASET_SPEC})"
    try:
        splits = get_dataset_split_names(name, config)
    except Exception:
        if config is None and len(configs) > 1:
            return f"no config given; its configs: {', '.join(configs)} ({DATASET_SPEC})"
        return _first_line(error)
    if split.partition("[")[0] not in splits:
        return f"no split {split!r}; its splits: {', '.join(splits)} ({DATASET_SPEC})"
    return _first_line(error)


def _load_file(path: Path, label: str) -> Dataset:
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
    return dataset


def column_names(dataset: Dataset | IterableDataset) -> list[str]:
    """A dataset's columns; a stream without declared features shows them in its first record."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset), {}))


def load_records(
    source: str | Path, fields: tuple[str, ...] = (), label: str = "training data", *, split: str = "train",
    streaming: bool = False,
) -> Dataset | IterableDataset:
    """The records of a local file (`.txt`: one per line; JSON/JSONL) or a Hub dataset `name[:config][@split]`,
    which must have `fields`; one-line errors that name the source as `label`.

    `split` is the split used when the spec names none. With `streaming`, a Hub dataset is read as it is consumed
    (for callers that need only its start; a `split[:N]` slice takes its first N records), and its values are then
    not checked here.
    """
    if is_file_source(source):
        dataset = _load_file(Path(source), label)
    else:
        name, config, chosen_split = parse_dataset_spec(str(source))
        split = chosen_split or split
        head = FIRST_RECORDS.fullmatch(split) if streaming else None
        try:
            dataset = load_dataset(name, config, split=head["split"] if head else split, streaming=streaming)
        except Exception as error:
            raise ValueError(f"{label} {source}: {_load_failure(name, config, split, error)}") from error
        if head:
            dataset = dataset.take(int(head["count"]))
    columns = column_names(dataset)
    if not columns or isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"{label} {source} is empty")
    missing = [f for f in fields if f not in columns]
    if missing:
        raise ValueError(f"{label} {source} lacks field(s) {missing}; it has {columns}")
    if isinstance(dataset, Dataset):
        for field in fields:
            check_text_column(dataset, field, source, label)
    return dataset


def check_text_column(dataset: Dataset, field: str, path: str | Path, label: str) -> None:
    """Every value of `field` is a string or missing (null): a number or a list there is a malformed file."""
    for number, value in enumerate(dataset[field], 1):
        _check_text(value, number, field, path, label)


def _check_text(value, number: int, field: str, source: str | Path, label: str) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{label} {source}: record {number} has `{field}` {value!r}; it must be a string")


def resolve_fields(columns: list[str], data_fields: DataFields, source: str | Path, label: str) -> DataFields:
    """The column of each field: the one set (which must exist), else the first usual name present, else None."""
    resolved = {}
    for name, usual in FIELD_NAMES.items():
        chosen = getattr(data_fields, name)
        if chosen is not None and chosen not in columns:
            raise ValueError(f"{label} {source} has no field {chosen!r} (set as its {name} field); it has {columns}")
        resolved[name] = chosen or next((column for column in usual if column in columns), None)
    return DataFields(**resolved)


def load_documents(
    source: str | Path, label: str, data_fields: DataFields = DataFields(), *, split: str = "train",
    streaming: bool = False, seed: int | None = None, instructions_as_text: bool = False,
) -> Iterable[str]:
    """The non-empty documents of a file or Hub dataset: its text field or (`instructions_as_text`) Alpaca records'
    instruction, input and output joined; shuffled with `seed` if given (a stream through a buffer).

    A file or a non-streamed dataset is checked whole before anything is returned, so a bad record fails fast.
    """
    dataset = load_records(source, (), label, split=split, streaming=streaming)
    columns = column_names(dataset)
    found = resolve_fields(columns, data_fields, source, label)
    if found.text is not None:
        parts = [found.text]
    elif instructions_as_text and found.instruction is not None and found.output is not None:
        parts = [column for column in (found.instruction, found.input, found.output) if column is not None]
    else:
        alternatives = [repr(name) for name in FIELD_NAMES["text"][1:]]
        if instructions_as_text:
            alternatives.append("Alpaca 'instruction'/'output'")
        raise ValueError(f"{label} {source} lacks field(s) ['text'] (or {', or '.join(alternatives)}; set the text "
                         f"field to read another); it has {columns}")
    if isinstance(dataset, Dataset):
        for column in parts:
            check_text_column(dataset, column, source, label)
        records = zip(*(dataset[column] for column in parts))
        documents = [d for d in ("\n\n".join(p for p in values if p) for values in records) if d.strip()]
        if not documents:
            raise ValueError(f"{label} {source} has no non-empty text")
        if seed is not None:
            random.Random(seed).shuffle(documents)
        return documents
    if seed is not None:
        dataset = dataset.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
    return _streamed_documents(dataset, parts, source, label)


def _streamed_documents(dataset: IterableDataset, parts: list[str], source: str | Path, label: str) -> Iterator[str]:
    for number, record in enumerate(dataset, 1):
        for column in parts:
            _check_text(record.get(column), number, column, source, label)
        document = "\n\n".join(p for p in map(record.get, parts) if p)
        if document.strip():
            yield document


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token (Llama-2/3 base) its EOS as one, as TRL's SFTTrainer does: batches need
    a pad id, and padding has attention mask 0 and labels -100, so the model never learns from that id there."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    tokenizer.pad_token = tokenizer.eos_token


def _added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id the tokenizer puts before a text by default (Llama's), or None (SmolLM2's adds none)."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("")["input_ids"][:1] == [bos] else None


def _encode_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], bos: int | None) -> list[list[int]]:
    """Texts tokenised with the tokenizer's default special tokens; a text that renders the BOS itself (a chat
    template) keeps one BOS, not two."""
    encoded = tokenizer(texts)["input_ids"]
    return [ids[1:] if bos is not None and ids[:2] == [bos, bos] else ids for ids in encoded]


def encode_document(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One document or prompt, as the model reads it at the start of a sequence: with the tokenizer's BOS (once)."""
    return _encode_batch(tokenizer, [text], _added_bos(tokenizer))[0]


def encode_documents(
    tokenizer: PreTrainedTokenizerBase, documents: Iterable[str], max_tokens: int | None = None
) -> list[int]:
    """Documents tokenised one by one and joined with the EOS id (BOS, if the tokenizer adds one, starts each).

    Tokenising one joined string instead would let a token span two documents. A tokenizer without EOS joins with
    the tokens of a blank line. Reading stops once `max_tokens` are collected.
    """
    bos, eos = _added_bos(tokenizer), tokenizer.eos_token_id
    separator = [eos] if eos is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    documents = iter(documents)
    ids: list[int] = []
    while max_tokens is None or len(ids) < max_tokens:
        batch = list(islice(documents, ENCODE_BATCH))
        if not batch:
            break
        for document in _encode_batch(tokenizer, batch, bos):
            if ids:
                ids.extend(separator)
            ids.extend(document)
    return ids


def load_instructions(source: str | Path, data_fields: DataFields = DataFields()) -> Dataset:
    """Alpaca records with `instruction` and `output` strings (and an optional `input`), whatever their columns are
    named in the source, at least one answer non-empty (labels sit on the answers only: with every answer empty the
    model would learn nothing but to stop)."""
    dataset = load_records(source)
    columns = column_names(dataset)
    found = resolve_fields(columns, data_fields, source, "training data")
    missing = [name for name in INSTRUCTION_FIELDS if getattr(found, name) is None]
    if missing:
        raise ValueError(f"training data {source} lacks field(s) {missing}; it has {columns}")
    renames = {getattr(found, name): name for name in ("instruction", "input", "output") if getattr(found, name)}
    for column in renames:
        check_text_column(dataset, column, source, "training data")
    required = [getattr(found, name) for name in INSTRUCTION_FIELDS]
    for number, values in enumerate(zip(*(dataset[column] for column in required)), 1):
        absent = [column for column, value in zip(required, values) if value is None]
        if absent:
            raise ValueError(
                f"training data {source}: record {number} has no {' and no '.join(f'`{c}`' for c in absent)}; every "
                f"record of an instruction file needs {' and '.join(f'`{c}`' for c in required)} (put plain "
                "`text` records in a file of their own and pass both files to --data)"
            )
    dataset = dataset.select_columns(list(renames)).rename_columns(
        {column: name for column, name in renames.items() if column != name}
    )
    if not any(output and output.strip() for output in dataset["output"]):
        raise ValueError(f"training data {source}: every `output` (answer) is empty; there is nothing to learn from")
    return dataset


def is_instruction_data(source: str | Path, data_fields: DataFields = DataFields()) -> bool:
    """Instruction records rather than plain text: an instruction or output field is set (a text field alone means
    text), else a file mentions `"instruction"` in its head, or a Hub dataset has an instruction column."""
    if data_fields.instruction is not None or data_fields.output is not None:
        return True
    if data_fields.text is not None:
        return False
    if is_file_source(source):
        return Path(source).suffix != ".txt" and '"instruction"' in Path(source).read_text(errors="replace")[:4096]
    found = resolve_fields(column_names(load_records(source)), data_fields, source, "training data")
    return found.instruction is not None


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
    source: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    max_response_tokens: int,
    template: str = "auto",
    data_fields: DataFields = DataFields(),
) -> Dataset:
    """Alpaca records (`instruction`, optional `input`, `output`) tokenised with labels on the response only.

    The lengths have no defaults here: `FinetuneSettings` holds them (one source for the CLI and Python).

    A prompt starts a document, so it gets the tokenizer's BOS; it keeps that BOS and its last tokens, up to
    `max_prompt_tokens` (the instruction's end and the response header matter most). Responses keep their first
    `max_response_tokens` tokens and end with EOS when it fits.
    """
    dataset = load_instructions(source, data_fields)
    bos = _added_bos(tokenizer)

    def encode(record: dict) -> dict:
        prompt = instruction_prompt(tokenizer, record["instruction"], record.get("input") or "", template)
        prompt_ids = _encode_batch(tokenizer, [prompt], bos)[0]
        head = prompt_ids[:1] if bos is not None and prompt_ids[:1] == [bos] else []
        body = prompt_ids[len(head):]
        prompt_ids = head + body[max(0, len(body) - max_prompt_tokens + len(head)):]
        response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
        response_ids = response_ids[:max_response_tokens]
        return {
            "input_ids": prompt_ids + response_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        }

    return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenising instructions")


def text_dataset(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, block_size: int = 256,
    data_fields: DataFields = DataFields(),
) -> Dataset:
    """Plain text (`.txt` lines, or a text field) tokenised document by document, joined with EOS and packed into
    full blocks, labels = inputs."""
    ids = encode_documents(tokenizer, load_documents(source, "training data", data_fields))
    blocks = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
    if not blocks:
        raise ValueError(f"training data {source} has {len(ids)} tokens, fewer than one block of {block_size}")
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})
