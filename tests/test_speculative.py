"""Self-speculative decoding: a smaller shape of the same weights drafts for a larger one."""

import pytest
import torch
from conftest import tiny_source

from amoeba_hf import AmoebaForCausalLM

IDS = torch.tensor([[5, 17, 33, 8, 91, 4]])


@pytest.fixture(scope="module")
def trained_looking():
    """A tiny model with SMoL experts whose LoRA updates are non-zero, so every shape has its own gates' update."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    model.enable_smol(experts=3, top_k=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "shape_router" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def greedy(model, **kwargs) -> torch.Tensor:
    return model.generate(IDS, max_new_tokens=24, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize("target, draft", [((6, 1.0), (3, 0.5)), ((5, 0.75), (4, 0.75)), ((6, 1.0), (6, 0.6)),
                                           ((4, 0.6), (3, 0.5))])
def test_assisted_greedy_equals_plain_greedy_of_the_target_shape(trained_looking, target, draft):
    model = trained_looking.set_shape(*target)
    expected = greedy(model)
    view = model.shape_view(*draft)
    view.generation_config.num_assistant_tokens = 4
    view.generation_config.assistant_confidence_threshold = 0.0
    assert torch.equal(greedy(model, assistant_model=view), expected)
    assert torch.equal(greedy(model, assistant_model=view), expected), "second call with the same draft"
    assert model.shape == target and view.shape == draft
    with model.shaped(*draft):
        draft_alone = greedy(model)
    assert not torch.equal(draft_alone, expected), "the draft shape must differ, or the test proves nothing"


def test_a_shape_view_shares_every_weight_and_keeps_its_own_shape(trained_looking):
    model = trained_looking.set_shape(6, 1.0)
    view = model.shape_view(3, 0.5)
    shared = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert all(id(t) in shared for t in view.parameters())
    own = [name for name, t in view.named_buffers() if id(t) not in shared]
    assert own == ["model.shape_router.code"], "only the view's shape code (one float per layer) is its own"
    assert view.model.layers[0] is not model.model.layers[0]
    view.set_shape(4, 0.75)
    assert model.shape == (6, 1.0)
    with torch.no_grad():
        reference = model.shape_view(4, 0.75)
        torch.testing.assert_close(view(IDS).logits, model.set_shape(4, 0.75)(IDS).logits, rtol=0, atol=0)
        assert reference.shape == (4, 0.75)
    model.set_shape(6, 1.0)
