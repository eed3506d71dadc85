"""A shape exported as plain subnet + standard peft adapter must reload (peft's own loader) to the elastic logits."""

import json

import pytest
import torch
from conftest import tiny_source, tiny_tokenizer
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.deploy.peft_adapter import export_adapter

SHAPES = [(6, 1.0), (4, 0.75), (3, 0.5)]


def trained_looking(family: str, exact_full_shape: bool = False) -> AmoebaForCausalLM:
    """Tiny any-shape model with SMoL experts whose B (zero at init) and router are random, as after training."""
    model = AmoebaForCausalLM.from_llama(tiny_source(family), min_depth=3)
    model.enable_smol(experts=3, top_k=2, rank=4, alpha=8.0, exact_full_shape=exact_full_shape)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.3)
            elif "shape_router" in name:
                parameter.normal_(0.0, 1.0)
    return model.eval()


def reload(out) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    return PeftModel.from_pretrained(base, out / "adapter").eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_adapter_reloads_to_the_elastic_logits(family, tmp_path):
    model = trained_looking(family)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    for depth, width in SHAPES:
        out = export_adapter(model, depth, width, tmp_path / f"{depth}x{width}", tokenizer=tiny_tokenizer())
        assert model.shape == (6, 1.0)
        reloaded = reload(out)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad(), model.shaped(depth, width):
            reference = model(ids).logits
            adapted = reloaded(ids).logits
            base_only = plain(ids).logits
            merged = model.export_subnet(depth, width)(ids).logits
        assert (adapted - reference).abs().max() <= 1e-5
        assert (base_only - reference).abs().max() > 1e-2  # the adapter carries the shape's LoRA, not the base
        assert (reloaded.merge_and_unload()(ids).logits - merged).abs().max() <= 1e-5
        assert PreTrainedTokenizerFast.from_pretrained(out)("w3 w50 w96")["input_ids"] == [3, 50, 96]


def test_adapter_config_is_standard_lora(tmp_path):
    out = export_adapter(trained_looking("llama"), 4, 0.75, tmp_path / "shape")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and not config["use_rslora"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str(out)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


def test_adapter_refusals_write_nothing(tmp_path):
    exact = trained_looking("llama", exact_full_shape=True)
    with pytest.raises(ValueError, match=r"Shape \(6, 1.0\) has no adapter: .*smol_exact_full_shape"):
        export_adapter(exact, 6, 1.0, tmp_path / "full")
    export_adapter(exact, 4, 0.75, tmp_path / "sliced")  # other shapes of that model do have one
    plain = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    with pytest.raises(ValueError, match="no SMoL experts"):
        export_adapter(plain, 4, 0.75, tmp_path / "plain")
    with pytest.raises(FileExistsError, match="not empty"):
        export_adapter(exact, 4, 0.75, tmp_path / "sliced")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sliced"]
