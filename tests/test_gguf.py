"""GGUF export: transformers' independent GGUF loader must give back the elastic model's logits and the tokenizer.

Files with biases are loaded with `attention_bias` / `mlp_bias` from `transformers_bias_kwargs`: transformers builds
its config from GGUF metadata, which has no key for biases, and would otherwise drop them.
"""

import os

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_source, tiny_tokenizer, write_tiny_text
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.deploy.gguf import transformers_bias_kwargs, write_gguf
from amoeba_hf.selection.calibrate import CalibrationSettings, calibrate

CORPUS = [
    "The quick brown fox jumps over the lazy dog 12 times.",
    "def add(a, b):\n    return a + b  # 2024",
    "Héllo wörld, unicode ✓ and emoji 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]
TEXTS = [*CORPUS, "1234 x99", "  two  spaces\n\ttab"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SHAPES = [(6, 1.0), (4, 0.75), (3, 0.5)]
# F16 keeps 11 significant bits (relative error <= 4.9e-4 per weight); Q8_0 stores each block of 32 weights as
# int8 times the block's max/127 (error <= 0.4% of the block max). Through 6 random layers these gave at most
# 8e-4 (F16) and 1.8e-2 (Q8_0) on logits of magnitude <= 1.6; the bounds leave ~3x headroom. The argmax must agree
# wherever the reference's top-2 margin exceeds twice the measured error (no error that small can flip it).
TOLERANCES = {"f32": 1e-4, "f16": 3e-3, "q8_0": 5e-2}


def byte_level_tokenizer(split_digits: bool = True) -> PreTrainedTokenizerFast:
    """A small GPT-2 style byte-level BPE tokenizer trained offline (SmolLM2's layout: digits split when asked)."""
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def elastic(tokenizer):
    """Tiny any-shape Llama whose vocabulary is 3 ids larger than the tokenizer's (padding ids, as real models have)."""
    return AmoebaForCausalLM.from_llama(tiny_source("llama", vocab_size=len(tokenizer) + 3), min_depth=3).eval()


@pytest.fixture(scope="module")
def calibrated(tokenizer, tmp_path_factory):
    """The tiny any-shape Llama calibrated with bias compensation (the default), so sliced shapes export biases."""
    model = AmoebaForCausalLM.from_llama(tiny_source("llama", vocab_size=len(tokenizer) + 3), min_depth=3).eval()
    data = write_tiny_text(tmp_path_factory.mktemp("calibration") / "calib.jsonl")
    settings = CalibrationSettings(data=str(data), samples=6, seq_len=24, chunk_size=2)
    calibrate(model, tiny_tokenizer(), settings, show_progress=False)
    assert model.config.bias_compensation
    return model


def load_gguf(path, **config_overrides) -> AutoModelForCausalLM:
    kwargs = {**transformers_bias_kwargs(path), **config_overrides}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()


def gguf_arrays(path) -> dict[str, np.ndarray]:
    """Tensor name -> values of the unquantized (F32) tensors of a GGUF file, in PyTorch's (out, in) order."""
    return {tensor.name: np.array(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
            for tensor in gguf.GGUFReader(path).tensors if tensor.tensor_type.name == "F32"}


def gguf_metadata(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> storage type name) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
    fields["tokenizer.ggml.pre"] = reader.fields["tokenizer.ggml.pre"].contents()
    return fields, {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def assert_logits_close(reference: torch.Tensor, exported: torch.Tensor, tolerance: float) -> None:
    """Max |difference| within `tolerance`, and the same argmax wherever an error that small cannot flip it."""
    error = (reference - exported).abs().max().item()
    assert error <= tolerance
    top2 = reference.topk(2, dim=-1).values
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * error
    assert decisive.sum() >= decisive.numel() // 4
    assert torch.equal(reference.argmax(-1)[decisive], exported.argmax(-1)[decisive])


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
def test_gguf_reloads_to_the_elastic_logits(elastic, tokenizer, tmp_path, shape, dtype):
    path = write_gguf(elastic.export_subnet(*shape), tokenizer, tmp_path / "subnet.gguf", dtype=dtype)
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.gguf"]
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), elastic.shaped(*shape):
        reference = elastic(ids).logits
        exported = load_gguf(path)(ids).logits
    assert_logits_close(reference, exported, TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_carries_bias_compensation(calibrated, tokenizer, tmp_path, dtype):
    """Only the non-zero compensation biases (o_proj, down_proj) are written, as F32 at every dtype, and reload."""
    subnet = calibrated.export_subnet(4, 0.75)
    assert subnet.config.attention_bias and subnet.config.mlp_bias
    path = write_gguf(subnet, tokenizer, tmp_path / "compensated.gguf", dtype=dtype)
    types = gguf_metadata(path)[1]
    biases = {name for name in types if name.endswith(".bias")}
    assert biases == {f"blk.{i}.{kind}.bias" for i in range(4) for kind in ("attn_output", "ffn_down")}
    assert {types[name] for name in biases} == {"F32"}
    arrays, state = gguf_arrays(path), subnet.state_dict()
    for index in range(4):
        for module, name in (("self_attn.o_proj", "attn_output"), ("mlp.down_proj", "ffn_down")):
            expected = state[f"model.layers.{index}.{module}.bias"].numpy()
            assert np.array_equal(arrays[f"blk.{index}.{name}.bias"], expected)
    assert transformers_bias_kwargs(path) == {"attention_bias": True, "mlp_bias": True}
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), calibrated.shaped(4, 0.75):
        reference = calibrated(ids).logits
        assert_logits_close(reference, load_gguf(path)(ids).logits, TOLERANCES[dtype])
        # The compensation matters: read back without biases (transformers' default) the logits move by ~0.59 here,
        # far beyond every dtype's tolerance, so the check above could not pass with the biases lost.
        without = load_gguf(path, attention_bias=False, mlp_bias=False)(ids).logits
    assert (reference - without).abs().max().item() > 5 * TOLERANCES["q8_0"]


def test_gguf_source_biases_are_permuted_like_their_weights(tokenizer, tmp_path):
    """A source with q/k/v/o and MLP biases: Q and K biases follow the rotary row permutation of their weights."""
    source = tiny_source("llama", vocab_size=len(tokenizer), attention_bias=True, mlp_bias=True)
    elastic = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(2))
    for shape in [(6, 1.0), (4, 0.75)]:
        path = write_gguf(elastic.export_subnet(*shape), tokenizer, tmp_path / f"biased_{shape[0]}.gguf")
        kinds = {name.split(".", 2)[-1] for name in gguf_metadata(path)[1] if name.endswith(".bias")}
        assert kinds == {f"{kind}.bias" for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                    "ffn_up", "ffn_down")}
        with torch.no_grad(), elastic.shaped(*shape):
            assert_logits_close(elastic(ids).logits, load_gguf(path)(ids).logits, TOLERANCES["f32"])


def test_gguf_metadata_and_q8_0_fallback(elastic, tokenizer, tmp_path):
    """3x0.5 has 2 KV groups (4 heads of 16 while hidden/heads = 24) and 40 neurons (ffn_down rows not % 32)."""
    subnet = elastic.export_subnet(3, 0.5)
    fields, types = gguf_metadata(write_gguf(subnet, tokenizer, tmp_path / "s.gguf", dtype="q8_0", name="tiny"))
    assert fields["general.name"] == "tiny"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "s.gguf").stat().st_mode & 0o777 == 0o666 & ~umask
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 16
    assert fields["llama.feed_forward_length"] == 40 and fields["llama.block_count"] == 3
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.ggml.pre"] == "smollm"
    assert "output.weight" not in types
    assert types["blk.0.ffn_down.weight"] == "F16"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"


def test_gguf_untied_head_is_written(tokenizer, tmp_path):
    source = tiny_source("llama", vocab_size=len(tokenizer), tie_word_embeddings=False)
    elastic = AmoebaForCausalLM.from_llama(source, min_depth=3).eval()
    path = write_gguf(elastic.export_subnet(4, 0.75), tokenizer, tmp_path / "untied.gguf")
    assert "output.weight" in gguf_metadata(path)[1]
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), elastic.shaped(4, 0.75):
        assert_logits_close(elastic(ids).logits, load_gguf(path)(ids).logits, TOLERANCES["f32"])


@pytest.mark.parametrize("split_digits, pre", [(True, "smollm"), (False, "gpt-2")])
def test_gguf_tokenizer_round_trip(elastic, tmp_path, split_digits, pre):
    tokenizer = byte_level_tokenizer(split_digits)
    path = write_gguf(elastic.export_subnet(3, 0.5), tokenizer, tmp_path / "t.gguf")
    assert gguf_metadata(path)[0]["tokenizer.ggml.pre"] == pre
    reloaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert reloaded.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi 42"}]
    assert reloaded.apply_chat_template(messages, tokenize=True) == tokenizer.apply_chat_template(messages, tokenize=True)
    special = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(reloaded, name) for name in special] == [getattr(tokenizer, name) for name in special]


def test_gguf_refuses_what_it_cannot_write(elastic, tokenizer, tmp_path):
    subnet = elastic.export_subnet(3, 0.5)
    with pytest.raises(ValueError, match="valid: f32, f16, q8_0"):
        write_gguf(subnet, tokenizer, tmp_path / "a.gguf", dtype="q4_k")
    with pytest.raises(ValueError, match="uniform width of a Llama-family model.*got AmoebaForCausalLM"):
        write_gguf(elastic, tokenizer, tmp_path / "a.gguf")
    mistral = AmoebaForCausalLM.from_llama(tiny_source("mistral"), min_depth=3).export_subnet(3, 0.5)
    with pytest.raises(ValueError, match="got MistralForCausalLM"):
        write_gguf(mistral, tokenizer, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="byte-level BPE.*WordLevel"):
        write_gguf(AmoebaForCausalLM.from_llama(tiny_source("llama"), min_depth=3).export_subnet(3, 0.5),
                   tiny_tokenizer(), tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="must end in .gguf"):
        write_gguf(subnet, tokenizer, tmp_path / "a.bin")
    assert list(tmp_path.iterdir()) == []


def test_gguf_failed_write_leaves_nothing(elastic, tokenizer, tmp_path, monkeypatch):
    """A crash while writing tensors removes the partial file and keeps an existing file at the path intact."""
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(elastic.export_subnet(3, 0.5), tokenizer, target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == b"previous"
