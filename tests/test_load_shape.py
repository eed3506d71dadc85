"""Shape at load time: `from_pretrained(..., depth=, width=)`, a default shape saved in the config, `pipeline`."""

import json

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source, tiny_tokenizer
from test_shapes_tiny import DEPTH_TABLE

from amoeba_hf import AmoebaForCausalLM

IDS = [[5, 17, 33, 8, 91, 4, 60, 22]]

LOAD_AT_SHAPES = """
import json, torch
from transformers import AutoModel, AutoModelForCausalLM, pipeline
folder = FOLDER
ids = torch.tensor(IDS)
results = {}

def logits(model):
    with torch.no_grad():
        return model(ids).logits

model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, depth=4, width=0.75).eval()
results["kwargs"] = (list(model.shape), logits(model))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, depth=3, width=1).eval()
results["int_width"] = (list(model.shape), logits(model))
backbone = AutoModel.from_pretrained(folder, trust_remote_code=True, depth=4, width=0.75).eval()
with torch.no_grad():
    results["backbone"] = (list(backbone.shape), backbone(ids).last_hidden_state)
generator = pipeline("text-generation", model=folder, trust_remote_code=True, model_kwargs={"depth": 4, "width": 0.75})
results["pipeline"] = (list(generator.model.shape), generator("w5 w17 w33", max_new_tokens=4, do_sample=False,
                                                                 return_tensors=True)[0])
try:
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, depth=1)
except ValueError as error:
    results["invalid"] = str(error)
torch.save(results, OUT)
"""


def amoeba_checkpoint(family: str, folder, **config_fields) -> AmoebaForCausalLM:
    model = AmoebaForCausalLM.from_llama(tiny_source(family), min_depth=3).eval()
    model.update_shape_space(depth_table=DEPTH_TABLE)
    for name, value in config_fields.items():
        setattr(model.config, name, value)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_keyword_shape_at_load_equals_set_shape_where_amoeba_hf_is_not_installed(tmp_path, family):
    model = amoeba_checkpoint(family, tmp_path / "ckpt")
    out = tmp_path / "out.pt"
    code = f"FOLDER, OUT, IDS = {str(tmp_path / 'ckpt')!r}, {str(out)!r}, {IDS!r}\n" + LOAD_AT_SHAPES
    result = run_without_amoeba_hf(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(out)
    ids = torch.tensor(IDS)
    for key, shape in (("kwargs", (4, 0.75)), ("int_width", (3, 1.0))):
        assert loaded[key][0] == list(shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded[key][1], model.set_shape(*shape)(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        expected_hidden = model.set_shape(4, 0.75).model(ids).last_hidden_state
        expected_text = model.generate(ids[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert loaded["backbone"][0] == [4, 0.75]
    torch.testing.assert_close(loaded["backbone"][1], expected_hidden, rtol=1e-5, atol=1e-5)
    assert loaded["pipeline"][0] == [4, 0.75]
    assert loaded["pipeline"][1]["generated_token_ids"] == expected_text[0].tolist()
    assert "depth 1 is not in the shape space" in loaded["invalid"]


def test_a_default_shape_saved_in_the_config_opens_the_model_there_and_keywords_override_it(tmp_path):
    amoeba_checkpoint("llama", tmp_path / "ckpt", depth=4, width=0.5)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["depth"] == 4
    assert AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt").shape == (4, 0.5)
    assert AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt", width=0.75).shape == (4, 0.75)
    assert AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt", depth=6, width=1.0).shape == (6, 1.0)
    with pytest.raises(ValueError, match=r"width 0\.2 is outside \[0\.5, 1\.0\]"):
        AmoebaForCausalLM.from_pretrained(tmp_path / "ckpt", width=0.2)
