"""The paper's setting on this CPU: bf16 weights through the commands, fp32 experts and statistics, gradient
checkpointing, checkpoints that hold only what trains, and the refusals of what is not supported."""

import json

import pytest
import torch
from conftest import pruned_reference, tiny_source, write_tiny_text
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from training_worker import smol_model
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.training.finetune import FinetuneSettings, TrainerSettings, finetune

IDS = torch.randint(3, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def llama3_like_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level over the tiny vocabulary, BOS (id 1) added to every text, EOS id 2, and no pad token."""
    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", unk_token="<unk>")


def stored_dtypes(folder) -> dict[str, torch.dtype]:
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return {key: weights.get_slice(key).get_dtype() for key in weights.keys()}


def test_bf16_source_goes_through_convert_calibrate_train_and_stays_bf16(tmp_path):
    """A bf16 Llama with a Llama-3-style tokenizer (BOS, no pad): every checkpoint keeps bf16 base weights, and fp32
    calibration statistics, experts and router."""
    source = tmp_path / "source"
    tiny_source("llama", max_position_embeddings=256).to(torch.bfloat16).save_pretrained(source)
    llama3_like_tokenizer().save_pretrained(source)
    text = write_tiny_text(tmp_path / "text.jsonl")
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "w5 w6 w7", "input": "", "output": "w8 w9 w10 w11"}] * 12))
    commands = [
        ["convert", str(source), "--out", str(tmp_path / "converted"), "--dtype", "bfloat16", "--min-depth", "3"],
        ["calibrate", str(tmp_path / "converted"), "--data", str(text), "--samples", "4", "--seq-len", "24",
         "--width-mode", "global", "--widths", "1,0.75,0.5", "--dtype", "bfloat16", "--out", str(tmp_path / "calib")],
        ["train", str(tmp_path / "calib"), "--data", str(instructions), "--steps", "2", "--batch-size", "2",
         "--grad-accum", "1", "--experts", "2", "--rank", "2", "--teacher", "base", "--gradient-checkpointing",
         "--dtype", "bfloat16", "--out", str(tmp_path / "trained")],
    ]
    for command in commands:
        assert main(command) == 0, command
    dtypes = stored_dtypes(tmp_path / "trained")
    fp32 = {key for key, dtype in dtypes.items() if dtype == "F32"}
    assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16"
    assert {key.rsplit(".", 1)[-1] for key in fp32} >= {"lora_A", "lora_B", "neuron_importance", "input_mean"}
    assert all(dtype == "BF16" for key, dtype in dtypes.items() if key not in fp32)
    fp32_kinds = ("lora_", "shape_router", "importance", "input_mean", "depth_bridges")
    assert all(any(kind in key for kind in fp32_kinds) for key in fp32)
    reloaded = AmoebaForCausalLM.from_pretrained(tmp_path / "trained")
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.model.layers[0].mlp.neuron_importance.dtype == torch.float32


def test_bf16_load_of_a_global_width_checkpoint_keeps_the_fp32_layer_widths(tmp_path):
    """Importance buffers rounded to bf16 would change which channels a width keeps; they stay fp32."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    generator = torch.Generator().manual_seed(4)
    layers = model.model.layers
    importance = [(torch.sort(torch.rand(3, generator=generator) * 1e-3 + 1, descending=True).values,
                   torch.sort(torch.rand(80, generator=generator) * 1e-3 + 1, descending=True).values)
                  for _ in layers]
    model.model.permute_widths([torch.arange(3) for _ in layers], [torch.arange(80) for _ in layers],
                               importance=importance)
    model.save_pretrained(tmp_path / "global")
    fp32 = AmoebaForCausalLM.from_pretrained(tmp_path / "global", dtype=torch.float32)
    bf16 = AmoebaForCausalLM.from_pretrained(tmp_path / "global", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.layers[0].mlp.neuron_importance.dtype == torch.float32
    for width in (0.9, 0.7, 0.55):
        assert bf16.shape_space.layer_widths(6, width) == fp32.shape_space.layer_widths(6, width)


@pytest.mark.parametrize("shape", [(6, 1.0), (4, 0.5)])
def test_bf16_elastic_shape_equals_the_bf16_pruned_llama_and_its_export(shape):
    source = tiny_source("llama").to(torch.bfloat16)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    model.set_shape(*shape)
    kept = model.shape_space.kept_layers(shape[0])
    size = model.shape_space.layer_widths(*shape)[kept[0]]
    reference = pruned_reference(source, kept, size.key_value_groups, size.intermediate_size).to(torch.bfloat16).eval()
    reference.model.rotary_emb = type(reference.model.rotary_emb)(reference.config)  # fp32, as from_pretrained makes
    with torch.no_grad():
        elastic = model(IDS).logits
        assert elastic.dtype == torch.bfloat16
        assert torch.equal(elastic, reference(IDS).logits)
        assert torch.equal(elastic, model.export_subnet().eval()(IDS).logits)


def test_experts_train_in_fp32_over_a_bf16_base_and_merge_on_export_in_bf16():
    model = AmoebaForCausalLM.from_llama(tiny_source("llama").to(torch.bfloat16), min_depth=3)
    model.enable_smol(experts=3, rank=4)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n or "shape_router" in n} == {torch.float32}
    model.train().set_shape(4, 0.5)
    model(IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None]
    assert grads and all(grad.dtype == torch.float32 for grad in grads)
    subnet = model.eval().export_subnet()
    assert {p.dtype for p in subnet.parameters()} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = smol_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.model.shape_router.noisy = False
        for shape in ((6, 1.0), (4, 0.5)):
            model.set_shape(*shape)
            model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6


def test_trainer_checkpoint_holds_only_what_trains(tmp_path):
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps([{"instruction": "w5 w6 w7", "input": "", "output": "w8 w9 w10"}] * 8))
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    settings = FinetuneSettings(data=[str(data)], steps=2, batch_size=2, grad_accum=1, experts=2, rank=2,
                                save_steps=1)
    finetune(model, llama3_like_tokenizer(), settings, tmp_path / "work", disable_tqdm=True, use_cpu=True)
    checkpoint = tmp_path / "work" / "checkpoint-2"
    saved = stored_dtypes(checkpoint)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == set(trainable)
    weight_bytes = (checkpoint / "model.safetensors").stat().st_size
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad)
    assert trainable_bytes <= weight_bytes < trainable_bytes + 64 * 1024 < base_bytes
    assert (checkpoint / "optimizer.pt").is_file()


def test_deepspeed_is_refused_with_what_is_supported():
    with pytest.raises(ValueError, match="DeepSpeed is not supported.*DDP.*FSDP"):
        TrainerSettings(deepspeed="ds_config.json").validate()


def test_model_is_built_on_the_meta_device_and_converts_without_a_second_copy():
    """`from_llama` builds on the meta device and takes the source's tensors: no parameter is copied."""
    source = tiny_source("mistral").to(torch.bfloat16)
    pointers = {p.data_ptr() for p in source.parameters()}
    model = AmoebaForCausalLM.from_llama(source)
    assert {p.data_ptr() for p in model.parameters()} <= pointers
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(source.config)
    assert all(p.is_meta for p in empty.parameters())
