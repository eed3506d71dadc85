"""Loading refuses a checkpoint it would otherwise load wrongly without a word: weights that do not match config.json
(a random layer added, a layer dropped), and weight files with flipped bytes or cut short.

The checks run in the files that travel with the checkpoint, so they are tested where amoeba_hf is not importable,
through the CLI, and in this process.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source
from safetensors.torch import load_file, save_file

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import main
from amoeba_hf.modeling.checkpoint_files import WEIGHT_HASHES_FILE, CheckpointMismatchError, CorruptWeightsError

IDS = torch.tensor([[5, 17, 33, 8, 91, 4]])


def edit_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.pop("depth_table")
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


def flip_a_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))


def truncate(folder: Path, keep_record: bool = True) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    if not keep_record:
        (folder / WEIGHT_HASHES_FILE).unlink()


BREAKAGES = {
    "intact": lambda folder: None,
    "claims-7-layers": lambda folder: edit_config(folder, num_hidden_layers=7),
    "claims-5-layers": lambda folder: edit_config(folder, num_hidden_layers=5),
    "flipped-byte": flip_a_byte,
    "truncated": truncate,
    "truncated-without-record": lambda folder: truncate(folder, keep_record=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """One folder per breakage of the same tiny 6-layer checkpoint."""
    root = tmp_path_factory.mktemp("checkpoints")
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3)
    model.save_pretrained(root / "intact")
    for name, breakage in BREAKAGES.items():
        if name != "intact":
            shutil.copytree(root / "intact", root / name)
            breakage(root / name)
    return root


REMOTE_LOADS = """
import json
from transformers import AutoModelForCausalLM
outcomes = {}
for name in NAMES:
    try:
        AutoModelForCausalLM.from_pretrained(f"{ROOT}/{name}", trust_remote_code=True)
        outcomes[name] = None
    except Exception as error:
        outcomes[name] = {"bases": [base.__name__ for base in type(error).__mro__], "message": str(error)}
print(json.dumps(outcomes))
"""


@pytest.fixture(scope="module")
def remote_outcomes(checkpoints) -> dict:
    """What `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` does with each folder, in one
    process where amoeba_hf is not importable."""
    result = run_without_amoeba_hf(f"ROOT, NAMES = {str(checkpoints)!r}, {list(BREAKAGES)!r}\n" + REMOTE_LOADS,
                                   cwd=checkpoints)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_intact_checkpoint_loads_without_amoeba_hf(remote_outcomes):
    assert remote_outcomes["intact"] is None


@pytest.mark.parametrize(
    "name, listed",
    [("claims-7-layers", "9 weights the config expects are missing from the checkpoint (model.layers.6."),
     ("claims-5-layers", "9 weights in the checkpoint are not part of the config's model (model.layers.5.")],
)
def test_config_that_does_not_match_the_weights_is_refused_with_the_weight_names(remote_outcomes, name, listed):
    outcome = remote_outcomes[name]
    assert outcome is not None, f"{name} loaded"
    assert outcome["bases"][:2] == ["CheckpointMismatchError", "ValueError"]
    assert f"{name} do not match its config.json" in outcome["message"]
    assert listed in outcome["message"] and "and 3 more" in outcome["message"]
    assert "\n" not in outcome["message"]


@pytest.mark.parametrize(
    "name, reason",
    [("flipped-byte", f"its sha256 differs from the one recorded in {WEIGHT_HASHES_FILE}"),
     ("truncated", f"its sha256 differs from the one recorded in {WEIGHT_HASHES_FILE}"),
     ("truncated-without-record", "bytes where the header declares")],
)
def test_corrupt_weight_file_is_refused_naming_the_file(remote_outcomes, name, reason):
    outcome = remote_outcomes[name]
    assert outcome is not None, f"{name} loaded"
    assert outcome["bases"][:2] == ["CorruptWeightsError", "OSError"]
    message = outcome["message"]
    assert message.startswith("model.safetensors of ") and name in message and "is corrupt or truncated" in message
    assert reason in message and "re-download the checkpoint or save it again" in message and "\n" not in message


@pytest.mark.parametrize("name", ["claims-7-layers", "flipped-byte", "truncated-without-record"])
def test_cli_reports_a_broken_checkpoint_in_one_line(checkpoints, capsys, name):
    assert main(["shapes", str(checkpoints / name)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    progress = "Loading weights:"  # transformers' progress bar, which the CLI leaves on
    (line,) = [line for line in captured.err.strip().splitlines() if not line.startswith(progress)]
    assert line.startswith("amoeba shapes: error: ") and name in line


def test_caller_asking_for_loading_info_gets_it_instead_of_the_refusal(checkpoints):
    model, info = AmoebaForCausalLM.from_pretrained(checkpoints / "claims-7-layers", output_loading_info=True)
    assert model.config.num_hidden_layers == 7
    assert {key for key in info["missing_keys"] if key.startswith("model.layers.6.")} == set(info["missing_keys"])
    assert len(info["missing_keys"]) == 9 and not info["unexpected_keys"]


def test_plain_llama_checkpoint_loads_with_calibration_buffers_and_experts_filled_in(tmp_path):
    """Buffers and LoRA experts absent as a whole are legitimately initialised: the function is the source's."""
    source = tiny_source("llama")
    source.save_pretrained(tmp_path / "llama")
    config = AmoebaForCausalLM.from_llama(source, min_depth=3).enable_smol(experts=2, rank=4).config
    config.bias_compensation = True
    model = AmoebaForCausalLM.from_pretrained(tmp_path / "llama", config=config)
    assert model.config.smol_experts == 2
    assert all(not buffer.any() for name, buffer in model.named_buffers() if name.endswith("input_mean"))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, source(IDS).logits)


def test_checkpoint_missing_some_of_its_experts_is_refused(tmp_path):
    model = AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).enable_smol(experts=2, rank=4)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.3.mlp.up_proj.lora_B"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / WEIGHT_HASHES_FILE).unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    del config["weights_digest"]  # as saved by other code: only the loading check can tell
    (tmp_path / "config.json").write_text(json.dumps(config))
    missing = r"1 weights the config expects .*\(model\.layers\.3\.mlp\.up_proj\.lora_B\)"
    with pytest.raises(CheckpointMismatchError, match=missing):
        AmoebaForCausalLM.from_pretrained(tmp_path)


def test_resaving_over_an_older_checkpoint_records_the_new_hashes(checkpoints, tmp_path):
    folder = tmp_path / "resaved"
    shutil.copytree(checkpoints / "flipped-byte", folder)
    with pytest.raises(CorruptWeightsError):
        AmoebaForCausalLM.from_pretrained(folder)
    AmoebaForCausalLM.from_pretrained(checkpoints / "intact").save_pretrained(folder)
    assert (folder / WEIGHT_HASHES_FILE).read_bytes() == (checkpoints / "intact" / WEIGHT_HASHES_FILE).read_bytes()
    AmoebaForCausalLM.from_pretrained(folder)


def test_unreadable_hash_record_is_refused(checkpoints, tmp_path):
    folder = tmp_path / "bad-record"
    shutil.copytree(checkpoints / "intact", folder)
    (folder / WEIGHT_HASHES_FILE).write_text('["model.safetensors"]')
    with pytest.raises(CorruptWeightsError, match=f"{WEIGHT_HASHES_FILE} of .*bad-record is not a JSON object"):
        AmoebaForCausalLM.from_pretrained(folder)
