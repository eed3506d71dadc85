"""`amoeba build` end to end on a tiny model: completes, resumes after SIGINT/SIGKILL in every stage, bad input."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_without_amoeba_hf, tiny_source, tiny_tokenizer
from safetensors.torch import load_file

from amoeba_hf.cli import main
from amoeba_hf.data import C4_SAMPLE
from amoeba_hf.pipeline.build import HELD_OUT, BuildSettings, BuildWork, data_step


@pytest.fixture(scope="module")
def tiny_source_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_src")
    tiny_source("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def build_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "amoeba_hf.cli", "build", "--model", str(source), "--out", str(out),
            "--steps", "3", "--min-depth", "3"]


def run_build(source: Path, out: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "AMOEBA_BUILD_FAULT"}
    if fault:
        env["AMOEBA_BUILD_FAULT"] = fault
    return subprocess.run(build_command(source, out), check=False, env=env, capture_output=True, text=True,
                          timeout=900, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """A suite started in the background (`cmd &`) ignores SIGINT, and children inherit that; the SIGINT faults
    need Python's KeyboardInterrupt, which it installs only when SIGINT is not ignored at start."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def uninterrupted(tiny_source_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builds") / "reference"
    result = run_build(tiny_source_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_build_writes_a_complete_checkpoint_loadable_without_amoeba_hf(uninterrupted, tmp_path):
    names = {p.name for p in uninterrupted.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_amoeba.py", "README.md", "frontier.png", "build.log",
            "build_report.json", "amoeba_eval.json", "tokenizer.json"} <= names
    assert not (uninterrupted.parent / f".{uninterrupted.name}.build").exists()
    assert "2/5 data: the bundled C4 sample, 292 documents for calibration and fine-tuning, 8 held out" in (
        uninterrupted / "build.log").read_text()
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(uninterrupted)!r}, trust_remote_code=True).eval()
        assert model.config.smol_experts > 0 and model.config.depth_table
        model.set_shape(3, 0.5)
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("fault", [
    "calibrate:1:SIGINT", "calibrate:1:SIGKILL", "train:2:SIGINT", "train:1:SIGKILL",
])
def test_interrupted_build_resumes_to_the_uninterrupted_result(tiny_source_dir, uninterrupted, tmp_path, fault):
    out = tmp_path / "build"
    interrupted = run_build(tiny_source_dir, out, fault)
    assert interrupted.returncode != 0
    assert not out.exists()
    stage = fault.split(":")[0]
    work = tmp_path / ".build.build"
    assert work.exists()
    resumed = run_build(tiny_source_dir, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (out / "build.log").read_text()
    assert log.count("2/5 data") == 1, "finished steps must not run again"
    if stage == "train":
        assert log.count("3/5 calibrate") == 1
    assert (out / "model.safetensors").read_bytes() == (uninterrupted / "model.safetensors").read_bytes()


def test_two_process_build_writes_the_checkpoint_of_the_one_process_build(tiny_source_dir, uninterrupted, tmp_path):
    """`accelerate launch` on 2 CPU processes (gloo): the main process prepares while the other waits, both train
    with half the per-device batch (same global batch as the reference), and only the main process saves."""
    out = tmp_path / "build"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29541", "-m", "amoeba_hf.cli"]
    env = {k: v for k, v in os.environ.items() if k != "AMOEBA_BUILD_FAULT"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launch, *build_command(tiny_source_dir, out)[3:], "--per-device-train-batch-size", "1"],
                            check=False, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"], "one checkpoint, no work folder or lock left"
    assert "batch 1x1" in (out / "build.log").read_text()
    two, one = load_file(out / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert two.keys() == one.keys()
    trained = [name for name in one if "lora_B" in name]
    assert trained and max((one[name] != 0).sum().item() for name in trained) > 0
    assert max((two[name] - one[name]).abs().max().item() for name in one) <= 1e-5
    rows = {(r["model"], r["depth"], r["width"]): r["perplexity"]
            for r in json.loads((out / "build_report.json").read_text())["rows"]}
    reference = {(r["model"], r["depth"], r["width"]): r["perplexity"]
                 for r in json.loads((uninterrupted / "build_report.json").read_text())["rows"]}
    assert rows.keys() == reference.keys() and all(abs(rows[k] / reference[k] - 1) < 1e-4 for k in rows)


def test_default_data_is_the_bundled_c4_sample_with_its_last_documents_held_out(tmp_path):
    documents = [json.loads(line)["text"] for line in C4_SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert len(documents) == 300 and all(documents)
    data = data_step(BuildWork(tmp_path), BuildSettings())
    trained = [json.loads(line)["text"] for line in Path(data.train_files[0]).read_text().splitlines()]
    assert data.calibration_file == data.train_files[0] and trained == documents[:-HELD_OUT]
    assert Path(data.eval_file).read_text() == "\n".join(documents[-HELD_OUT:]) + "\n"
    assert not set(trained) & set(documents[-HELD_OUT:])
    assert data_step(BuildWork(tmp_path), BuildSettings(eval_data="wiki.txt")).eval_file == "wiki.txt"


def test_build_bad_input_is_one_line_and_overwrites_nothing(tiny_source_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    cases = [
        (["--model", "no-such-org/no-such-model", "--out", str(tmp_path / "a")], "no-such-org/no-such-model"),
        (["--model", str(tiny_source_dir), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "b")],
         "does not exist"),
        (["--model", str(tiny_source_dir), "--out", str(occupied)], "not empty"),
    ]
    for arguments, message in cases:
        assert main(["build", *arguments]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1, error
    assert [p.name for p in occupied.iterdir()] == ["config.json"]
    assert not (tmp_path / "b").exists()
