"""Every door into the config validates alike: config.json, keyword arguments of `from_pretrained` (which transformers
would set after validation) and `update_shape_space`. Settings that say what the stored weights mean cannot be changed
by a keyword argument, and weight files of another stage are refused: config.json records the digest of its weights.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_source
from transformers import AutoModelForCausalLM

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.modeling.checkpoint_files import WEIGHT_HASHES_FILE, CheckpointMismatchError, weights_digest
from amoeba_hf.modeling.configuration_amoeba import AmoebaConfigError, weight_layout
from amoeba_hf.modeling.modeling_amoeba import SHAPE_SPACE_KEYS

IDS = torch.tensor([[5, 17, 33, 8, 91, 4]])
BAD_VALUES = {
    "min_width": 1.5,
    "min_depth": 0,
    "width_grid": [],
    "width_mode": "bogus",
    "attention_unit": "bogus",
    "depth_table": {"6": [0, 1, 2, 3, 4, 5], "3": [0, 1]},
}
LAYOUT_CHANGES = {"attention_unit": "kv_groups", "width_mode": "global", "bias_compensation": False}


def calibrated_model() -> AmoebaForCausalLM:
    """Tiny model permuted as calibration leaves it: query-head slots reordered, bias compensation means stored."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    generator = torch.Generator().manual_seed(3)
    layers = model.model.layers
    slot_orders = [torch.stack([torch.randperm(2, generator=generator) for _ in range(3)]) for _ in layers]
    neuron_orders = [torch.randperm(layer.mlp.down_proj.in_features, generator=generator) for layer in layers]
    means = [(torch.randn(layer.self_attn.o_proj.in_features, generator=generator),
              torch.randn(layer.mlp.down_proj.in_features, generator=generator)) for layer in layers]
    model.model.permute_widths(slot_orders, neuron_orders, input_means=means, attention_unit="query_heads")
    return model


@torch.no_grad()
def full_logits(model: AmoebaForCausalLM) -> torch.Tensor:
    return model.set_shape(*model.shape_space.full_shape)(IDS).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """An uncalibrated and a calibrated checkpoint of the same tiny source, and the calibrated model's logits."""
    root = tmp_path_factory.mktemp("doors")
    plain = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).eval()
    calibrated = calibrated_model().eval()
    plain.save_pretrained(root / "plain")
    calibrated.save_pretrained(root / "calibrated")
    return {"root": root, "plain": root / "plain", "calibrated": root / "calibrated"}


def config_json_error(folder: Path, tmp_path: Path, **fields) -> str:
    """The error loading gives when config.json itself holds `fields`."""
    copy = shutil.copytree(folder, tmp_path / "edited")
    config = json.loads((copy / "config.json").read_text())
    config.update(fields)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(AmoebaConfigError) as error:
        AmoebaForCausalLM.from_pretrained(copy)
    return str(error.value)


@pytest.mark.parametrize("key", BAD_VALUES)
def test_bad_keyword_is_refused_like_config_json(folders, tmp_path, key):
    value = BAD_VALUES[key]
    expected = config_json_error(folders["plain"], tmp_path, **{key: value})
    with pytest.raises(AmoebaConfigError, match=f"^{re.escape(expected)}$"):
        AmoebaForCausalLM.from_pretrained(folders["plain"], **{key: value})
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        AutoModelForCausalLM.from_pretrained(folders["plain"], trust_remote_code=True, **{key: value})
    if key in SHAPE_SPACE_KEYS:
        model = AmoebaForCausalLM.from_pretrained(folders["plain"])
        with pytest.raises(AmoebaConfigError, match=f"^{re.escape(expected)}$"):
            model.update_shape_space(**{key: value})


@pytest.mark.parametrize("key", LAYOUT_CHANGES)
def test_weight_layout_cannot_be_changed_when_loading(folders, key):
    with pytest.raises(AmoebaConfigError, match=f"^{key}=.* only calibration changes it"):
        AmoebaForCausalLM.from_pretrained(folders["calibrated"], **{key: LAYOUT_CHANGES[key]})
    saved = json.loads((folders["calibrated"] / "config.json").read_text()).get(key, False)
    model = AmoebaForCausalLM.from_pretrained(folders["calibrated"], **{key: saved})
    assert model.config.attention_unit == "query_heads"


def test_weights_of_another_stage_are_refused(folders, tmp_path):
    """The uncalibrated weights and their hash record copied into the calibrated folder: every file is intact and the
    calibration buffers are missing as a whole (which a plain Llama checkpoint may be), so only the digest tells."""
    mixed = shutil.copytree(folders["calibrated"], tmp_path / "mixed")
    for name in ("model.safetensors", WEIGHT_HASHES_FILE):
        shutil.copy(folders["plain"] / name, mixed / name)
    message = "^the weights of .* are not the ones this config.json was saved with"
    with pytest.raises(CheckpointMismatchError, match=message):
        AmoebaForCausalLM.from_pretrained(mixed)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(mixed, trust_remote_code=True)


def test_weights_of_another_stage_without_their_record_are_refused(folders, tmp_path):
    """The same mix with the hash record deleted: the weight files themselves are hashed and compared."""
    mixed = shutil.copytree(folders["calibrated"], tmp_path / "mixed")
    shutil.copy(folders["plain"] / "model.safetensors", mixed / "model.safetensors")
    (mixed / WEIGHT_HASHES_FILE).unlink()
    message = "^the weights of .* are not the ones this config.json was saved with.* its weight files \\(it has no"
    with pytest.raises(CheckpointMismatchError, match=message):
        AmoebaForCausalLM.from_pretrained(mixed)
    (mixed / "model.safetensors").unlink()
    shutil.copy(folders["calibrated"] / "model.safetensors", mixed / "model.safetensors")
    model = AmoebaForCausalLM.from_pretrained(mixed).eval()
    torch.testing.assert_close(full_logits(model), full_logits(calibrated_model().eval()), rtol=0, atol=0)


@pytest.mark.parametrize("key", LAYOUT_CHANGES)
def test_weight_layout_edited_in_config_json_is_refused(folders, tmp_path, key):
    """An edit of config.json's weight layout would change what every stored weight means (t13 of the sweep:
    attention_unit switched on a calibrated checkpoint loaded, and its full shape was no longer the base model)."""
    edited = shutil.copytree(folders["calibrated"], tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config[key] = LAYOUT_CHANGES[key]
    (edited / "config.json").write_text(json.dumps(config))
    message = "^the weights of .* are not the ones this config.json was saved with.*or config.json's layout edited"
    with pytest.raises(CheckpointMismatchError, match=message):
        AmoebaForCausalLM.from_pretrained(edited)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(edited, trust_remote_code=True)


@pytest.mark.parametrize("name", ["plain", "calibrated"])
def test_round_trips_record_the_weights_digest(folders, tmp_path, name):
    """Save, load, save again: the full shape stays the model's, config.json's digest names the weights beside it,
    and keyword arguments that are valid still choose the shape and the shape space."""
    model = AmoebaForCausalLM.from_pretrained(folders[name]).eval()
    model.save_pretrained(tmp_path / "again")
    for folder in (folders[name], tmp_path / "again"):
        hashes = json.loads((folder / WEIGHT_HASHES_FILE).read_text())
        config = json.loads((folder / "config.json").read_text())
        assert config["weights_digest"] == weights_digest(hashes, weight_layout(config))
    reloaded = AmoebaForCausalLM.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(full_logits(reloaded), full_logits(model), rtol=0, atol=0)
    shaped = AmoebaForCausalLM.from_pretrained(
        tmp_path / "again", depth=3, width=0.75, min_width=0.75, width_grid=[1.0, 0.75]
    ).eval()
    assert tuple(shaped.shape) == (3, 0.75) and shaped.shape_space.width_grid == [1.0, 0.75]
    with torch.no_grad():
        torch.testing.assert_close(shaped(IDS).logits, model.set_shape(3, 0.75)(IDS).logits)
