"""The inference weight cache of ElasticLinear: same outputs as without it, rebuilt whenever it could be stale."""

import copy

import pytest
import torch
from conftest import pruned_reference, tiny_source

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.elastic_linear import ElasticLinear, set_weight_cache, weight_cache_bytes

IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 12], [9, 3, 44, 71, 2, 88, 15, 30]])
TOLERANCE = 1e-5


def smol_model(seed: int = 0) -> AmoebaForCausalLM:
    """Tiny model with SMoL experts whose LoRA updates are non-zero, and input means for bias compensation."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    model.enable_smol(experts=3, top_k=2, rank=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "shape_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
        for layer in model.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.register_buffer("input_mean", torch.randn(linear.in_features, generator=generator) * 0.1)
    model.set_shape(*model.shape)  # compensation from the new means
    return model.eval()


def logits(model, ids: torch.Tensor = IDS, forwards: int = 3) -> torch.Tensor:
    """Logits of the last of `forwards` identical passes: the cache is made on the second and used on the third."""
    with torch.no_grad():
        for _ in range(forwards):
            output = model(ids).logits
    return output


def uncached(model: AmoebaForCausalLM) -> AmoebaForCausalLM:
    reference = copy.deepcopy(model)
    set_weight_cache(reference, "off")
    return reference


def sliced_bytes(model: AmoebaForCausalLM) -> int:
    """Bytes of the active o_proj and down_proj weights whose input columns are sliced."""
    linears = [m for layer in model.model.active_layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    return sum(m.active_out * m.active_in * m.weight.element_size() for m in linears if m.active_in < m.in_features)


@pytest.mark.parametrize("shape", [(6, 0.6), (5, 0.83), (3, 0.5)])
def test_cached_shape_matches_pruned_reference_and_export(shape):
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    model.set_shape(*shape)
    elastic = logits(model)
    assert weight_cache_bytes(model) == sliced_bytes(model) > 0
    widths = model.shape_space.layer_widths(*shape)
    (size,) = set(widths.values())
    reference = pruned_reference(source, sorted(widths), size.key_value_groups, size.intermediate_size)
    with torch.no_grad():
        assert (elastic - reference(IDS).logits).abs().max().item() <= TOLERANCE
        assert (elastic - model.export_subnet()(IDS).logits).abs().max().item() <= TOLERANCE


def test_no_cache_at_full_width_or_when_off_and_none_copied_into_views():
    model = smol_model()
    logits(model)
    assert weight_cache_bytes(model) == 0  # full width: every view is contiguous, nothing to copy
    model.set_shape(4, 0.5)
    logits(model)
    assert weight_cache_bytes(model) == sliced_bytes(model) > 0
    assert weight_cache_bytes(model.shape_view(4, 0.5)) == 0
    set_weight_cache(model, "off")
    assert weight_cache_bytes(model) == 0
    logits(model)
    assert weight_cache_bytes(model) == 0


@pytest.mark.parametrize("mode", ["strided", "merged"])
def test_switching_shapes_gives_the_uncached_outputs(mode):
    model = smol_model()
    set_weight_cache(model, mode)
    reference = uncached(model)
    for shape in [(3, 0.5), (6, 0.6), (3, 0.5), (6, 1.0), (5, 0.83), (5, 0.83)]:
        model.set_shape(*shape)
        reference.set_shape(*shape)
        assert (logits(model) - logits(reference, forwards=1)).abs().max().item() <= TOLERANCE, shape
    assert weight_cache_bytes(model) > 0


def test_merged_mode_folds_the_lora_into_every_gated_linear():
    model = smol_model()
    model.set_shape(4, 0.75)
    logits(model)
    strided = weight_cache_bytes(model)
    set_weight_cache(model, "merged")
    logits(model)
    active = [m for layer in model.model.active_layers for m in layer.modules() if isinstance(m, ElasticLinear)]
    gated = [m for m in active if m.gates is not None]
    assert gated
    assert weight_cache_bytes(model) == sum(m.active_out * m.active_in * 4 for m in gated) > strided


@pytest.mark.parametrize("mode", ["strided", "merged"])
def test_alternating_shape_views_each_give_their_own_shape(mode):
    model = smol_model()
    set_weight_cache(model, mode)
    reference = uncached(model)
    large, small = model.shape_view(6, 0.6), model.shape_view(3, 0.5)
    expected = {}
    for shape in [(6, 0.6), (3, 0.5)]:
        reference.set_shape(*shape)
        expected[shape] = logits(reference, forwards=1)
    for _ in range(3):
        assert (logits(large, forwards=1) - expected[(6, 0.6)]).abs().max().item() <= TOLERANCE
        assert (logits(small, forwards=1) - expected[(3, 0.5)]).abs().max().item() <= TOLERANCE
    assert weight_cache_bytes(large) > 0 and weight_cache_bytes(small) > 0
    draft_greedy = model.generate(IDS[:1], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                  assistant_model=model.shape_view(3, 0.5))
    reference.set_shape(*model.shape)
    plain_greedy = reference.generate(IDS[:1], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(draft_greedy, plain_greedy)


@pytest.mark.parametrize("mode", ["strided", "merged"])
def test_in_place_edits_and_new_gates_rebuild_the_cache(mode):
    model = smol_model()
    set_weight_cache(model, mode)
    model.set_shape(4, 0.5)
    logits(model)
    layer = model.model.active_layers[1]
    # merged, W + s*B@A is rounded once more in float32; lora_A + 0.5 makes s*B@A large next to W
    tolerance = TOLERANCE if mode == "strided" else 5 * TOLERANCE
    edits = [
        lambda m: m.model.active_layers[1].mlp.down_proj.weight.add_(1.0),
        lambda m: m.model.active_layers[1].self_attn.o_proj.weight.mul_(-1.0),
        lambda m: m.model.active_layers[0].mlp.down_proj.lora_B.add_(0.5),
        lambda m: m.model.active_layers[0].mlp.down_proj.lora_A.add_(0.5),
        lambda m: m.model.shape_router.logits.bias.add_(torch.tensor([3.0, -3.0, 0.0])),
    ]
    for edit in edits:
        with torch.no_grad():
            edit(model)
        reference = uncached(model)
        assert (logits(model) - logits(reference, forwards=1)).abs().max().item() <= tolerance
    before = logits(model)
    with torch.no_grad():
        layer.mlp.down_proj.weight.zero_()
    assert (logits(model, forwards=1) - before).abs().max().item() > 1e-3  # the very next forward sees the edit


def test_in_place_bias_edit_and_dtype_change_rebuild_the_cache():
    linear = ElasticLinear(12, 10, bias=True, track_input_mean=True, experts=3, rank=4)
    with torch.no_grad():
        linear.lora_B.normal_()
        linear.input_mean.normal_()
    linear.gates = torch.tensor([0.5, 0.0, 0.5])
    linear.set_active(active_in=7, active_out=6)
    x = torch.randn(3, 12)[:, :7]

    def expected(module):
        weight, bias = module.weight[:6, :7], module.bias[:6] + module.weight[:6, 7:] @ module.input_mean[7:]
        mixed_a = torch.einsum("e,eri->ri", module.gates, module.lora_A)[:, :7]
        mixed_b = torch.einsum("e,eor->or", module.gates, module.lora_B)[:6]
        return x @ weight.T + bias + module.lora_scaling * (x @ mixed_a.T @ mixed_b.T)

    for mode in ["strided", "merged"]:
        linear.set_weight_cache(mode)
        with torch.no_grad():
            for edit in [lambda: None, lambda: linear.bias.add_(1.0), lambda: linear.gates.mul_(2.0),
                         lambda: setattr(linear, "gates", torch.tensor([0.0, 1.0, 0.0]))]:
                edit()
                for _ in range(3):
                    assert (linear(x) - expected(linear)).abs().max().item() <= TOLERANCE
                assert linear.weight_cache_bytes() > 0
    linear.double()
    linear.gates = linear.gates.double()
    linear.set_active(active_in=7, active_out=6)
    x = x.double()
    with torch.no_grad():
        for _ in range(3):
            assert linear(x).dtype == torch.float64
            assert (linear(x) - expected(linear)).abs().max().item() <= TOLERANCE


def test_training_is_unchanged_bit_for_bit_and_the_trained_weights_are_served():
    model = smol_model()
    model.config.smol_router_noise = False
    model.model.shape_router.noisy = False
    model.set_shape(4, 0.5)
    set_weight_cache(model, "merged")
    logits(model)  # a warm cache that training must not use
    reference = uncached(model)
    results = []
    for candidate in (model, reference):
        candidate.train()
        loss = candidate(IDS, labels=IDS).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in candidate.named_parameters() if p.grad is not None}
        with torch.no_grad():
            for p in candidate.parameters():
                if p.grad is not None:
                    p.sub_(0.5 * p.grad)
        results.append((loss.detach(), grads))
        candidate.eval()
    (loss, grads), (reference_loss, reference_grads) = results
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)
    assert (logits(model) - logits(reference, forwards=1)).abs().max().item() <= TOLERANCE


def test_full_fine_tuning_of_sliced_weights_gets_the_uncached_gradients():
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    model.set_shape(5, 0.6)
    logits(model)
    assert weight_cache_bytes(model) > 0
    reference = uncached(model)
    grads = []
    for candidate in (model, reference):
        candidate(IDS, labels=IDS).loss.backward()
        grads.append({name: p.grad for name, p in candidate.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])
    down_proj = model.model.active_layers[0].mlp.down_proj
    assert down_proj.weight.grad[:, : down_proj.active_in].abs().sum() > 0


def test_bad_mode_is_refused():
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    with pytest.raises(ValueError, match="one of off, strided, merged, got 'fast'"):
        set_weight_cache(model, "fast")
