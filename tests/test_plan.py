"""`amoeba plan`: parameter counts equal the real models', the DP count equals calibration's, memory scales right."""

import argparse
import json

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer, write_tiny_text
from transformers import GPT2Config, LlamaConfig

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import build_parser, main, settings_from_args
from amoeba_hf.modeling.modeling_amoeba import is_recovery_parameter
from amoeba_hf.modeling.shape_space import full_layer_sizes
from amoeba_hf.pipeline.plan import PlanSettings, corrected_weight_bytes, layer_activation_bytes, plan
from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate
from amoeba_hf.training.finetune import FinetuneSettings
from amoeba_hf.training.trainer import AmoebaTrainer, AmoebaTrainingArguments

LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False)


def trained_like_finetune(source, train_base: bool = False, dtype: torch.dtype = torch.float32,
                          calibration: CalibrationSettings | None = None) -> AmoebaForCausalLM:
    """The source converted, calibrated with `calibration` (if given) and given SMoL exactly as `finetune` does with
    its default settings."""
    settings = FinetuneSettings(data=["unused"], train_base=train_base)
    model = AmoebaForCausalLM.from_llama(source).to(dtype)
    if calibration is not None:
        calibrate(model, tiny_tokenizer(), calibration, show_progress=False)
    return model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts), rank=settings.rank,
                             alpha=settings.alpha, router_noise=settings.router_noise, train_base=settings.train_base,
                             exact_full_shape=settings.distill_teacher == "base")


def layer_bytes_saved_for_backward(model: AmoebaForCausalLM, inputs) -> int:
    """Bytes autograd saves, parameters aside, for a training forward of layer 1 at the model's shape on `inputs`."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    inner = model.model
    inner.route()
    hidden = inputs.inputs_embeds.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        inner.run_layers(hidden, [inner.layers[1]], inputs)
    return sum(saved.values())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("train_base", [False, True])
def test_parameter_counts_equal_the_real_model(family, train_base, tmp_path):
    """Against the model `calibrate` (its defaults: depth bridges and width corrections) and `finetune` make; with
    drop-last depths, whose removed spans are the ones the plan assumes (the data decide them otherwise)."""
    source = tiny_source(family)
    calibration = CalibrationSettings(data=str(write_tiny_text(tmp_path / "calib.jsonl")), samples=4, seq_len=16,
                                      depth_method="drop-last")
    model = trained_like_finetune(source, train_base, calibration=calibration)
    recovery = sum(p.numel() for name, p in model.named_parameters() if is_recovery_parameter(name))
    assert model.config.depth_bridges and model.config.width_compensation and recovery > 0
    result = plan(source.config, train_base=train_base)
    params = result["parameters"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert params["base"] == sum(p.numel() for p in source.parameters())
    assert params["recovery"] == recovery
    assert params["body"] + params["embeddings"] == params["base"]
    train = next(stage for stage in result["stages"] if stage["stage"] == "train")
    assert train["memory"]["weights"] == 2 * params["base"] + 4 * recovery  # bfloat16 by default; recovery fp32
    assert train["memory"]["experts"] == 4 * (params["experts"] + params["router"])
    plain = plan(source.config, train_base=train_base, depth_bridges=False, width_compensation=False)["parameters"]
    assert plain["recovery"] == 0 and plain["total"] == params["total"] - recovery


def test_calibrated_checkpoint_counts_its_own_recovery(tmp_path):
    """A calibrated config carries the spans its data chose (here by the DP), which the plan counts as they are."""
    source = tiny_source("llama")
    calibration = CalibrationSettings(data=str(write_tiny_text(tmp_path / "calib.jsonl")), samples=4, seq_len=16,
                                      min_depth=2, widths=[1.0, 0.5], width_compensation_rank=2)
    model = trained_like_finetune(source, calibration=calibration)
    params = plan(model.config, depth_bridges=False, width_compensation=False)["parameters"]
    assert params["recovery"] == sum(p.numel() for n, p in model.named_parameters() if is_recovery_parameter(n))
    assert params["total"] == sum(p.numel() for p in model.parameters())


def test_full_weight_training_from_the_base_counts_the_real_teacher_copy(tmp_path):
    """With the base teacher and trained base weights, the trainer holds a frozen copy of the model: the plan's
    extra weights are that copy's real bytes, and the full shape's training joins the teacher's forward."""
    source = tiny_source("llama")
    calibration = CalibrationSettings(data=str(write_tiny_text(tmp_path / "calib.jsonl")), samples=4, seq_len=16,
                                      depth_method="drop-last")
    model = trained_like_finetune(source, train_base=True, dtype=torch.bfloat16, calibration=calibration)
    model.config.smol_exact_full_shape = True
    args = AmoebaTrainingArguments(output_dir=str(tmp_path), distill_teacher="base", report_to=[], use_cpu=True)
    copy_bytes = sum(p.numel() * p.element_size() for p in AmoebaTrainer(model=model, args=args)._frozen_base
                     .parameters())
    train = {teacher: next(stage for stage in plan(source.config, teacher=teacher, train_base=True)["stages"]
                           if stage["stage"] == "train") for teacher in ("base", "largest")}
    assert train["base"]["memory"]["weights"] - train["largest"]["memory"]["weights"] == copy_bytes
    frozen = next(stage for stage in plan(source.config, teacher="base")["stages"] if stage["stage"] == "train")
    assert frozen["memory"]["weights"] == train["largest"]["memory"]["weights"]
    assert train["base"]["flops"] > train["largest"]["flops"] > frozen["flops"]


def test_any_shape_checkpoint_config_keeps_its_experts():
    model = trained_like_finetune(tiny_source("mistral"))
    params = plan(model.config, experts=2, rank=4)["parameters"]  # the checkpoint's experts win over the flags
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("dtype", "train_base"), [(torch.bfloat16, False), (torch.float32, False),
                                                    (torch.bfloat16, True)])
def test_layer_activations_match_what_autograd_saves(dtype, train_base):
    """The per-layer formula against the bytes autograd saves for one training forward of a real layer (SDPA)."""
    source = tiny_source("llama")
    model = trained_like_finetune(source, train_base, dtype).train()
    model.config._attn_implementation = "sdpa"
    batch, seq_len = 2, 24
    inputs = model.model.prepare_inputs(torch.randint(3, 97, (batch, seq_len)))
    saved = layer_bytes_saved_for_backward(model, inputs)
    d = torch.finfo(dtype).bits // 8
    config = model.config
    expected = layer_activation_bytes(config, full_layer_sizes(config)[1], batch * seq_len, d, train_base)
    rotary = 2 * seq_len * config.head_dim * d  # cos and sin, shared by every layer: counted once per model
    assert saved == pytest.approx(expected + rotary, rel=1e-3)


def test_depth_search_count_equals_calibration(tmp_path):
    source = tiny_source("llama")
    settings = CalibrationSettings(data=str(write_tiny_text(tmp_path / "calib.jsonl")), samples=4, seq_len=16,
                                   min_depth=3, chunk_size=2)
    report = calibrate(AmoebaForCausalLM.from_llama(source), tiny_tokenizer(), settings, show_progress=False)
    search = plan(source.config, min_depth=3, samples=4, seq_len=16)["depth_search"]
    assert (search["evaluations"], search["layer_forwards"]) == (report.evaluations, report.layer_forwards)
    assert search["vocabulary_projections"] == report.evaluations * 4 * 15


def test_llama_sizes_and_memory_scaling():
    llama2 = LlamaConfig(**LLAMA2_7B)
    llama3 = plan(LlamaConfig(**LLAMA3_8B))
    assert llama3["parameters"]["base"] == 8_030_261_248
    # calibrate's defaults at widths 0.875 .. 0.5: rank-128 corrections of o_proj (7 .. 4 of 8 KV groups of 4 heads of
    # 128) and down_proj (of 14336 neurons), B A with A rank x kept and B 4096 x rank; a 4096^2 bridge per depth 16..31
    kept = [groups * 4 * 128 for groups in (7, 6, 5, 4)] + [int(14336 * w) for w in (0.875, 0.75, 0.625, 0.5)]
    assert llama3["parameters"]["recovery"] == 32 * sum(128 * (k + 4096) for k in kept) + 16 * 4096**2
    base = plan(llama2)
    params = base["parameters"]
    assert params["base"] == 6_738_415_616
    assert params["body"] + params["embeddings"] == params["base"]
    assert params["embeddings"] == 2 * 32000 * 4096
    memory = {stage["stage"]: stage["memory"] for stage in base["stages"]}
    fp32 = {stage["stage"]: stage["memory"] for stage in plan(llama2, dtype="float32")["stages"]}
    assert memory["convert"]["weights"] == 2 * params["base"]
    for stage in ("calibrate", "train", "evaluate"):  # bridges and width corrections stay float32
        assert memory[stage]["weights"] == 2 * params["base"] + 4 * params["recovery"]
        assert fp32[stage]["weights"] == 4 * params["base"] + 4 * params["recovery"]
    assert fp32["train"]["experts"] == memory["train"]["experts"]  # experts stay fp32
    assert fp32["train"]["activations"] > memory["train"]["activations"]

    ddp = {stage["stage"]: stage for stage in plan(llama2, processes=8)["stages"]}
    fsdp = {stage["stage"]: stage for stage in plan(llama2, processes=8, fsdp=True)["stages"]}
    assert ddp["train"]["memory"]["weights"] == memory["train"]["weights"]
    assert ddp["train"]["memory"]["gradients"] == 2 * memory["train"]["gradients"]  # DDP's bucket copy
    assert fsdp["train"]["memory"]["weights"] == pytest.approx(memory["train"]["weights"] / 8, abs=1)
    assert fsdp["train"]["memory"]["optimizer"] == pytest.approx(memory["train"]["optimizer"] / 8, abs=1)
    assert fsdp["train"]["memory"]["fsdp_gather"] > 0
    assert fsdp["train"]["memory"]["activations"] == memory["train"]["activations"]
    assert fsdp["calibrate"]["memory"] == memory["calibrate"]  # Stage 1 runs in one process
    assert fsdp["train"]["flops"] == base["stages"][2]["flops"]  # per device

    checkpointed = plan(llama2, gradient_checkpointing=True)["stages"][2]
    assert checkpointed["memory"]["activations"] < memory["train"]["activations"] / 4
    assert checkpointed["flops"] > base["stages"][2]["flops"]
    doubled = plan(llama2, batch_size=2, tflops=100.0)["stages"][2]
    assert doubled["flops"] > 2 * base["stages"][2]["flops"] * 0.99
    assert doubled["seconds"] == pytest.approx(doubled["flops"] / 100e12)


def test_cli_prints_the_table_from_a_config_alone(tmp_path, capsys):
    folder = tmp_path / "llama2-7b"
    LlamaConfig(**LLAMA2_7B).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    out = tmp_path / "plan.json"
    assert main(["plan", str(folder), "--seq-len", "2048", "--tflops", "400", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6,738,415,616 base" in printed
    for row in ("convert", "calibrate", "train (per step)", "evaluate 32x1"):
        assert row in printed
    written = json.loads(out.read_text())
    assert written["parameters"]["base"] == 6_738_415_616
    assert written["stages"][2]["seconds"] == pytest.approx(written["stages"][2]["flops"] / 400e12)
    assert main(["plan", str(folder / "config.json"), "--processes", "8", "--fsdp"]) == 0
    assert "8 training processes (FSDP)" in capsys.readouterr().out


def test_cli_defaults_are_the_dataclass_defaults():
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert settings_from_args(PlanSettings, subparsers.choices["plan"].parse_args(["m"])) == PlanSettings()


def test_cli_one_line_errors(tmp_path, capsys):
    GPT2Config().save_pretrained(tmp_path / "gpt2")
    for model in (str(tmp_path / "missing"), str(tmp_path / "gpt2")):
        assert main(["plan", model]) == 2
        error = capsys.readouterr().err
        assert error.startswith("amoeba plan: error:") and error.count("\n") == 1
    assert "gpt2" in error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_width_corrections_save_their_folded_weights_for_backward(dtype, tmp_path):
    """At each grid width, a training forward of a layer with width corrections saves o_proj's and down_proj's
    corrected weights beyond what the same layer saves without them; the plan counts the largest of these."""
    calibration = CalibrationSettings(data=str(write_tiny_text(tmp_path / "calib.jsonl")), samples=4, seq_len=16,
                                      depth_method="drop-last")
    model = trained_like_finetune(tiny_source("llama"), dtype=dtype, calibration=calibration).train()
    model.config._attn_implementation = "sdpa"
    config = model.config
    widths = list(config.width_compensation)
    expected = corrected_weight_bytes(config, full_layer_sizes(config)[1], torch.finfo(dtype).bits // 8)
    inputs = model.model.prepare_inputs(torch.randint(3, 97, (2, 24)))

    def saved_bytes(width: float) -> int:
        with model.shaped(config.num_hidden_layers, width):
            return layer_bytes_saved_for_backward(model, inputs)

    corrected = [saved_bytes(width) for width in widths]
    model.set_width_compensation(None)
    extra = [with_corrections - saved_bytes(width) for width, with_corrections in zip(widths, corrected)]
    assert min(extra) > 0 and max(extra) == expected
