"""Every bad input gets a clear error: one line naming what is wrong, exit code 2 from the CLI, nothing left behind.

Each case was found wrong once: silently accepted (a 0-step training ran by epochs, 0 experts trained every base
weight), a traceback (config validation wrapped by huggingface_hub), or a message about the wrong thing (a missing
folder reported as an unknown Hub repo id).
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, leftovers, run_cli, tiny_source, tiny_tokenizer, write_tiny_text
from test_hub import amoeba_cli, hub_env, local_hub  # noqa: F401 (local_hub is a fixture)
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaConfig, AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.deploy.profile import CACHE_DIR, PROFILE_FILE
from amoeba_hf.deploy.search import QUICK_EVAL_FILE
from amoeba_hf.evaluation.runner import EvalSettings, evaluate_shapes
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError
from amoeba_hf.training.finetune import FinetuneSettings

SMALL = dict(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, head_dim=16)
FULL = list(range(6))
CHAT_TEMPLATE = (
    "{% for m in messages %}w5 w6 {{ m['content'] }} w7{% endfor %}{% if add_generation_prompt %} w8{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny any-shape checkpoint (6 layers, depths 3..6) with a word-level tokenizer that has a chat template."""
    folder = tmp_path_factory.mktemp("checkpoint") / "tiny"
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "w3 w4", "input": "", "output": "w5 w6"}] * 4))
    return path


# --- AmoebaConfig: one place of validation, errors of one ValueError type that name the field ---------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(min_depth=0), "min_depth must be in [1, 6], got 0"),
        (dict(min_width=1.5), "min_width must be in (0, 1], got 1.5"),
        (dict(min_depth=3, depth_table={"3": [0, 1, 2]}), "depth_table lacks the full depth: it must have the key '6'"),
        (dict(min_depth=3, depth_table={"6": FULL, "0": []}), "depth_table key '0' is outside the depths [min_depth=3"),
        (dict(min_depth=3, depth_table={"6": FULL, "3.0": [0, 1, 5]}), "depth_table key '3.0' is not a depth"),
        (dict(min_depth=3, depth_table={"6": FULL, "3": [0, 1]}), "depth_table['3'] must list exactly 3 layers"),
        (dict(smol_experts=2, smol_rank=0), "smol_rank must be >= 1"),
    ],
)
def test_config_refuses_bad_fields_with_its_own_value_error(fields, message):
    with pytest.raises(AmoebaConfigError) as error:
        AmoebaConfig(**SMALL, **fields)
    assert isinstance(error.value, ValueError) and message in str(error.value)


def test_config_accepts_a_table_with_the_full_depth_and_some_depths_left_out():
    config = AmoebaConfig(**SMALL, min_depth=3, depth_table={"6": FULL, "3": [0, 2, 5]})
    assert sorted(config.depth_table) == ["3", "6"]


def tamper(checkpoint: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the checkpoint whose config.json has `fields` replaced."""
    folder = tmp_path / "tampered"
    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_loading_a_tampered_depth_table_raises_the_config_error(checkpoint, tmp_path, capsys):
    folder = tamper(checkpoint, tmp_path, depth_table={"3": [0, 1, 5]})
    with pytest.raises(AmoebaConfigError, match="depth_table lacks the full depth"):
        AmoebaForCausalLM.from_pretrained(folder)
    code, _, err = run_cli(["shapes", folder], capsys)
    assert_one_line_error(code, err, "shapes", "depth_table lacks the full depth")


@pytest.mark.parametrize("option, value, message", [("--min-depth", 0, "min_depth must be in [1, 6], got 0"),
                                                    ("--min-width", 1.5, "min_width must be in (0, 1], got 1.5")])
def test_convert_refuses_a_bad_shape_space_in_one_line(tmp_path, capsys, option, value, message):
    source = tmp_path / "source"
    tiny_source("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    code, _, err = run_cli(["convert", source, "--out", tmp_path / "out", option, value], capsys)
    assert_one_line_error(code, err, "convert", message)
    assert leftovers(tmp_path) == ["source"]


# --- where the model comes from ---------------------------------------------------------------------------------


def test_missing_folders_and_folders_without_config_are_named(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    missing, out = tmp_path / "missing", tmp_path / "x"
    cases = [
        (["export", "./missing", "--depth", "3", "--out", out], "export", "model folder ./missing does not exist"),
        (["convert", missing, "--out", out], "convert", f"model folder {missing} does not exist"),
        (["convert", "a/b/c", "--out", out], "convert", "model folder a/b/c does not exist"),
        (["shapes", tmp_path / "empty"], "shapes", f"no config.json in {tmp_path / 'empty'}"),
    ]
    for args, command, message in cases:
        code, _, err = run_cli(args, capsys)
        assert_one_line_error(code, err, command, message)
        assert "Hub" not in err and "repo" not in err, err
    assert leftovers(tmp_path) == ["empty"]


def test_shapes_of_a_plain_llama_folder_says_to_convert_it(tmp_path, capsys):
    tiny_source("llama").save_pretrained(tmp_path / "plain")
    code, _, err = run_cli(["shapes", tmp_path / "plain"], capsys)
    assert_one_line_error(code, err, "shapes",
                          f"{tmp_path / 'plain'} is not an any-shape checkpoint (model_type llama); convert it with "
                          "`amoeba convert`")


def test_build_of_an_unsupported_model_leaves_no_work_folder(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97)).save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(["build", "--model", tmp_path / "gpt2", "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "build", "Cannot convert a 'gpt2' model")
    assert leftovers(tmp_path) == ["gpt2"]


def test_build_refuses_zero_steps_before_any_work(tmp_path, capsys):
    code, _, err = run_cli(["build", "--out", tmp_path / "out", "--steps", "0"], capsys)
    assert_one_line_error(code, err, "build", "steps must be >= 1, got 0")
    assert leftovers(tmp_path) == []


# --- Stage 2 settings and data ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--experts", "0"], "experts must be >= 1 (1 = plain LoRA), got 0"),
        (["--rank", "0"], "rank must be >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    ],
)
def test_train_refuses_bad_settings_and_creates_no_folder(checkpoint, alpaca, tmp_path, capsys, extra, message):
    code, _, err = run_cli(["train", checkpoint, "--data", alpaca, "--out", tmp_path / "out", *extra], capsys)
    assert_one_line_error(code, err, "train", message)
    assert leftovers(tmp_path) == []


def test_train_refuses_data_whose_answers_are_all_empty(checkpoint, tmp_path, capsys):
    data = tmp_path / "empty_answers.json"
    data.write_text(json.dumps([{"instruction": "w3 w4", "input": "", "output": ""}] * 4))
    code, _, err = run_cli(["train", checkpoint, "--data", data, "--out", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "train", f"training data {data}: every `output` (answer) is empty")
    assert leftovers(tmp_path) == ["empty_answers.json"]


def test_enable_smol_refuses_zero_experts_and_keeps_the_base_frozen_with_one():
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    with pytest.raises(ValueError, match="experts must be >= 1"):
        model.enable_smol(experts=0)
    assert model.config.smol_experts == 0
    model.enable_smol(experts=1, top_k=1)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "shape_router" in name for name in trainable)


def test_finetune_settings_validate_what_the_trainer_would_reinterpret():
    FinetuneSettings(data=[]).validate()
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        FinetuneSettings(data=[], steps=0).validate()
    with pytest.raises(ValueError, match="experts must be >= 1"):
        FinetuneSettings(data=[], experts=0, train_base=True).validate()


# --- Stage 1 data -----------------------------------------------------------------------------------------------


def test_calibration_text_that_is_not_a_string_is_named(checkpoint, tmp_path, capsys):
    data = tmp_path / "numbers.jsonl"
    data.write_text("".join(json.dumps({"text": 5}) + "\n" for _ in range(3)))
    code, _, err = run_cli(["calibrate", checkpoint, "--data", data, "--out", tmp_path / "out", "--samples", "2",
                            "--seq-len", "8"], capsys)
    assert_one_line_error(code, err, "calibrate",
                          f"calibration file {data}: record 1 has `text` 5; it must be a string")
    assert leftovers(tmp_path) == ["numbers.jsonl"]


# --- generate, eval -------------------------------------------------------------------------------------------------


def test_generate_refuses_an_empty_prompt(checkpoint, capsys):
    code, _, err = run_cli(["generate", checkpoint, "--depth", "6", "--prompt", "  "], capsys)
    assert_one_line_error(code, err, "generate", "--prompt is empty")


@pytest.mark.parametrize("raw", [False, True])
def test_generate_uses_the_chat_template_unless_raw_and_reports_the_shape(checkpoint, capsys, raw):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = tiny_tokenizer()
    model.set_shape(4, 0.75)
    text = "w9 w10 w11" if raw else "w5 w6 w9 w10 w11 w7 w8"
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    reply = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    args = ["generate", checkpoint, "--depth", "4", "--width", "0.75", "--prompt", "w9 w10 w11",
            "--max-new-tokens", "5"]
    code, out, err = run_cli(args + (["--raw"] if raw else []), capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == reply and len(lines) == 2
    parameters = model.shape_space.parameter_count(4, 0.75)
    assert lines[1].startswith(f"[shape 4x0.75: {parameters:,} parameters, ") and lines[1].endswith(" tokens/s]")


def test_eval_refuses_batch_size_zero(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["eval", checkpoint, "--data-dir", tmp_path, "--out", tmp_path / "r.json",
                            "--batch-size", "0"], capsys)
    assert_one_line_error(code, err, "eval", "--batch-size must be >= 1, got 0")
    assert leftovers(tmp_path) == []


def test_evaluation_refuses_token_ids_past_the_vocabulary(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama", vocab_size=50), min_depth=3).eval()
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "w3 w4", "choices": ["w5", "w60"], "label": 0}) + "\n")
    with pytest.raises(ValueError, match="token id 60, outside the model's vocabulary \\(vocab_size 50\\)"):
        evaluate_shapes(model, tiny_tokenizer(), [(6, 1.0)], [str(task)], EvalSettings(str(tmp_path)),
                        model_name="tiny")


# --- the CLI's error handling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, module, handler, args, hint", [
    ("train", "stages", "_cmd_train", ["m", "--data", "d", "--out", "o"], True),
    ("calibrate", "stages", "_cmd_calibrate", ["--data", "d", "--out", "o"], True),
    ("build", "pipeline", "_cmd_build", ["--out", "o"], True),
    ("eval", "evaluate", "_cmd_eval", ["m", "--data-dir", "d", "--out", "o"], True),
    ("shapes", "shapes", "_cmd_shapes", ["m"], False),
])
def test_ctrl_c_says_whether_a_rerun_resumes(monkeypatch, capsys, command, module, handler, args, hint):
    import importlib

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"amoeba_hf.cli.{module}"), handler, interrupted)
    code, _, err = run_cli([command, *args], capsys)
    expected = f"amoeba {command}: interrupted" + ("; run the same command again to resume" if hint else "")
    assert code == 130 and err == expected + "\n"


def test_cli_does_not_hide_programming_errors(monkeypatch, capsys):
    from amoeba_hf.cli import shapes

    def broken(_args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(shapes, "_cmd_shapes", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["shapes", "m"])


# --- caches stay local ----------------------------------------------------------------------------------------------


def test_profile_and_quick_eval_caches_are_hidden_and_not_pushed(checkpoint, tmp_path, local_hub):  # noqa: F811
    assert PROFILE_FILE.startswith(f"{CACHE_DIR}/") and QUICK_EVAL_FILE.startswith(f"{CACHE_DIR}/")
    assert CACHE_DIR.startswith(".")
    folder = tmp_path / "with_caches"
    folder.mkdir()
    for path in checkpoint.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    for name in (PROFILE_FILE, QUICK_EVAL_FILE):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text('{"runtime": "cpu: this machine"}')
    result = amoeba_cli(["push", str(folder), "tester/cached"], tmp_path, hub_env(local_hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    pushed = local_hub.files("tester/cached")
    assert "config.json" in pushed and not any(CACHE_DIR in name or "amoeba_profile" in name for name in pushed)


def test_calibration_text_blocks_name_a_bad_record(tmp_path):
    from amoeba_hf.selection.data import text_blocks

    data = write_tiny_text(tmp_path / "mixed.jsonl", documents=3)
    with data.open("a") as handle:
        handle.write(json.dumps({"text": ["w3"]}) + "\n")
    with pytest.raises(ValueError, match="record 4 has `text`"):
        text_blocks(data, tiny_tokenizer(), 1, 8)


def test_global_widths_without_importance_scores_are_refused_not_exported_degenerate(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    model.config.width_mode = "global"
    for layer in model.model.layers:
        layer.self_attn.register_buffer("group_importance", torch.zeros(3))
        layer.mlp.register_buffer("neuron_importance", torch.zeros(80))
    with pytest.raises(ValueError, match="needs calibrated importance scores"):
        model.model.reset_shape_space()
    with pytest.raises(ValueError, match="needs calibrated importance scores"):
        model.export_subnet(4, 0.75)


@pytest.mark.parametrize("source, message", [("./missing", "model folder ./missing does not exist"),
                                             ("a/b/c", "model folder a/b/c does not exist"),
                                             (None, "no config.json in")])
def test_from_llama_names_a_missing_folder_instead_of_talking_about_hub_ids(tmp_path, source, message):
    source = str(tmp_path) if source is None else source
    with pytest.raises(FileNotFoundError, match=message):
        AmoebaForCausalLM.from_llama(source)


def test_export_refuses_a_gguf_dtype_without_gguf_an_existing_file_and_an_adapter_without_experts(
    checkpoint, tmp_path, capsys
):
    base = ["export", checkpoint, "--depth", 4, "--width", 0.75]
    code, _, err = run_cli([*base, "--out", tmp_path / "subnet", "--gguf-dtype", "q8_0"], capsys)
    assert_one_line_error(code, err, "export", "--gguf-dtype applies only with --gguf FILE")
    (tmp_path / "kept.gguf").write_bytes(b"user data")
    code, _, err = run_cli([*base, "--gguf", tmp_path / "kept.gguf"], capsys)
    assert_one_line_error(code, err, "export", "already exists")
    assert (tmp_path / "kept.gguf").read_bytes() == b"user data"
    code, _, err = run_cli([*base, "--adapter", tmp_path / "adapter"], capsys)
    assert_one_line_error(code, err, "export", "has no SMoL experts")
    assert leftovers(tmp_path) == ["kept.gguf"]
