"""generate() at any shape: with and without KV cache, greedy and beam, eager and sdpa, left-padded batches."""

import pytest
import torch
from conftest import pruned_reference, tiny_source
from test_shapes_tiny import DEPTH_TABLE

from amoeba_hf import AmoebaForCausalLM

SHAPES = [(6, 1.0), (5, 1.0), (4, 0.7), (3, 0.5)]  # with DEPTH_TABLE, every depth below 6 drops layer 0


def build(family: str, attn_implementation: str):
    source = tiny_source(family)
    source.config._attn_implementation = attn_implementation
    model = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    model.config._attn_implementation = attn_implementation
    model.config.depth_table = DEPTH_TABLE
    model.model.reset_shape_space()
    return source, model


def left_padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 97, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :4] = 0
    mask[1, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def generate(model, inputs, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, pad_token_id=0, do_sample=False, **kwargs)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"d{d}-w{w}" for d, w in SHAPES])
def test_generate_equals_pruned_reference_with_and_without_cache(family, attn, shape):
    source, model = build(family, attn)
    model.set_shape(*shape)
    widths = model.shape_space.layer_widths(*shape)
    (size,) = set(widths.values())
    reference = pruned_reference(source, sorted(widths), size.key_value_groups, size.intermediate_size)
    reference.config._attn_implementation = attn
    inputs = left_padded_batch()
    expected_greedy = generate(reference, inputs)
    assert torch.equal(generate(model, inputs, use_cache=True), expected_greedy)
    assert torch.equal(generate(model, inputs, use_cache=False), expected_greedy)
    expected_beam = generate(reference, inputs, num_beams=3)
    assert torch.equal(generate(model, inputs, num_beams=3, use_cache=True), expected_beam)
    assert torch.equal(generate(model, inputs, num_beams=3, use_cache=False), expected_beam)


def test_switching_shapes_between_generate_calls():
    source, model = build("llama", "sdpa")
    inputs = left_padded_batch()
    outputs = {}
    for shape in [(6, 1.0), (3, 0.5), (5, 0.8), (6, 1.0), (3, 0.5)]:
        model.set_shape(*shape)
        outputs.setdefault(shape, []).append(generate(model, inputs))
    for shape, runs in outputs.items():
        assert all(torch.equal(runs[0], run) for run in runs)
        widths = model.shape_space.layer_widths(*shape)
        (size,) = set(widths.values())
        reference = pruned_reference(source, sorted(widths), size.key_value_groups, size.intermediate_size)
        assert torch.equal(runs[0], generate(reference, inputs))


def test_cache_filled_at_another_shape_is_rejected():
    _, model = build("llama", "sdpa")
    ids = left_padded_batch()["input_ids"]
    model.set_shape(5, 1.0)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
        model(ids[:, -1:], cache=cache, use_cache=True)
        model.set_shape(4, 0.7)
        with pytest.raises(ValueError, match="cannot be reused across shapes"):
            model(ids[:, -1:], cache=cache, use_cache=True)


def test_compact_cache_slots_hold_only_active_layers():
    _, model = build("llama", "sdpa")
    model.set_shape(3, 0.5)  # layers 2, 4, 5: layer 0 is skipped
    with torch.no_grad():
        cache = model(left_padded_batch()["input_ids"], use_cache=True).cache
    filled = [i for i, layer in enumerate(cache.layers) if getattr(layer, "keys", None) is not None and layer.keys.numel()]
    assert filled == [0, 1, 2]
    assert cache.get_seq_length() == 9
    assert cache.layers[0].keys.shape[1] == 2  # 2 of 3 KV heads at width 0.5
