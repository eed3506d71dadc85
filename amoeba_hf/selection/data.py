"""Calibration inputs: token blocks from raw text, or multiple-choice prompts with a known answer letter.

"N samples" means N blocks of exactly `seq_len` tokens (or N prompts): too little data is an error, never a
silent shortfall.
"""

import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..training.data import (
    DataFields,
    encode_document,
    encode_documents,
    ensure_pad_token,
    load_documents,
    load_records,
)

ANSWER_LETTERS = ("A", "B", "C", "D")


@dataclass
class MultipleChoiceBatch:
    """Prompts right-padded to one length; the answer is read at `last_index` among the letter tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    letter_ids: torch.Tensor
    answers: torch.Tensor

    def to(self, device: torch.device) -> "MultipleChoiceBatch":
        return MultipleChoiceBatch(*(getattr(self, f.name).to(device) for f in fields(self)))


def text_blocks(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int = 0,
    data_fields: DataFields = DataFields(),
) -> torch.Tensor:
    """`num_samples` blocks of `seq_len` tokens from documents: a file (`.txt`: one per line; JSON/JSONL: `text`, or
    Alpaca `instruction`/`input`/`output`) or a Hub dataset `name[:config][@split]` (default split: train).

    Documents are shuffled with `seed`, tokenised one by one and joined with the EOS id, then cut into consecutive
    blocks. A Hub dataset is streamed (shuffled through a buffer) and read only as far as the blocks need.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}")
    documents = load_documents(source, "calibration file", data_fields, streaming=True, seed=seed,
                               instructions_as_text=True)
    needed = num_samples * seq_len
    ids = torch.tensor(encode_documents(tokenizer, documents, max_tokens=needed), dtype=torch.long)
    if ids.numel() < needed:
        raise ValueError(
            f"calibration file {source} has {ids.numel():,} tokens, but {num_samples} samples of {seq_len} tokens "
            f"need {needed:,}: lower --samples/--seq-len or add text"
        )
    return ids[:needed].view(num_samples, seq_len).clone()


def multiple_choice_prompts(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, num_samples: int, seed: int = 0
) -> MultipleChoiceBatch:
    """`num_samples` MMLU-style prompts (`input` ending in "Answer:", `output` a letter A-D), seeded selection,
    from a file or a Hub dataset; each prompt starts a sequence, so it gets the tokenizer's BOS."""
    records = load_records(source, ("input", "output"), "calibration file").to_list()
    bad = [r["output"] for r in records if str(r["output"]).strip() not in ANSWER_LETTERS]
    if bad:
        raise ValueError(f"{source}: every `output` must be one of {ANSWER_LETTERS}, found {bad[0]!r}")
    if len(records) < num_samples:
        raise ValueError(f"{source} has {len(records)} prompts, fewer than the {num_samples} samples requested")
    chosen = random.Random(seed).sample(records, num_samples)
    encoded = [encode_document(tokenizer, r["input"]) for r in chosen]
    length = max(len(e) for e in encoded)
    ensure_pad_token(tokenizer)
    input_ids = torch.full((num_samples, length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    letter_ids = torch.tensor([tokenizer(" " + letter, add_special_tokens=False)["input_ids"][-1] for letter in ANSWER_LETTERS])
    answers = torch.tensor([ANSWER_LETTERS.index(str(r["output"]).strip()) for r in chosen])
    return MultipleChoiceBatch(input_ids, attention_mask, attention_mask.sum(1) - 1, letter_ids, answers)
