"""Sharded checkpoints (`--max-shard-size`, transformers' own `max_shard_size`): every command that writes a checkpoint
can split its weights into model-0000X-of-0000N.safetensors shards with an index, in the source's dtype, and every
load and push check applies to each shard: a flipped byte or a missing shard is refused by name, at load (also
through remote code, where amoeba_hf is not importable) and at push, before anything is sent.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_without_amoeba_hf, tiny_source, tiny_tokenizer, write_tiny_text
from safetensors import safe_open
from test_hub import amoeba_cli, assert_refused_and_nothing_sent, hub_env, local_hub  # noqa: F401 (fixture)

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.cli import build_parser, main
from amoeba_hf.io import DEFAULT_MAX_SHARD_SIZE, save_checkpoint
from amoeba_hf.modeling.checkpoint_files import (
    WEIGHT_HASHES_FILE,
    WEIGHTS_INDEX_FILE,
    CheckpointMismatchError,
    CorruptWeightsError,
)

SHARD = "100KB"  # the tiny bf16 model (~0.7 MB) becomes 7 shards
SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
IDS = torch.tensor([[5, 17, 33, 8, 91, 4, 60, 22]])
SHAPES = [(6, 1.0), (4, 0.75), (3, 0.5)]


def shards(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if SHARD_NAME.fullmatch(path.name))


def stored_dtypes(folder: Path) -> dict[str, str]:
    """Every stored tensor's dtype, over all weight files of the folder."""
    dtypes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            dtypes.update((key, weights.get_slice(key).get_dtype()) for key in weights.keys())
    return dtypes


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as weights:
            tensors.update((key, weights.get_tensor(key)) for key in weights.keys())
    return tensors


def is_base_weight(key: str) -> bool:
    """The source model's own weights and biases (projections, norms, embeddings, an export's compensation biases);
    calibration statistics, depth bridges, LoRA experts and the router are not, and stay fp32."""
    return key.endswith((".weight", ".bias")) and ".shape_router." not in key


def assert_sharded_in_bf16(folder: Path, record: bool = True) -> list[Path]:
    """N > 1 shards, named and indexed as transformers writes them, each in the hash record; base weights bf16 in
    every shard (what is not a base weight, i.e. calibration statistics, experts and router, is fp32)."""
    files = shards(folder)
    assert len(files) > 1, sorted(path.name for path in folder.iterdir())
    assert {SHARD_NAME.fullmatch(path.name).group(2) for path in files} == {f"{len(files):05d}"}
    assert not (folder / "model.safetensors").exists()
    index = json.loads((folder / WEIGHTS_INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {path.name for path in files}
    if record:
        hashes = json.loads((folder / WEIGHT_HASHES_FILE).read_text())
        assert set(hashes) == {path.name for path in files} | {WEIGHTS_INDEX_FILE}
    for path in files:
        with safe_open(str(path), "pt") as weights:
            for key in weights.keys():
                expected = "BF16" if is_base_weight(key) else "F32"
                assert weights.get_slice(key).get_dtype() == expected, (path.name, key)
    return files


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def logits(model, shapes=SHAPES) -> dict:
    outputs = {}
    with torch.no_grad():
        for shape in shapes:
            with model.shaped(*shape):
                outputs[shape] = model(IDS).logits
    return outputs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A bf16 tiny Llama source converted by the CLI twice: as one file (the default) and in shards."""
    root = tmp_path_factory.mktemp("sharding")
    tiny_source("llama", max_position_embeddings=256).to(torch.bfloat16).save_pretrained(root / "source")
    tiny_tokenizer().save_pretrained(root / "source")
    base = ["convert", str(root / "source"), "--min-depth", "3", "--out"]
    assert main([*base, str(root / "single")]) == 0
    assert main([*base, str(root / "sharded"), "--max-shard-size", SHARD]) == 0
    return root


def broken_copy(root: Path, name: str, breakage) -> Path:
    folder = root / name
    if not folder.exists():
        shutil.copytree(root / "sharded", folder)
        breakage(folder)
    return folder


def flipped(root: Path) -> Path:
    return broken_copy(root, "flipped", lambda folder: flip_a_byte(shards(folder)[1]))


def missing(root: Path) -> Path:
    return broken_copy(root, "missing", lambda folder: shards(folder)[1].unlink())


def second_shard(root: Path) -> str:
    return shards(root / "sharded")[1].name


def test_convert_writes_shards_in_the_source_dtype_holding_exactly_the_single_files_tensors(root):
    assert [path.name for path in root.joinpath("single").glob("*.safetensors")] == ["model.safetensors"]
    assert_sharded_in_bf16(root / "sharded")
    single, sharded = stored_tensors(root / "single"), stored_tensors(root / "sharded")
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[key], sharded[key]) and single[key].dtype == sharded[key].dtype for key in single)


def test_sharded_checkpoint_loads_to_the_same_logits_as_the_single_file(root):
    single = AmoebaForCausalLM.from_pretrained(root / "single").eval()
    sharded = AmoebaForCausalLM.from_pretrained(root / "sharded").eval()
    assert sharded.dtype == torch.bfloat16
    expected, found = logits(single), logits(sharded)
    assert all(torch.equal(expected[shape], found[shape]) for shape in SHAPES)


REMOTE_LOADS = """
import json, torch
from transformers import AutoModelForCausalLM
outcomes = {}
for name in NAMES:
    try:
        model = AutoModelForCausalLM.from_pretrained(f"{ROOT}/{name}", trust_remote_code=True).eval()
    except Exception as error:
        outcomes[name] = {"bases": [base.__name__ for base in type(error).__mro__], "message": str(error)}
        continue
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        torch.save({shape: model.set_shape(*shape)(IDS).logits for shape in SHAPES}, f"{ROOT}/{name}.logits.pt")
    outcomes[name] = None
print(json.dumps(outcomes))
"""


def test_remote_code_loads_a_sharded_checkpoint_and_refuses_a_corrupt_or_missing_shard(root):
    """`AutoModelForCausalLM.from_pretrained(trust_remote_code=True)` where amoeba_hf is not importable."""
    names = ["sharded", flipped(root).name, missing(root).name]
    header = f"ROOT, NAMES, SHAPES, IDS = {str(root)!r}, {names!r}, {SHAPES!r}, __import__('torch').tensor({IDS.tolist()})\n"
    result = run_without_amoeba_hf(header + REMOTE_LOADS, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])

    assert outcomes["sharded"] is None
    loaded, expected = torch.load(root / "sharded.logits.pt"), logits(AmoebaForCausalLM.from_pretrained(root / "single"))
    assert all(torch.equal(loaded[shape], expected[shape]) for shape in SHAPES)
    shard = second_shard(root)
    assert outcomes["flipped"]["bases"][:2] == ["CorruptWeightsError", "OSError"]
    assert outcomes["flipped"]["message"].startswith(f"{shard} of {root / 'flipped'} is corrupt or truncated")
    assert outcomes["missing"]["bases"][:2] == ["CorruptWeightsError", "OSError"]
    assert f"{root / 'missing'} has no {shard}, which {WEIGHT_HASHES_FILE} lists" in outcomes["missing"]["message"]


def test_corrupt_or_missing_shard_is_refused_at_load_naming_it(root):
    shard = second_shard(root)
    with pytest.raises(CorruptWeightsError, match=rf"^{shard} of .*flipped is corrupt or truncated: its sha256"):
        AmoebaForCausalLM.from_pretrained(flipped(root))
    with pytest.raises(CorruptWeightsError, match=rf"missing has no {shard}, which {WEIGHT_HASHES_FILE} lists"):
        AmoebaForCausalLM.from_pretrained(missing(root))


def test_edited_shard_index_is_refused_at_load(root):
    """The index says where each tensor lives; it is in the hash record too."""

    def swap_two_entries(folder: Path) -> None:
        index = json.loads((folder / WEIGHTS_INDEX_FILE).read_text())
        keys = sorted(index["weight_map"])
        first, last = keys[0], keys[-1]
        index["weight_map"][first], index["weight_map"][last] = index["weight_map"][last], index["weight_map"][first]
        (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index))

    folder = broken_copy(root, "edited-index", swap_two_entries)
    with pytest.raises(CorruptWeightsError, match=rf"^{re.escape(WEIGHTS_INDEX_FILE)} of .* is corrupt or truncated"):
        AmoebaForCausalLM.from_pretrained(folder)


def test_sharded_checkpoint_pushes_and_loads_by_repo_id_without_amoeba_hf(root, local_hub, tmp_path):
    env = hub_env(local_hub, tmp_path)
    result = amoeba_cli(["push", str(root / "sharded"), "tester/sharded"], tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    pushed = local_hub.files("tester/sharded")
    assert {path.name for path in shards(root / "sharded")} | {WEIGHTS_INDEX_FILE, WEIGHT_HASHES_FILE} <= set(pushed)
    load = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("tester/sharded", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.save({{shape: model.set_shape(*shape)(torch.tensor({IDS.tolist()})).logits for shape in {SHAPES!r}}},
                       {str(tmp_path / 'hub.pt')!r})
    """
    result = run_without_amoeba_hf(load, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, expected = torch.load(tmp_path / "hub.pt"), logits(AmoebaForCausalLM.from_pretrained(root / "single"))
    assert all(torch.equal(loaded[shape], expected[shape]) for shape in SHAPES)


@pytest.mark.parametrize("kind", ["flipped", "missing", "swapped-with-record"])
def test_push_refuses_a_corrupt_missing_or_swapped_shard_and_sends_nothing(root, local_hub, tmp_path, kind):
    shard = second_shard(root)
    if kind == "flipped":
        folder, message = flipped(root), f"{shard} of {root / 'flipped'} is corrupt or truncated: its sha256 differs"
    elif kind == "missing":
        folder, message = missing(root), f"{root / 'missing'} has no {shard}, which {WEIGHT_HASHES_FILE} lists"
    else:
        # Another model's shards, index and hash record together: each file matches the record, but config.json's
        # weights_digest names the weights saved with it.
        other = tmp_path / "other"
        model = AmoebaForCausalLM.from_llama(tiny_source("llama", seed=1, max_position_embeddings=256), min_depth=3)
        save_checkpoint(model.to(torch.bfloat16), tiny_tokenizer(), other, max_shard_size=SHARD)
        folder = tmp_path / "swapped"
        shutil.copytree(root / "sharded", folder)
        assert [path.name for path in shards(other)] == [path.name for path in shards(folder)]
        for path in [*shards(other), other / WEIGHTS_INDEX_FILE, other / WEIGHT_HASHES_FILE]:
            shutil.copy(path, folder / path.name)
        message = f"the weights of {folder} are not the ones this config.json was saved with"
        with pytest.raises(CheckpointMismatchError, match=re.escape(message)):
            AmoebaForCausalLM.from_pretrained(folder)

    result = amoeba_cli(["push", str(folder), "tester/refused"], tmp_path, hub_env(local_hub, tmp_path))

    assert_refused_and_nothing_sent(result, local_hub, message)


def test_every_stage_and_export_write_shards_in_bf16(root, tmp_path, local_hub):
    """calibrate, train and export (a plain Llama subnet, which has no hash record) honour --max-shard-size and keep
    the bf16 base; the exported shards load with stock transformers to the logits of the same export in memory."""
    text = write_tiny_text(tmp_path / "text.jsonl")
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "w5 w6 w7", "input": "", "output": "w8 w9 w10 w11"}] * 12))
    commands = [
        ["calibrate", str(root / "sharded"), "--data", str(text), "--samples", "4", "--seq-len", "24",
         "--widths", "1,0.75,0.5", "--out", str(tmp_path / "calibrated")],
        ["train", str(tmp_path / "calibrated"), "--data", str(instructions), "--steps", "2", "--batch-size", "2",
         "--grad-accum", "1", "--experts", "2", "--rank", "2", "--teacher", "base", "--out", str(tmp_path / "trained")],
        ["export", str(tmp_path / "trained"), "--depth", "4", "--width", "0.75", "--out", str(tmp_path / "subnet")],
    ]
    for command in commands:
        assert main([*command, "--max-shard-size", SHARD]) == 0, command
    assert_sharded_in_bf16(tmp_path / "calibrated")
    trained_shards = assert_sharded_in_bf16(tmp_path / "trained")
    assert any(key.endswith("lora_A") for key in stored_dtypes(tmp_path / "trained"))
    assert len(trained_shards) > 1

    assert_sharded_in_bf16(tmp_path / "subnet", record=False)
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    subnet = AutoModelForCausalLM.from_pretrained(tmp_path / "subnet").eval()
    assert type(subnet) is LlamaForCausalLM and subnet.dtype == torch.bfloat16
    trained = AmoebaForCausalLM.from_pretrained(tmp_path / "trained").eval()
    with torch.no_grad():
        assert torch.equal(subnet(IDS).logits, trained.export_subnet(4, 0.75).eval()(IDS).logits)

    shard = shards(tmp_path / "subnet")[1]
    shard.unlink()
    result = amoeba_cli(["push", str(tmp_path / "subnet"), "tester/refused"], tmp_path, hub_env(local_hub, tmp_path))
    assert_refused_and_nothing_sent(result, local_hub, f"has no {shard.name}, which its weight index lists")


WRITERS = {
    "convert": ["convert"],
    "calibrate": ["calibrate", "--data", "x.jsonl"],
    "reconstruct": ["reconstruct", "--data", "x.jsonl"],
    "train": ["train", "--data", "x.jsonl"],
    "build": ["build"],
    "export": ["export", "model", "--depth", "4"],
    "search": ["search", "model"],
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_command_that_writes_a_checkpoint_takes_max_shard_size(command):
    parser = build_parser()
    args = parser.parse_args([*WRITERS[command], "--out" if command != "search" else "--export", "new"])
    assert args.max_shard_size == DEFAULT_MAX_SHARD_SIZE == "5GB"
    args = parser.parse_args([*WRITERS[command], "--out" if command != "search" else "--export", "new",
                              "--max-shard-size", "2GB"])
    assert args.max_shard_size == "2GB"


@pytest.mark.parametrize("size", ["lots", "0", "-5GB"])
def test_unreadable_shard_size_is_refused_before_any_work(root, tmp_path, capsys, size):
    out = tmp_path / "never"
    assert main(["convert", str(root / "source"), "--out", str(out), f"--max-shard-size={size}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"amoeba convert: error: --max-shard-size must be a positive size such as 5GB, 500MB or 2000000 "
                    f"(bytes), got {size!r}")
    assert not out.exists()


def test_gguf_export_refuses_a_shard_size(root, tmp_path, capsys):
    result = main(["export", str(root / "sharded"), "--depth", "4", "--gguf", str(tmp_path / "x.gguf"),
                   "--max-shard-size", "1GB"])
    assert result == 2
    assert "--max-shard-size applies only with --out, --push or --adapter" in capsys.readouterr().err
