"""Stage 2a, local reconstruction: lowers each shape's block error on dense inputs, leaves the full shape the source
model, resumes after SIGKILL to the uninterrupted weights, and refuses bad input in one line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer, write_tiny_text
from safetensors.torch import load_file

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.selection.data import text_blocks
from amoeba_hf.training.reconstruction import ReconstructionSettings, reconstruct

DEPTH_TABLE = {"6": [0, 1, 2, 3, 4, 5], "5": [0, 1, 2, 4, 5], "4": [0, 2, 4, 5], "3": [0, 3, 5]}
SHAPES = [(6, 0.5), (5, 0.75), (4, 0.75), (3, 0.5)]


def any_shape_model() -> tuple[torch.nn.Module, AmoebaForCausalLM]:
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    model.update_shape_space(depth_table=DEPTH_TABLE)
    return source, model


def dense_layer_inputs(model: AmoebaForCausalLM, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's input and the final pre-norm state of the full shape, captured by hooks on a plain forward."""
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
             for layer in model.model.layers]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0])))
    try:
        with torch.no_grad(), model.shaped(*model.shape_space.full_shape):
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def block_error(model: AmoebaForCausalLM, dense: list[torch.Tensor], input_ids: torch.Tensor, shape) -> float:
    """Mean over a shape's kept layers of ||layer(dense input) - dense state entering the next kept layer||^2,
    normalised by the target's mean square. Each kept layer's input is replaced by the dense one in a plain forward
    of the shape, so the measurement shares nothing with the training loop."""
    kept = model.shape_space.kept_layers(shape[0])
    targets = {layer: dense[following] for layer, following in zip(kept, [*kept[1:], len(model.model.layers)])}
    errors = []

    def replace_input(index):
        return lambda module, args: (dense[index], *args[1:])

    def measure(index):
        def hook(module, args, output):
            target = targets[index]
            errors.append(((output - target).pow(2).mean() / target.pow(2).mean()).item())
        return hook

    hooks = []
    for index in kept:
        layer = model.model.layers[index]
        hooks += [layer.register_forward_pre_hook(replace_input(index)), layer.register_forward_hook(measure(index))]
    try:
        with torch.no_grad(), model.shaped(*shape):
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(errors) / len(errors)


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    return write_tiny_text(tmp_path_factory.mktemp("recon") / "text.jsonl", documents=40, words=60)


def test_reconstruction_lowers_block_error_on_held_out_text_and_keeps_the_full_shape(calibration_text, tmp_path,
                                                                                    one_thread):
    source, model = any_shape_model()
    held_out = text_blocks(write_tiny_text(tmp_path / "held_out.jsonl", documents=10, seed=7), tiny_tokenizer(), 4, 32)
    dense = dense_layer_inputs(model, held_out)
    before = {shape: block_error(model, dense, held_out, shape) for shape in SHAPES}
    settings = ReconstructionSettings(data=[str(calibration_text)], samples=16, seq_len=32, steps=60, batch_size=4,
                                      learning_rate=1e-2)
    report = reconstruct(model, tiny_tokenizer(), settings, show_progress=False)

    assert model.config.smol_exact_full_shape and model.shape == model.shape_space.full_shape
    assert sorted(report.layers) == list(range(6))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "shape_router" in name for name in trainable)
    after = {shape: block_error(model, dense, held_out, shape) for shape in SHAPES}
    ratios = {shape: after[shape] / before[shape] for shape in SHAPES}
    assert all(ratio < 0.8 for ratio in ratios.values()), ratios
    assert sum(ratios.values()) / len(ratios) < 0.65, ratios
    with torch.no_grad():
        assert torch.equal(model(held_out).logits, source(held_out).logits)


def test_bad_input_is_one_line(calibration_text, tmp_path, capsys):
    source_dir = tmp_path / "source"
    tiny_source("llama").save_pretrained(source_dir)
    tiny_tokenizer().save_pretrained(source_dir)
    cases = [
        (["--data", str(calibration_text), "--steps", "0"], "steps must be >= 1, got 0"),
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl does not exist"),
        (["--data", str(calibration_text), "--samples", "1000"], "tokens, but 1000 samples"),
        (["--data", str(calibration_text), "--widths", "0.1"], "width 0.1 is outside [0.5, 1.0]"),
    ]
    for index, (arguments, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        capsys.readouterr()
        assert main(["reconstruct", str(source_dir), "--out", str(out), "--seq-len", "64", *arguments]) == 2
        error = capsys.readouterr().err
        last = error.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
        assert last.startswith("amoeba reconstruct: error: ") and message in last, error
        assert "Traceback" not in error and error.count("error: ") == 1, error
        assert not out.exists() and not (tmp_path / f".out{index}.reconstruct-state").exists()


def run_reconstruct(source_dir: Path, data: Path, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "amoeba_hf.cli", "reconstruct", str(source_dir), "--data", str(data),
               "--out", str(out), "--samples", "8", "--seq-len", "32", "--steps", "60", "--seed", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_gives_the_uninterrupted_weights(calibration_text, tmp_path):
    source_dir = tmp_path / "source"
    tiny_source("llama").save_pretrained(source_dir)
    tiny_tokenizer().save_pretrained(source_dir)
    reference = tmp_path / "reference"
    stdout, stderr = run_reconstruct(source_dir, calibration_text, reference).communicate(timeout=300)
    assert (reference / "model.safetensors").is_file(), stderr[-3000:]

    out = tmp_path / "resumed"
    state = tmp_path / ".resumed.reconstruct-state" / "state.json"
    process = run_reconstruct(source_dir, calibration_text, out)
    deadline = time.monotonic() + 300
    while not state.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert state.is_file() and not out.exists(), "the first run must be killed after a layer and before the end"

    stdout, stderr = run_reconstruct(source_dir, calibration_text, out).communicate(timeout=300)
    assert "resumed" in stdout, stdout + stderr[-3000:]
    assert not state.parent.exists()
    expected, resumed = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys() and any("lora_B" in name for name in expected)
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
