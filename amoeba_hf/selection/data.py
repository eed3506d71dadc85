"""Calibration inputs: token blocks from raw text, or multiple-choice prompts with a known answer letter.

"N samples" means N blocks of exactly `seq_len` tokens (or N prompts): too little data is an error, never a
silent shortfall.
"""

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..training.data import check_text_column, load_records

ANSWER_LETTERS = ("A", "B", "C", "D")


@dataclass
class MultipleChoiceBatch:
    """Prompts right-padded to one length; the answer is read at `last_index` among the letter tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    letter_ids: torch.Tensor
    answers: torch.Tensor


def _record_text(record: dict) -> str:
    """A record's text: its `text` field, or an Alpaca record's instruction, input and output joined."""
    if "text" in record:
        return record["text"]
    return "\n\n".join(part for part in (record["instruction"], record.get("input"), record["output"]) if part)


def text_blocks(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`num_samples` blocks of `seq_len` tokens from documents (`.txt`: one per line; JSON/JSONL: `text`, or
    Alpaca `instruction`/`input`/`output`).

    Documents are shuffled with `seed`, joined with the EOS token and cut into consecutive blocks.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    dataset = load_records(path, (), "calibration file")
    columns = dataset.column_names
    if "text" not in columns and not {"instruction", "output"} <= set(columns):
        raise ValueError(
            f"calibration file {path} lacks field(s) ['text'] (or Alpaca 'instruction'/'output'); it has {columns}"
        )
    for field in sorted({"text", "instruction", "input", "output"} & set(columns)):
        check_text_column(dataset, field, path, "calibration file")
    documents = [text for text in (_record_text(r) for r in dataset) if text and text.strip()]
    if not documents:
        raise ValueError(f"calibration file {path} has no non-empty text")
    random.Random(seed).shuffle(documents)
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(documents), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    needed = num_samples * seq_len
    if ids.numel() < needed:
        raise ValueError(
            f"calibration file {path} has {ids.numel():,} tokens, but {num_samples} samples of {seq_len} tokens "
            f"need {needed:,}: lower --samples/--seq-len or add text"
        )
    return ids[:needed].view(num_samples, seq_len).clone()


def multiple_choice_prompts(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, seed: int = 0
) -> MultipleChoiceBatch:
    """`num_samples` MMLU-style prompts (`input` ending in "Answer:", `output` a letter A-D), seeded selection."""
    records = load_records(path, ("input", "output"), "calibration file").to_list()
    bad = [r["output"] for r in records if str(r["output"]).strip() not in ANSWER_LETTERS]
    if bad:
        raise ValueError(f"{path}: every `output` must be one of {ANSWER_LETTERS}, found {bad[0]!r}")
    if len(records) < num_samples:
        raise ValueError(f"{path} has {len(records)} prompts, fewer than the {num_samples} samples requested")
    chosen = random.Random(seed).sample(records, num_samples)
    encoded = [tokenizer(r["input"], add_special_tokens=False)["input_ids"] for r in chosen]
    length = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((num_samples, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    letter_ids = torch.tensor([tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in ANSWER_LETTERS])
    answers = torch.tensor([ANSWER_LETTERS.index(str(r["output"]).strip()) for r in chosen])
    return MultipleChoiceBatch(input_ids, attention_mask, attention_mask.sum(1) - 1, letter_ids, answers)
