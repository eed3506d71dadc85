"""Every shape of the elastic model computes exactly what an independently pruned stock model computes."""

import pytest
import torch
from conftest import pruned_reference, tiny_source
from transformers import GPT2Config, GPT2LMHeadModel

from amoeba_hf import AmoebaForCausalLM

FAMILIES = ["llama", "mistral", "qwen2"]
# (depth, width): full, depth only, width only, both, widths between grid points, and the smallest shape.
SHAPES = [(6, 1.0), (4, 1.0), (6, 0.6), (5, 0.83), (4, 0.75), (3, 0.5)]
# A calibrated-style table in which the shallower depths drop layer 0.
DEPTH_TABLE = {"6": [0, 1, 2, 3, 4, 5], "5": [1, 2, 3, 4, 5], "4": [1, 2, 4, 5], "3": [2, 4, 5]}


def convert(family: str, depth_table: dict | None = None) -> tuple:
    source = tiny_source(family)
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    if depth_table is not None:
        model.config.depth_table = depth_table
        model.model.reset_shape_space()
    return source, model


def reference_for(source, model, depth: int, width: float):
    widths = model.shape_space.layer_widths(depth, width)
    (size,) = set(widths.values())
    return pruned_reference(source, sorted(widths), size.key_value_groups, size.intermediate_size)


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (batch, length), generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_shape_is_the_source_model(family):
    source, model = convert(family)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("table", [None, DEPTH_TABLE], ids=["default-table", "drops-layer-0"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"d{d}-w{w}" for d, w in SHAPES])
def test_shape_matches_physically_pruned_model(family, table, shape):
    source, model = convert(family, table)
    model.set_shape(*shape)
    reference = reference_for(source, model, *shape)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        elastic = model(ids, attention_mask=mask).logits
        subnet = model.export_subnet()
        exported = subnet(ids, attention_mask=mask).logits
    assert (elastic - expected).abs().max().item() <= 1e-5
    assert (exported - expected).abs().max().item() <= 1e-5
    assert type(subnet) is type(source)
    assert subnet.num_parameters() == reference.num_parameters() == model.shape_space.parameter_count(*shape)
    if shape != (6, 1.0):
        assert subnet.num_parameters() < source.num_parameters()


@pytest.mark.parametrize("family", FAMILIES)
def test_width_is_sliced_with_views_not_copies(family):
    _, model = convert(family)
    model.set_shape(5, 0.6)
    layer = model.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        view = linear.active_weight()
        assert view.data_ptr() == linear.weight.data_ptr()
        assert view.numel() < linear.weight.numel()
    assert layer.self_attn.q_proj.active_out == 2 * 2 * 16  # 2 of 3 KV groups, 2 query heads each
    assert layer.self_attn.k_proj.active_out == 2 * 16


def test_width_keeps_that_fraction_of_groups_and_neurons_nested_between_grid_points():
    _, model = convert("llama")
    space = model.shape_space
    previous = None
    for width in [1.0, 0.95, 0.9, 0.83, 0.75, 0.7, 0.61, 0.5]:
        sizes = space.layer_widths(6, width)
        for size in sizes.values():
            assert abs(size.intermediate_size - width * 80) <= 0.5
            assert abs(size.key_value_groups - width * 3) <= 0.5
        if previous is not None:
            for index, size in sizes.items():
                assert size.key_value_groups <= previous[index].key_value_groups
                assert size.intermediate_size <= previous[index].intermediate_size
        previous = sizes
    assert space.layer_widths(6, 0.83)[0].intermediate_size == 66  # between the 0.875 and 0.75 grid points
    assert space.layer_widths(6, 0.83)[0] != space.layer_widths(6, 0.875)[0]


@pytest.mark.parametrize(
    "depth, width, message",
    [
        (7, 1.0, "not in the shape space"),
        (2, 1.0, "not in the shape space"),
        (5, 0.4, "outside"),
        (5, 1.2, "outside"),
        (5, float("nan"), "must be a number"),
        (5, "0.75", "must be a number"),
        (5.0, 1.0, "must be an int"),
        (True, 1.0, "must be an int"),
    ],
)
def test_invalid_shape_is_rejected_and_shape_unchanged(depth, width, message):
    _, model = convert("llama")
    model.set_shape(4, 0.75)
    with pytest.raises(ValueError, match=message):
        model.set_shape(depth, width)
    assert model.shape == (4, 0.75)
    assert len(model.model._active_layers) == 4


def test_shaped_restores_previous_shape_even_on_error():
    _, model = convert("llama")
    model.set_shape(5, 0.8)
    with model.shaped(3, 0.5):
        assert model.shape == (3, 0.5)
    assert model.shape == (5, 0.8)
    with pytest.raises(RuntimeError), model.shaped(4, 1.0):
        raise RuntimeError("boom")
    assert model.shape == (5, 0.8)


def test_unknown_architecture_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="supported architectures are llama, mistral, qwen2"):
        AmoebaForCausalLM.from_llama(gpt2)


def test_static_export_for_non_uniform_widths_matches_elastic():
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3)
    model.config.width_mode = "global"
    global_model = AmoebaForCausalLM(model.config).eval()
    global_model.load_state_dict(model.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(global_model.model.layers):
        # Synthetic importance, sorted descending per layer; later layers matter less.
        layer.self_attn.group_importance.copy_(torch.sort(torch.rand(3, generator=generator) - 0.3 * index, descending=True).values)
        layer.mlp.neuron_importance.copy_(torch.sort(torch.rand(80, generator=generator) - 0.3 * index, descending=True).values)
    global_model.model.reset_shape_space()
    global_model.set_shape(5, 0.7)
    widths = global_model.shape_space.layer_widths(5, 0.7)
    assert len(set(widths.values())) > 1, "global allocation should give layers different widths"
    subnet = global_model.export_subnet()
    assert type(subnet).__name__ == "AmoebaForCausalLM"
    assert subnet.num_parameters() == global_model.shape_space.parameter_count(5, 0.7)
    ids = tokens()
    with torch.no_grad():
        assert (subnet(ids).logits - global_model(ids).logits).abs().max().item() <= 1e-5
    kept = sorted(widths)
    assert subnet.config.layer_intermediate_sizes == [widths[i].intermediate_size for i in kept]


def test_bias_compensation_equals_hand_computed_output_bias():
    source = tiny_source("llama")
    model = AmoebaForCausalLM.from_llama(source, min_depth=3)
    model.config.bias_compensation = True
    compensated = AmoebaForCausalLM(model.config).eval()
    compensated.load_state_dict(model.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(0)
    means = {}
    for index, layer in enumerate(compensated.model.layers):
        for name, linear in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
            means[index, name] = torch.randn(linear.in_features, generator=generator)
            linear.input_mean.copy_(means[index, name])
    compensated.model.reset_shape_space()
    compensated.set_shape(6, 0.6)
    widths = compensated.shape_space.layer_widths(6, 0.6)
    (size,) = set(widths.values())
    reference_source = tiny_source("llama", attention_bias=True, mlp_bias=True)
    state = {k: v for k, v in source.state_dict().items()}
    for key, value in reference_source.state_dict().items():
        if key.endswith(".bias"):
            state[key] = torch.zeros_like(value)
    for (index, name), mean in means.items():
        module = "self_attn" if name == "o_proj" else "mlp"
        weight = state[f"model.layers.{index}.{module}.{name}.weight"]
        kept = size.key_value_groups * 2 * 16 if name == "o_proj" else size.intermediate_size
        state[f"model.layers.{index}.{module}.{name}.bias"] = weight[:, kept:] @ mean[kept:]
    reference_source.load_state_dict(state)
    reference = pruned_reference(reference_source, list(range(6)), size.key_value_groups, size.intermediate_size)
    ids = tokens()
    with torch.no_grad():
        expected = reference(ids).logits
        assert (compensated(ids).logits - expected).abs().max().item() <= 1e-5
        subnet = compensated.export_subnet()
        assert type(subnet).__name__ == "LlamaForCausalLM"
        assert (subnet(ids).logits - expected).abs().max().item() <= 1e-5
