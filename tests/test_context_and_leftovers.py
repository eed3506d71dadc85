"""Sequences past the model's positions are refused or cut, and outputs have one writer and no stale leftovers.

Each case was once silently wrong: a 1000-token calibration block ran on a 64-position model, a killed export left
its staging folder forever, two processes wrote the same --out, and a refused train left an empty work folder.
"""

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, leftovers, run_cli, tiny_source, tiny_tokenizer, write_tiny_text
from filelock import FileLock

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.training.trainer import AmoebaTrainer

POSITIONS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny any-shape checkpoint (depths 3..6) that knows 64 positions, with a tokenizer without chat template."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    AmoebaForCausalLM.from_llama(tiny_source("llama", max_position_embeddings=POSITIONS), min_depth=3).save_pretrained(
        folder
    )
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_tiny_text(folder / "text.jsonl")
    (folder / "alpaca.json").write_text(json.dumps([{"instruction": "w3 w4", "input": "", "output": "w5 w6"}] * 4))
    return folder


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "source"
    tiny_source("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- context length ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, extra, message",
    [
        ("eval", ["--tasks", "wikitext2", "--ppl-window", "1024", "--out", "{tmp}/r.json"],
         "ppl_window (--ppl-window) 1024 exceeds the model's max_position_embeddings (64)"),
        ("calibrate", ["--data", "{data}/text.jsonl", "--seq-len", "1000", "--out", "{tmp}/out"],
         "--seq-len 1000 exceeds the model's max_position_embeddings (64)"),
        ("reconstruct", ["--data", "{data}/text.jsonl", "--seq-len", "1000", "--out", "{tmp}/out"],
         "--seq-len 1000 exceeds the model's max_position_embeddings (64)"),
        ("profile", ["--prompt-lengths", "8,100000", "--repeats", "1"],
         "--prompt-lengths 100000 + --new-tokens 16 exceeds the model's max_position_embeddings (64)"),
        ("profile", ["--prompt-lengths", "60", "--new-tokens", "5", "--repeats", "1"],
         "--prompt-lengths 60 + --new-tokens 5 exceeds the model's max_position_embeddings (64)"),
        ("generate", ["--depth", "6", "--prompt", "w5 w6", "--max-new-tokens", "64"],
         "--max-new-tokens 64 leaves no room for the prompt within the model's max_position_embeddings (64)"),
    ],
)
def test_sequences_longer_than_the_model_knows_are_refused_before_the_work(
    checkpoint, data, tmp_path, capsys, command, extra, message
):
    extra = [value.format(tmp=tmp_path, data=data) for value in extra]
    if command == "eval":
        extra += ["--data-dir", tmp_path]
    code, _, err = run_cli([command, checkpoint, *extra], capsys)
    assert_one_line_error(code, err, command, message)
    assert leftovers(tmp_path) == []


def test_generate_keeps_the_end_of_a_prompt_too_long_for_the_model_and_says_so(checkpoint, capsys):
    prompt = " ".join(f"w{3 + i % 90}" for i in range(100))
    code, out, err = run_cli(["generate", checkpoint, "--depth", "6", "--prompt", prompt, "--raw",
                              "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == ["amoeba generate: warning: prompt of 100 tokens + --max-new-tokens 4 exceeds the model's "
                        "max_position_embeddings (64); keeping the last 60 prompt tokens"]
    assert "[shape 6x1: " in out and "4 tokens at" in out


# --- stale staging folders, one writer, nothing left by a refusal -------------------------------------------------


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_rerun_removes_the_staging_folder_of_a_killed_run_but_keeps_work_folders(
    checkpoint, source, tmp_path, capsys, command
):
    stale = tmp_path / ".out.staging-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a model")
    work = tmp_path / ".out.train-work"
    (work / "checkpoint-5").mkdir(parents=True)
    args = ["convert", source, "--min-depth", "3"] if command == "convert" else ["export", checkpoint, "--depth", "4"]
    code, _, err = run_cli([*args, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path) == [".out.train-work", "out", "source"]
    assert leftovers(work) == ["checkpoint-5"]


def test_a_run_removes_the_staging_of_other_killed_outputs_in_its_folder_but_not_of_live_ones(source, tmp_path, capsys):
    """A run killed while writing `o`, then a run for `o2` in the same folder: `o`'s staging goes (its lock is free);
    the staging of an output whose writer still holds its lock stays."""
    for name in ("o", "busy"):
        (tmp_path / f".{name}.staging-abc123").mkdir()
        (tmp_path / f".{name}.staging-abc123" / "model.safetensors").write_bytes(b"half a model")
    (tmp_path / ".gguf-out.gguf.staging-x1y2").write_bytes(b"half a GGUF file")
    with FileLock(tmp_path / ".busy.lock"):
        code, _, err = run_cli(["convert", source, "--min-depth", "3", "--out", tmp_path / "o2"], capsys)
    assert code == 0, err
    assert leftovers(tmp_path) == [".busy.lock", ".busy.staging-abc123", "o2", "source"]


@pytest.mark.parametrize("command", ["convert", "export", "train"])
def test_a_second_writer_of_the_same_out_is_refused_at_once_and_writes_nothing(
    checkpoint, data, source, tmp_path, capsys, command
):
    out = tmp_path / "out"
    args = {
        "convert": ["convert", source, "--min-depth", "3"],
        "export": ["export", checkpoint, "--depth", "4"],
        "train": ["train", checkpoint, "--data", data / "alpaca.json", "--steps", "1"],
    }[command]
    with FileLock(tmp_path / ".out.lock"):
        code, _, err = run_cli([*args, "--out", out], capsys)
    assert_one_line_error(code, err, command, f"another amoeba process is writing {out} (lock {tmp_path}/.out.lock); "
                          "wait for it or choose another --out")
    assert leftovers(tmp_path) == [".out.lock", "source"]


def test_a_train_refused_by_the_trainer_leaves_no_work_folder_but_keeps_earlier_state(
    checkpoint, data, tmp_path, capsys, monkeypatch
):
    def refuse(self, *args, **kwargs):
        raise ValueError("refused by the Trainer")

    monkeypatch.setattr(AmoebaTrainer, "train", refuse)
    args = ["train", checkpoint, "--data", data / "alpaca.json", "--steps", "1", "--out", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "train", "refused by the Trainer")
    assert leftovers(tmp_path) == []

    state = tmp_path / ".out.train-work" / "checkpoint-1"
    state.mkdir(parents=True)
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "train", ".out.train-work holds an interrupted run")
    assert leftovers(tmp_path) == [".out.train-work"] and state.is_dir()
