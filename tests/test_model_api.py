"""The model API that tooling uses (layer loop, width permutation, shape-space updates, shape vocabulary), checked
against stock models and against the behaviour it replaced."""

import pytest
import torch
from conftest import pruned_reference, tiny_source

from amoeba_hf import AmoebaForCausalLM, Shape
from amoeba_hf.deploy.profile import time_set_shape
from amoeba_hf.modeling.shape_space import parse_shapes, shape_key
from amoeba_hf.selection.depth import LayerRunner

SEQ_LEN = 14  # longer than the tiny Mistral's sliding window of 5


def mistral_pair():
    source = tiny_source("mistral", num_hidden_layers=6, sliding_window=5)
    return source, AmoebaForCausalLM.from_llama(source, min_depth=3).eval()


def random_ids(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("removed", [frozenset(), frozenset({1, 3}), frozenset({0, 2, 4})])
def test_layer_runner_matches_a_stock_sliding_window_mistral_with_the_layers_removed(removed):
    source, model = mistral_pair()
    ids = random_ids()
    kept = [i for i in range(6) if i not in removed]
    reference = pruned_reference(source, kept, key_value_groups=3, neurons=80)
    with torch.no_grad():
        expected = reference.model(ids).last_hidden_state
        expected_logits = reference(ids).logits
    runner = LayerRunner(model, ids, chunk_size=2)
    states = torch.cat(runner.final_states(removed))
    torch.testing.assert_close(states, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(states), expected_logits, rtol=0, atol=1e-5)
    runner.cache_layer_inputs()
    boundary = min(removed, default=0)
    torch.testing.assert_close(torch.cat(runner.final_states(removed, boundary)), expected, rtol=0, atol=1e-5)


def test_layer_runner_applies_the_padding_mask_like_the_stock_model():
    source, model = mistral_pair()
    ids = random_ids(batch=2, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, as in the multiple-choice calibration batches
    reference = pruned_reference(source, [0, 1, 2, 5], key_value_groups=3, neurons=80)
    with torch.no_grad():
        expected = reference.model(ids, attention_mask=mask).last_hidden_state
    states = torch.cat(LayerRunner(model, ids, mask, chunk_size=1).final_states(frozenset({3, 4})))
    valid = mask.bool()
    torch.testing.assert_close(states[valid], expected[valid], rtol=0, atol=1e-5)


def test_forward_is_prepare_inputs_then_run_layers_over_the_active_layers():
    source, model = mistral_pair()
    ids = random_ids(batch=2)
    model.set_shape(4, 0.75)
    inner = model.model
    kept = model.shape_space.kept_layers(4)
    assert isinstance(inner.active_layers, tuple)
    assert list(inner.active_layers) == [inner.layers[i] for i in kept]
    assert [layer.self_attn.layer_idx for layer in inner.active_layers] == [0, 1, 2, 3]
    with torch.no_grad():
        inputs = inner.prepare_inputs(ids)
        by_hand = inner.norm(inner.run_layers(inputs.inputs_embeds, inner.active_layers, inputs))
        assert torch.equal(by_hand, inner(ids).last_hidden_state)
        captured = model(ids, output_hidden_states=True).hidden_states
        expected = pruned_reference(source, kept, key_value_groups=2, neurons=60)(ids, output_hidden_states=True)
    assert inputs.layer_kwargs["sliding_window"] == 5
    assert len(captured) == len(expected.hidden_states) == 5
    for ours, theirs in zip(captured, expected.hidden_states):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_update_shape_space_validates_and_leaves_the_config_unchanged_on_error():
    _, model = mistral_pair()
    before = model.config.to_dict()
    with pytest.raises(ValueError, match="width_grid value 0.5 is outside"):
        model.update_shape_space(min_width=0.7, width_grid=[1.0, 0.5])
    with pytest.raises(ValueError, match="depth_table\\['2'\\] must list exactly 2 layers"):
        model.update_shape_space(depth_table={"6": list(range(6)), "2": [0]})
    with pytest.raises(ValueError, match="cannot set \\['num_hidden_layers'\\]; valid keys: depth_table"):
        model.update_shape_space(num_hidden_layers=3)
    assert model.config.to_dict() == before
    model.set_shape(4, 0.75)
    model.update_shape_space(depth_table={"6": list(range(6)), "5": [0, 1, 2, 3, 5]}, min_depth=5)
    assert model.shape == Shape(6, 1.0)
    assert model.shape_space.depths == [6, 5]
    assert model.model.shape_space.kept_layers(5) == [0, 1, 2, 3, 5]


def test_permute_widths_keeps_the_function_and_sets_buffers_and_modes_together():
    _, model = mistral_pair()
    ids = random_ids(batch=2)
    with torch.no_grad():
        before = model(ids).logits
    generator = torch.Generator().manual_seed(0)
    groups = [torch.randperm(3, generator=generator) for _ in range(6)]
    neurons = [torch.randperm(80, generator=generator) for _ in range(6)]
    importance = [(torch.randn(3, generator=generator), torch.randn(80, generator=generator)) for _ in range(6)]
    means = [(torch.randn(96, generator=generator), torch.randn(80, generator=generator)) for _ in range(6)]
    model.model.permute_widths(groups, neurons, input_means=means, importance=importance)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-5)
    attention, mlp = model.model.layers[2].self_attn, model.model.layers[2].mlp
    assert model.config.width_mode == "global" and model.config.bias_compensation
    assert torch.equal(mlp.neuron_importance, importance[2][1][neurons[2]])
    assert torch.equal(attention.o_proj.input_mean.view(3, -1), means[2][0].view(3, -1)[groups[2]])
    identity = [torch.arange(3)] * 6, [torch.arange(80)] * 6
    model.model.permute_widths(*identity)
    assert model.config.width_mode == "uniform" and not model.config.bias_compensation
    assert not hasattr(mlp, "neuron_importance") and not hasattr(attention.o_proj, "input_mean")
    with pytest.raises(ValueError, match="group_orders must have one entry per layer \\(6\\), got 2"):
        model.model.permute_widths(groups[:2], neurons)
    model.enable_smol(experts=2)
    with pytest.raises(ValueError, match="before enable_smol"):
        model.model.permute_widths(*identity)


def test_shape_vocabulary_round_trips_and_temporary_shapes_are_restored():
    _, model = mistral_pair()
    space = model.shape_space
    assert space.full_shape == Shape(6, 1.0) == (6, 1.0)
    assert shape_key(*space.full_shape) == "6x1" and shape_key(4, 0.75) == "4x0.75"
    assert parse_shapes("6x1, 4x0.75,4x0.75", space) == [(6, 1.0), (4, 0.75)]
    assert parse_shapes("grid", space) == space.grid()
    with pytest.raises(ValueError, match="must be DEPTHxWIDTH"):
        parse_shapes("6-1", space)
    model.set_shape(5, 0.75)
    times = time_set_shape(model, [(4, 0.5), (6, 1.0)], switches=3)
    assert len(times) == 3 and model.shape == Shape(5, 0.75)
    with pytest.raises(RuntimeError), model.shaped(3, 0.5):
        assert model.shape == Shape(3, 0.5)
        raise RuntimeError
    assert model.shape == Shape(5, 0.75)
