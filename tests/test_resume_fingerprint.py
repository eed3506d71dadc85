"""Resume only the same run: every resumable command records a fingerprint of its settings, model and data, and a
re-run with another one stops in one line naming the change, leaving the interrupted run's progress untouched."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer, write_tiny_text

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main

TRAIN = ["--steps", "2", "--save-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--experts", "2",
         "--rank", "2", "--lr", "0.0001", "--seed", "0"]


def save_model(folder: Path, seed: int = 0, amoeba: bool = True) -> Path:
    source = tiny_source("llama", seed=seed)
    (AmoebaForCausalLM.from_llama(source, min_depth=3) if amoeba else source).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_instructions(path: Path, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)

    def words(length: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, 97, (length,), generator=generator).tolist())

    path.write_text(json.dumps([{"instruction": words(4), "input": "", "output": words(3)} for _ in range(8)]))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the sha256 of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def interrupt_at_save(monkeypatch, module: str) -> None:
    """The command's final save raises Ctrl-C: its state or work folder stays as an interrupted run leaves it."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"amoeba_hf.cli.{module}.save_checkpoint", interrupted)


def assert_refused(capsys, code: int, command: str, state: Path, before: dict[str, str], *phrases: str) -> None:
    """Exit 2 with one `error:` line naming the change and the folder to remove; the state is as it was."""
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]
    assert code == 2, error[-3000:]
    assert "Traceback" not in error and error.count("error: ") == 1, error[-3000:]
    assert last.startswith(f"amoeba {command}: error: "), error[-3000:]
    for phrase in phrases:
        assert phrase in last, last
    assert f"remove {state}" in last and "another --out" in last, last
    assert snapshot(state) == before


@pytest.fixture(scope="module")
def interrupted_train(tmp_path_factory) -> dict[str, Path]:
    """A train run on a tiny checkpoint, interrupted after its last Trainer checkpoint, before the final save."""
    root = tmp_path_factory.mktemp("train")
    model = save_model(root / "model")
    data = write_instructions(root / "data.json")
    out = root / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupt_at_save(monkeypatch, "stages")
        assert main(["train", str(model), "--data", str(data), "--out", str(out), *TRAIN]) == 130
    work = root / ".out.train-work"
    assert (work / "checkpoint-2").is_dir() and not out.exists()
    return {"model": model, "data": data, "work": work}


def copy_train_state(interrupted_train: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """The interrupted work folder beside a fresh `--out` (so that each test has its own)."""
    work = tmp_path / ".out.train-work"
    shutil.copytree(interrupted_train["work"], work)
    return tmp_path / "out", work


def with_option(arguments: list[str], flag: str, value: str) -> list[str]:
    index = arguments.index(flag)
    return [*arguments[: index + 1], value, *arguments[index + 2 :]]


@pytest.mark.parametrize("flag, value, phrase", [
    ("--lr", "0.0002", "--lr changed from 0.0001 to 0.0002"),
    ("--steps", "3", "--steps changed from 2 to 3"),
    ("--seed", "1", "--seed changed from 0 to 1"),
    ("--experts", "3", "--experts changed from 2 to 3"),
    ("--rank", "4", "--rank changed from 2 to 4"),
])
def test_train_with_other_settings_is_refused(interrupted_train, tmp_path, capsys, flag, value, phrase):
    out, work = copy_train_state(interrupted_train, tmp_path)
    before = snapshot(work)
    arguments = with_option(TRAIN, flag, value)
    code = main(["train", str(interrupted_train["model"]), "--data", str(interrupted_train["data"]),
                 "--out", str(out), *arguments])
    assert_refused(capsys, code, "train", work, before, phrase)
    assert not out.exists()


def test_train_with_an_edited_data_file_is_refused(interrupted_train, tmp_path, capsys):
    out, work = copy_train_state(interrupted_train, tmp_path)
    before = snapshot(work)
    data = interrupted_train["data"]
    original = data.read_bytes()
    write_instructions(data, seed=1)
    try:
        code = main(["train", str(interrupted_train["model"]), "--data", str(data), "--out", str(out), *TRAIN])
    finally:
        data.write_bytes(original)
    assert_refused(capsys, code, "train", work, before, f"data file {data} changed since the interrupted run")


def test_train_on_another_model_folder_is_refused(interrupted_train, tmp_path, capsys):
    out, work = copy_train_state(interrupted_train, tmp_path)
    before = snapshot(work)
    other = save_model(tmp_path / "other", seed=1)
    code = main(["train", str(other), "--data", str(interrupted_train["data"]), "--out", str(out), *TRAIN])
    assert_refused(capsys, code, "train", work, before, "the model changed since the interrupted run")


def test_train_with_unchanged_settings_resumes(interrupted_train, tmp_path, capsys):
    out, work = copy_train_state(interrupted_train, tmp_path)
    saved = json.loads((work / "fingerprint.json").read_text())
    assert saved["settings"]["--lr"] == 0.0001 and saved["data"] == {
        str(interrupted_train["data"]): hashlib.sha256(interrupted_train["data"].read_bytes()).hexdigest()}
    # Operational settings may differ on resume.
    arguments = with_option(TRAIN, "--save-steps", "5")
    code = main(["train", str(interrupted_train["model"]), "--data", str(interrupted_train["data"]),
                 "--out", str(out), *arguments, "--dataloader-num-workers", "0"])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "model.safetensors").is_file() and not work.exists()


@pytest.fixture(scope="module")
def source_and_text(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stage")
    return save_model(root / "source", amoeba=False), write_tiny_text(root / "text.jsonl", documents=20, words=40)


@pytest.mark.parametrize("command, state_name, options", [
    ("calibrate", "calibrate-state", ["--samples", "4", "--seq-len", "32"]),
    ("reconstruct", "reconstruct-state", ["--samples", "4", "--seq-len", "32", "--steps", "2", "--batch-size", "2"]),
])
def test_stage_with_an_edited_data_file_is_refused(source_and_text, tmp_path, capsys, monkeypatch, command,
                                                   state_name, options):
    source, text = source_and_text
    data = tmp_path / "data.jsonl"
    shutil.copy(text, data)
    out = tmp_path / "out"
    arguments = [command, str(source), "--data", str(data), "--out", str(out), *options]
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, "stages")
        assert main(arguments) == 130
    state = tmp_path / f".out.{state_name}"
    assert (state / "fingerprint.json").is_file()
    before = snapshot(state)
    write_tiny_text(data, documents=20, words=40, seed=1)
    capsys.readouterr()
    assert_refused(capsys, main(arguments), command, state, before,
                   f"data file {data} changed since the interrupted run")
    assert not out.exists()


@pytest.fixture(scope="module")
def interrupted_build(tmp_path_factory) -> dict[str, Path]:
    """A build of a tiny source on a text file, interrupted after conversion (its calibration step raises Ctrl-C)."""
    root = tmp_path_factory.mktemp("build")
    source = save_model(root / "source", amoeba=False)
    data = write_tiny_text(root / "text.jsonl", documents=20, words=40)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr("amoeba_hf.pipeline.build.calibrate_step", _interrupt)
        assert main(build_arguments(source, data, root / "out")) == 130
    work = root / ".out.build"
    assert (work / "converted" / "config.json").is_file()
    return {"source": source, "data": data, "work": work}


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def build_arguments(source: Path, data: Path, out: Path, *extra: str) -> list[str]:
    options = {"--steps": "2", "--min-depth": "3", "--seed": "0"}
    for flag, value in zip(extra[::2], extra[1::2]):
        options[flag] = value
    return ["build", "--model", str(source), "--data", str(data), "--out", str(out),
            *[item for pair in options.items() for item in pair]]


@pytest.mark.parametrize("extra, edit_data, phrase", [
    (("--seed", "1"), False, "--seed changed from 0 to 1"),
    (("--min-depth", "4"), False, "--min-depth changed from 3 to 4"),
    ((), True, "data file {data} changed since the interrupted run"),
], ids=["seed", "min-depth", "data"])
def test_build_with_other_settings_or_data_is_refused(interrupted_build, tmp_path, capsys, monkeypatch, extra,
                                                      edit_data, phrase):
    work = tmp_path / ".out.build"
    shutil.copytree(interrupted_build["work"], work)
    before = snapshot(work)
    data = interrupted_build["data"]
    original = data.read_bytes()
    if edit_data:
        write_tiny_text(data, documents=20, words=40, seed=1)
    # A run that is not refused stops before calibrating, so that this test fails fast where resumption is wrong.
    monkeypatch.setattr("amoeba_hf.pipeline.build.calibrate_step", _interrupt)
    try:
        code = main(build_arguments(interrupted_build["source"], data, tmp_path / "out", *extra))
    finally:
        data.write_bytes(original)
    assert_refused(capsys, code, "build", work, before, phrase.format(data=data))
    assert not (tmp_path / "out").exists()


def test_eval_of_another_model_in_the_same_folder_is_refused(tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    choices = [{"context": f"w{3 + i} w{5 + i}", "choices": ["w7", "w8 w9"], "label": i % 2} for i in range(4)]
    (data_dir / "tiny.jsonl").write_text("".join(json.dumps(item) + "\n" for item in choices))
    model = save_model(tmp_path / "model")
    results = tmp_path / "results.json"
    arguments = ["eval", str(model), "--shapes", "6x1", "--tasks", "tiny.jsonl", "--data-dir", str(data_dir),
                 "--out", str(results)]
    assert main(arguments) == 0, capsys.readouterr().err[-3000:]
    shutil.rmtree(model)
    save_model(model, seed=1)
    before = results.read_bytes()
    capsys.readouterr()
    code = main(arguments)
    error = capsys.readouterr().err
    assert code == 2 and "Traceback" not in error and error.count("error: ") == 1, error[-3000:]
    last = error.strip().splitlines()[-1]
    assert last.startswith("amoeba eval: error: ") and "the model changed since the interrupted run" in last, last
    assert f"remove {results}" in last, last
    assert results.read_bytes() == before
