"""The user's data from a Hub dataset `name[:config][@split]`, offline: a dataset folder in the Hub's layout (a README
with `configs:` and parquet files) feeds training, calibration and perplexity, and bad names are one-line errors."""

import json
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
from conftest import tiny_tokenizer
from datasets import Dataset

from amoeba_hf.evaluation.scoring import encode_task
from amoeba_hf.evaluation.tasks import PerplexityTask, load_task
from amoeba_hf.selection.data import text_blocks
from amoeba_hf.training.data import DataFields, encode_documents, instruction_dataset, parse_dataset_spec
from amoeba_hf.training.finetune import FinetuneSettings, build_dataset, check_data
from amoeba_hf.training.reconstruction import reconstruction_blocks

README = """---
configs:
- config_name: wiki
  data_files:
  - split: train
    path: wiki/train-*.parquet
  - split: test
    path: wiki/test-*.parquet
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train-*.parquet
- config_name: chat
  data_files:
  - split: train
    path: chat/train-*.parquet
- config_name: articles
  data_files:
  - split: train
    path: articles/train-*.parquet
---
# my_corpus
"""
CONFIGS = "wiki, alpaca, chat, articles"


def words(seed: int, count: int) -> str:
    return " ".join(f"w{3 + (seed * 13 + i * 7) % 94}" for i in range(count))


ALPACA = [{"instruction": words(i, 3), "input": words(i + 50, i % 2), "output": words(i + 90, 4), "text": words(i, 9)}
          for i in range(8)]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and a private cache: the datasets below must load from their folder alone."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


@pytest.fixture
def corpus(tmp_path, offline) -> Path:
    """`my_corpus` with four configs: `text` (train/test), Alpaca columns, prompt/completion, `content`."""
    folder = tmp_path / "my_corpus"
    parts = {
        "wiki/train": [{"text": words(i, 20), "title": f"t{i}"} for i in range(30)],
        "wiki/test": [{"text": words(100 + i, 12), "title": f"t{i}"} for i in range(6)],
        "alpaca/train": ALPACA,
        "chat/train": [{"prompt": words(i, 3), "completion": words(i + 40, 3)} for i in range(5)],
        "articles/train": [{"content": words(200 + i, 15), "url": f"u{i}"} for i in range(10)],
    }
    for part, records in parts.items():
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_list(records).to_parquet(str(folder / f"{part}-00000-of-00001.parquet"))
    (folder / "README.md").write_text(README)
    return folder


def test_dataset_specs_parse_into_name_config_and_split():
    assert parse_dataset_spec("wikitext:wikitext-2-raw-v1@train") == ("wikitext", "wikitext-2-raw-v1", "train")
    assert parse_dataset_spec("tatsu-lab/alpaca@train[:100]") == ("tatsu-lab/alpaca", None, "train[:100]")
    assert parse_dataset_spec("/data/my_corpus:wiki") == ("/data/my_corpus", "wiki", None)
    for bad in ("name:", "name@", ":config@train"):
        with pytest.raises(ValueError, match=r"expected name\[:config\]\[@split\]"):
            parse_dataset_spec(bad)


def test_training_data_from_a_hub_dataset_matches_the_same_records_from_a_file(tmp_path, corpus):
    tokenizer = tiny_tokenizer()
    local = tmp_path / "alpaca.json"
    local.write_text(json.dumps([{k: r[k] for k in ("instruction", "input", "output")} for r in ALPACA]))
    from_hub = instruction_dataset(f"{corpus}:alpaca@train", tokenizer, 32, 16)
    assert from_hub["input_ids"] == instruction_dataset(local, tokenizer, 32, 16)["input_ids"]

    settings = FinetuneSettings(data=[f"{corpus}:alpaca@train", f"{corpus}:wiki@train", f"{corpus}:articles"],
                                text_block_size=32)
    check_data(settings.data)
    dataset = build_dataset(settings.data, tokenizer, settings)
    text_blocks_count = sum(e["labels"] == e["input_ids"] for e in dataset)
    assert len(dataset) - text_blocks_count == len(ALPACA)
    assert text_blocks_count == (30 * 21 - 1) // 32 + (10 * 16 - 1) // 32

    chat = build_dataset([f"{corpus}:chat"], tokenizer, settings, DataFields(instruction="prompt", output="completion"))
    assert len(chat) == 5 and all(-100 in e["labels"] for e in chat)


def test_calibration_blocks_from_a_hub_dataset(corpus, tmp_path):
    tokenizer = tiny_tokenizer()
    spec = f"{corpus}:wiki@train"
    blocks = text_blocks(spec, tokenizer, num_samples=4, seq_len=16, seed=1)
    assert blocks.shape == (4, 16)
    assert torch.equal(blocks, text_blocks(spec, tokenizer, num_samples=4, seq_len=16, seed=1))
    documents = [words(i, 20) for i in range(30)]
    assert set(blocks.flatten().tolist()) <= set(encode_documents(tokenizer, documents))
    with pytest.raises(ValueError, match="has 629 tokens, but 40 samples of 16 tokens need 640"):
        text_blocks(spec, tokenizer, num_samples=40, seq_len=16)
    with pytest.raises(ValueError, match="has 41 tokens"):
        text_blocks(f"{corpus}:wiki@train[:2]", tokenizer, num_samples=3, seq_len=16)
    both = reconstruction_blocks([f"{corpus}:articles", spec], tokenizer, samples=5, seq_len=8)
    assert both.shape == (5, 8)


def test_perplexity_text_from_a_hub_dataset(corpus, tmp_path):
    tokenizer = tiny_tokenizer()
    task = load_task(f"{corpus}:wiki@test", tmp_path)
    assert task == PerplexityTask(f"{corpus}:wiki@test", tuple(words(100 + i, 12) for i in range(6)))
    encoded = encode_task(task, tokenizer, ppl_window=16)
    assert encoded.token_ids.tolist() == encode_documents(tokenizer, task.text)
    assert len(encoded.token_ids) == 6 * 13 - 1


BAD_NAMES = {
    "config": ("{corpus}:nope@train", DataFields(), f"no config 'nope'; its configs: {CONFIGS}"),
    "no-config": ("{corpus}@train", DataFields(), f"no config given; its configs: {CONFIGS}"),
    "split": ("{corpus}:wiki@dev", DataFields(), "no split 'dev'; its splits: train, test"),
    "field": ("{corpus}:wiki@train", DataFields(text="body"),
              "has no field 'body' (set as its text field); it has ['text', 'title']"),
    "no-text-field": ("{corpus}:chat@train", DataFields(), "lacks field(s) ['text'] (or 'content'"),
    "unknown-id": ("no-such-org/no-such-dataset@train", DataFields(),
                   "no such file, and no dataset 'no-such-org/no-such-dataset'"),
}
# Evaluation has no field settings: it reads the detected text field.
CASES = [(stage, case) for stage in ("training", "calibration", "evaluation") for case in BAD_NAMES
         if stage != "evaluation" or BAD_NAMES[case][1] == DataFields()]


@pytest.mark.parametrize("stage, case", CASES, ids=[f"{stage}-{case}" for stage, case in CASES])
def test_bad_names_give_one_line_errors_listing_the_valid_ones(corpus, tmp_path, stage, case):
    spec, fields, message = BAD_NAMES[case]
    spec = spec.format(corpus=corpus)
    with pytest.raises(ValueError) as error:
        if stage == "training":
            check_data([spec], fields)
        elif stage == "calibration":
            text_blocks(spec, tiny_tokenizer(), 2, 8, data_fields=fields)
        else:
            load_task(spec, tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
