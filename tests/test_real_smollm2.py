"""The same guarantees on the real SmolLM2-135M-Instruct (30 layers, 9 query heads over 3 KV groups)."""

import pytest
import torch
from conftest import pruned_reference

from amoeba_hf import AmoebaForCausalLM

pytestmark = pytest.mark.real_model

# Full, depth-only, width-only, both, between grid points, smallest; one more drops layer 0 (custom table).
SHAPES = [(30, 1.0), (24, 1.0), (30, 0.75), (27, 0.8), (21, 0.625), (15, 0.5)]


@pytest.fixture(scope="module")
def amoeba(smollm2_source):
    return AmoebaForCausalLM.from_llama(smollm2_source).eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2_tokenizer):
    texts = ["The capital of France is Paris, and the capital of Italy is", "Water boils at"]
    smollm2_tokenizer.padding_side = "left"
    return smollm2_tokenizer(texts, return_tensors="pt", padding=True)


def reference(source, model, depth, width):
    widths = model.shape_space.layer_widths(depth, width)
    (size,) = set(widths.values())
    return pruned_reference(source, sorted(widths), size.key_value_groups, size.intermediate_size)


@pytest.mark.parametrize("shape", SHAPES, ids=[f"d{d}-w{w}" for d, w in SHAPES])
def test_real_shape_matches_pruned_llama_and_export(smollm2_source, amoeba, prompt_ids, shape):
    amoeba.set_shape(*shape)
    expected_model = reference(smollm2_source, amoeba, *shape)
    with torch.no_grad():
        expected = expected_model(**prompt_ids).logits
        elastic = amoeba(**prompt_ids).logits
        subnet = amoeba.export_subnet()
        exported = subnet(**prompt_ids).logits
    assert (elastic - expected).abs().max().item() <= 1e-5
    assert (exported - expected).abs().max().item() <= 1e-5
    assert type(subnet).__name__ == "LlamaForCausalLM"
    assert subnet.num_parameters() == expected_model.num_parameters() == amoeba.shape_space.parameter_count(*shape)


def test_real_shape_dropping_layer_0(smollm2_source, amoeba, prompt_ids):
    kept = list(range(1, 30))
    amoeba.config.depth_table = {**amoeba.shape_space.depth_table, "29": kept}
    amoeba.model.reset_shape_space()
    amoeba.set_shape(29, 0.9)
    expected_model = reference(smollm2_source, amoeba, 29, 0.9)
    with torch.no_grad():
        diff = (amoeba(**prompt_ids).logits - expected_model(**prompt_ids).logits).abs().max().item()
    assert diff <= 1e-5
    cached = amoeba.generate(**prompt_ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert torch.equal(cached, amoeba.generate(**prompt_ids, max_new_tokens=12, do_sample=False, use_cache=False))
    assert torch.equal(cached, expected_model.generate(**prompt_ids, max_new_tokens=12, do_sample=False))


def test_real_full_shape_generates_the_source_text(smollm2_source, amoeba, smollm2_tokenizer):
    amoeba.set_shape(30, 1.0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = smollm2_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ours = amoeba.generate(**inputs, max_new_tokens=10, do_sample=False)
    theirs = smollm2_source.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)
    assert "Paris" in smollm2_tokenizer.decode(ours[0, inputs["input_ids"].shape[1]:])
