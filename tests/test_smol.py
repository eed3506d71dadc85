"""SMoL: shape-aware mixture of LoRA experts — gating, gradients, merge on export, equivalence to peft LoRA."""

import pytest
import torch
from conftest import tiny_source
from peft import LoraConfig, get_peft_model

from amoeba_hf import AmoebaForCausalLM

IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22], [9, 9, 41, 3, 77, 12, 50, 6]])


def smol_model(experts: int = 4, top_k: int = 2, seed: int = 0, family: str = "llama") -> AmoebaForCausalLM:
    model = AmoebaForCausalLM.from_llama(tiny_source(family), min_depth=3).enable_smol(experts=experts, top_k=top_k, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "shape_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def test_enabling_smol_leaves_the_model_unchanged_and_freezes_the_base():
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    with torch.no_grad():
        before = model(IDS).logits
        model.enable_smol(experts=3, top_k=2, rank=4)
        assert torch.equal(model(IDS).logits, before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "shape_router" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 6 * 7


def test_gates_are_deterministic_in_eval_noisy_in_training_and_survive_save_load(tmp_path):
    model = smol_model().eval()
    model.set_shape(4, 0.75)
    gates = model.model.shape_router()
    assert torch.equal(gates, model.model.shape_router())
    assert (gates > 0).sum() == 2 and torch.isclose(gates.sum(), torch.tensor(1.0))
    with torch.no_grad():
        logits = model(IDS).logits
        assert torch.equal(model(IDS).logits, logits)
    model.train()
    noisy = [model.model.shape_router() for _ in range(20)]
    assert any(not torch.equal(noisy[0], g) for g in noisy[1:])
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AmoebaForCausalLM.from_pretrained(tmp_path).eval()
    loaded.set_shape(4, 0.75)
    assert torch.equal(loaded.model.shape_router(), gates)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)


def test_widths_between_grid_points_get_their_own_gates():
    model = smol_model(experts=6, top_k=3).eval()
    gates = {}
    for width in (0.75, 0.8, 0.875):
        model.set_shape(6, width)
        gates[width] = model.model.shape_router().clone()
    assert not torch.equal(gates[0.75], gates[0.8]) and not torch.equal(gates[0.8], gates[0.875])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", [(6, 1.0), (4, 0.75), (3, 0.55)])
def test_export_merges_the_shapes_lora(family, shape):
    model = smol_model(family=family).eval()
    model.set_shape(*shape)
    subnet = model.export_subnet()
    assert not any("lora" in name for name, _ in subnet.named_parameters())
    with torch.no_grad():
        assert (subnet(IDS).logits - model(IDS).logits).abs().max().item() <= 1e-5
    if shape != (6, 1.0):
        model.set_shape(6, 1.0)
        with torch.no_grad():
            assert (subnet(IDS).logits - model(IDS).logits).abs().max().item() > 1e-3


def test_router_and_selected_experts_get_gradients_unselected_none():
    model = smol_model(experts=4, top_k=2).train()
    model.config.smol_router_noise = False
    model.model.shape_router.noisy = False
    model.set_shape(5, 0.8)
    selected = model.model.shape_router().detach() > 0
    assert selected.sum() == 2
    model(IDS, labels=IDS).loss.backward()
    for name, parameter in model.named_parameters():
        if "shape_router.noise" in name:
            continue
        if "shape_router" in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        elif "lora_" in name and parameter.grad is not None and parameter.grad.abs().sum() > 0:
            per_expert = parameter.grad.flatten(1).abs().sum(1)
            assert torch.all(per_expert[selected] > 0), name
            assert torch.all(per_expert[~selected] == 0), name
    layer_out = model.model.layers[5]  # kept at depth 5 (the last layer is always kept)
    assert layer_out.mlp.down_proj.lora_A.grad.flatten(1).abs().sum(1)[selected].gt(0).all()
    dropped = model.model.layers[4]  # depth 5 drops layer 4 in the default table
    assert dropped.mlp.down_proj.lora_A.grad is None


def test_one_expert_is_exactly_peft_lora():
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).enable_smol(experts=1, top_k=1, rank=4, alpha=8.0).eval()
    reference = get_peft_model(
        tiny_source("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            for name, linear in [*layer.self_attn.named_children(), *layer.mlp.named_children()]:
                if not hasattr(linear, "lora_A"):
                    continue
                module = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                peft_linear = getattr(getattr(reference.base_model.model.model.layers[index], module), name)
                linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=generator) * 0.1)
                peft_linear.lora_A["default"].weight.copy_(linear.lora_A[0])
                peft_linear.lora_B["default"].weight.copy_(linear.lora_B[0])
        assert (model(IDS).logits - reference(IDS).logits).abs().max().item() <= 1e-5
