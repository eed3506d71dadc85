"""Checkpoints: remote-code loading where amoeba_hf is not importable, bit-identical round trips, bad files."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source
from test_shapes_tiny import DEPTH_TABLE
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaForCausalLM

SHAPES = [(6, 1.0), (4, 0.75), (3, 0.5)]
IDS = [[5, 17, 33, 8, 91, 4, 60, 22], [9, 9, 41, 3, 77, 12, 50, 6]]

LOAD_AND_RESAVE = """
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
folder, out, resaved = FOLDER, OUT, RESAVED
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
assert config.model_type == "amoeba" and type(config).__module__.startswith("transformers_modules"), type(config)
base = AutoModel.from_pretrained(folder, trust_remote_code=True)
assert type(base).__name__ == "AmoebaModel", type(base)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.tensor(IDS)
results = {}
for depth, width in SHAPES:
    model.set_shape(depth, width)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    results[f"{depth}x{width}"] = {"logits": logits, "generated": generated}
torch.save(results, out)
model.set_shape(6, 1.0)
model.save_pretrained(resaved)
print("ok")
"""


def script(folder: Path, out: Path, resaved: Path) -> str:
    return (
        f"FOLDER, OUT, RESAVED = {str(folder)!r}, {str(out)!r}, {str(resaved)!r}\n"
        f"IDS = {IDS!r}\nSHAPES = {SHAPES!r}\n" + LOAD_AND_RESAVE
    )


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_remote_code_load_without_amoeba_hf_and_bit_identical_round_trip(tmp_path, family):
    model = AmoebaForCausalLM.from_llama(tiny_source(family), min_depth=3).eval()
    model.config.depth_table = DEPTH_TABLE
    model.model.reset_shape_space()
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert {p.name for p in folder.glob("*.py")} >= {"modeling_amoeba.py", "configuration_amoeba.py"}

    result = run_without_amoeba_hf(script(folder, tmp_path / "out.pt", tmp_path / "resaved"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    remote = torch.load(tmp_path / "out.pt")
    ids = torch.tensor(IDS)
    for depth, width in SHAPES:
        model.set_shape(depth, width)
        with torch.no_grad():
            assert torch.equal(remote[f"{depth}x{width}"]["logits"], model(ids).logits)
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(remote[f"{depth}x{width}"]["generated"], generated)

    resaved = tmp_path / "resaved"
    for original in folder.iterdir():
        assert (resaved / original.name).read_bytes() == original.read_bytes(), original.name


def test_exported_plain_subnet_loads_with_stock_transformers(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    subnet = model.export_subnet(4, 0.75)
    subnet.save_pretrained(tmp_path / "subnet")
    assert not list((tmp_path / "subnet").glob("*.py"))
    ids = torch.tensor(IDS)
    with torch.no_grad():
        torch.save(model.set_shape(4, 0.75)(ids).logits, tmp_path / "expected.pt")
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'subnet')!r}).eval()
        assert type(model) is LlamaForCausalLM
        assert model.config.num_hidden_layers == 4 and model.config.num_key_value_heads == 2
        with torch.no_grad():
            logits = model(torch.tensor({IDS!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r}))
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_truncated_weights_give_a_clear_error(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def test_config_of_another_model_type_is_rejected_with_supported_list(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="supported architectures are llama, mistral, qwen2"):
        AmoebaForCausalLM.from_llama(tmp_path)


def test_inconsistent_depth_table_is_rejected():
    from amoeba_hf import AmoebaConfig
    from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError

    with pytest.raises(AmoebaConfigError, match=r"depth_table\['3'\] must list exactly 3 layers, got 2"):
        AmoebaConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, depth_table={"3": [0, 1]})
    with pytest.raises(AmoebaConfigError, match=r"min_depth must be in \[1, 6\], got 9"):
        AmoebaConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4, min_depth=9)
