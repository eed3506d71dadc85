"""Write one shape as a GGUF file for llama.cpp (and the tools built on it: ollama, LM Studio, llama-cpp-python).

Input is the plain `LlamaForCausalLM` that `AmoebaForCausalLM.export_subnet(depth, width)` returns for a uniform
width of a Llama-family model. The file follows llama.cpp's own converter for the `llama` architecture: its tensor
names, Q and K rows permuted into llama.cpp's rotary layout, per-head sizes written explicitly (a width-sliced
subnet has fewer heads, so `hidden_size / heads` is no longer the head size), and the byte-level BPE tokenizer with
its merges, special tokens and chat template.

Biases are written where llama.cpp's `llama` architecture has optional slots for them (`blk.N.attn_{q,k,v,output}.bias`
and `blk.N.ffn_{gate,up,down}.bias`), as F32, and only when non-zero: a subnet calibrated with bias compensation
carries the pruned channels' mean in its `o_proj` / `down_proj` biases while its other biases are zero. The GGUF
metadata has no key for "this model has biases", so transformers' GGUF loader builds a bias-free Llama and silently
drops them unless given `attention_bias` / `mlp_bias` (`transformers_bias_kwargs` reads them from the file).

Tensors are converted and written one at a time (a progress bar counts them), so memory stays near one tensor.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import logging

from ..io import _not_writable, _remove_stale_staging, _staging_prefix, disk_full, output_lock

logger = logging.get_logger(__name__)

GGUF_DTYPES = ("f32", "f16", "q8_0")

_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}

# Per layer, in llama.cpp's order: (HF module, GGUF tensor, whether it can carry a bias). Norms never do.
_LAYER_MODULES = (
    ("input_layernorm", "attn_norm", False),
    ("self_attn.q_proj", "attn_q", True),
    ("self_attn.k_proj", "attn_k", True),
    ("self_attn.v_proj", "attn_v", True),
    ("self_attn.o_proj", "attn_output", True),
    ("post_attention_layernorm", "ffn_norm", False),
    ("mlp.gate_proj", "ffn_gate", True),
    ("mlp.up_proj", "ffn_up", True),
    ("mlp.down_proj", "ffn_down", True),
)
_ATTENTION_BIASES = ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
_MLP_BIASES = ("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")

# llama.cpp's names for the pre-tokenizers a byte-level BPE tokenizer can have here (see `_pre_tokenizer_name`).
_SUPPORTED_PRE_TOKENIZERS = "ByteLevel (GPT-2 split, 'gpt-2') or Digits(individual_digits=True) + ByteLevel ('smollm')"


@dataclass(frozen=True)
class _PlannedTensor:
    name: str
    source: torch.Tensor
    qtype: gguf.GGMLQuantizationType
    permute_heads: int | None


def write_gguf(
    subnet: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    dtype: str = "f32",
    name: str | None = None,
) -> Path:
    """Write `subnet` and `tokenizer` as one GGUF file at `path` (atomically: a temporary file, then a rename).

    `dtype` is the storage type of the 2-D weights: "f32" (exact), "f16" or "q8_0" (8-bit blocks of 32 per row).
    Norm weights are always F32, as in llama.cpp. Q8_0 needs a row length (input features) divisible by 32; a
    tensor whose rows are not (e.g. `down_proj` of a width whose neuron count is not a multiple of 32) is stored
    as F16 instead, and the fallback is logged. `name` becomes `general.name` (default: the file's stem).

    Only a stock `LlamaForCausalLM` with default RoPE qualifies: what `export_subnet(depth, width)` returns for
    uniform widths of a Llama-family source (SmolLM2, TinyLlama, Llama-2), with or without bias compensation.
    Non-zero biases are written as F32 and all-zero ones left out (see the module docstring for reading them back).
    The tokenizer must be a fast byte-level BPE tokenizer (GPT-2 style, as SmolLM2's).
    """
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"Unknown GGUF dtype {dtype!r}; valid: {', '.join(GGUF_DTYPES)}")
    _check_subnet(subnet)
    path = Path(path)
    if path.suffix != ".gguf":
        raise ValueError(f"GGUF output path must end in .gguf, got {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path ending in .gguf")
    config = subnet.config
    plan = _plan_tensors(subnet, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        # A killed writer's temporary file carries the target's staging prefix; holding the lock, none is alive.
        _remove_stale_staging(path)
        _write_gguf_file(path, plan, config, tokenizer, dtype, name)
    return path


def _write_gguf_file(path: Path, plan: list, config, tokenizer, dtype: str, name: str | None) -> None:
    try:
        handle, temporary = tempfile.mkstemp(prefix=_staging_prefix(path), suffix=".tmp", dir=path.parent)
    except PermissionError:
        raise _not_writable(path) from None
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp's 0600 would make the finished file private
    try:
        writer = gguf.GGUFWriter(temporary, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(name or path.stem)
        _add_model_metadata(writer, config, dtype)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor in plan:
            shape = tuple(tensor.source.shape)
            if tensor.qtype == gguf.GGMLQuantizationType.Q8_0:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, tensor.qtype)
                writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)),
                                       raw_dtype=tensor.qtype)
            else:
                numpy_dtype = np.dtype(np.float16 if tensor.qtype == gguf.GGMLQuantizationType.F16 else np.float32)
                writer.add_tensor_info(tensor.name, shape, numpy_dtype, int(np.prod(shape)) * numpy_dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tqdm(plan, desc=f"GGUF {dtype}", unit="tensor", leave=False):
            writer.write_tensor_data(_convert(tensor))
        writer.close()
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        full = disk_full(error, path)
        if full is not None:
            raise full from None
        raise


def _check_subnet(subnet: torch.nn.Module) -> None:
    """Refuse what the `llama` GGUF architecture (as written here) cannot hold, naming the shapes that qualify."""
    qualifying = (
        "GGUF export takes the stock LlamaForCausalLM that model.export_subnet(depth, width) returns for a uniform "
        "width of a Llama-family model (SmolLM2, TinyLlama, Llama-2)"
    )
    if type(subnet) is not LlamaForCausalLM:
        kind = getattr(subnet.config, "model_type", None)
        raise ValueError(f"{qualifying}; got {type(subnet).__name__} (model_type {kind!r})")
    config = subnet.config
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"{qualifying}; this subnet uses {rope_type!r} RoPE scaling, only 'default' is written")


def _plan_tensors(subnet: LlamaForCausalLM, dtype: str) -> list[_PlannedTensor]:
    """(GGUF name, tensor, storage type, heads to permute by) for every tensor, in llama.cpp's order.

    All-zero biases are left out: llama.cpp treats a missing optional bias as none, and a file without them stays
    the size (and the tensor list) of a bias-free model.
    """
    config = subnet.config
    state = subnet.state_dict()
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    for index in range(config.num_hidden_layers):
        for module, gguf_module, has_bias in _LAYER_MODULES:
            names[f"model.layers.{index}.{module}.weight"] = f"blk.{index}.{gguf_module}.weight"
            if has_bias:
                names[f"model.layers.{index}.{module}.bias"] = f"blk.{index}.{gguf_module}.bias"
    names["model.norm.weight"] = "output_norm.weight"
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    unexpected = sorted(set(state) - set(names) - {"lm_head.weight"})
    if unexpected:
        raise ValueError(f"GGUF export has no tensor name for {unexpected}")
    plan = []
    for key, gguf_name in names.items():
        if key.endswith(".bias") and (key not in state or not state[key].any()):
            continue
        tensor = state[key]
        heads = None
        if ".q_proj." in key:
            heads = config.num_attention_heads
        elif ".k_proj." in key:
            heads = config.num_key_value_heads
        plan.append(_PlannedTensor(gguf_name, tensor, _storage_type(gguf_name, tensor, dtype), heads))
    return plan


def _storage_type(name: str, tensor: torch.Tensor, dtype: str) -> gguf.GGMLQuantizationType:
    if tensor.ndim == 1 or dtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if tensor.shape[-1] % block:
        logger.warning(f"{name}: row length {tensor.shape[-1]} is not a multiple of {block}, stored as F16 not Q8_0")
        return gguf.GGMLQuantizationType.F16
    return gguf.GGMLQuantizationType.Q8_0


def _convert(tensor: _PlannedTensor) -> np.ndarray:
    """The tensor as GGUF stores it: Q and K rows (weights and biases) in llama.cpp's rotary order, cast or quantized."""
    array = tensor.source.detach().to(device="cpu", dtype=torch.float32).numpy()
    if tensor.permute_heads is not None:
        heads, rows = tensor.permute_heads, array.shape[0]
        array = array.reshape(heads, 2, rows // heads // 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
    if tensor.qtype == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(array, tensor.qtype)
    if tensor.qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return np.ascontiguousarray(array)


def _add_model_metadata(writer: gguf.GGUFWriter, config, dtype: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # A width-sliced subnet keeps head_dim while losing heads: llama.cpp would otherwise assume hidden/heads.
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer, or ValueError for one it would split wrongly.

    'gpt-2' is the GPT-2 regex (what `ByteLevel(use_regex=True)` applies); 'smollm' splits every digit off first,
    then applies the GPT-2 regex, which is SmolLM2's `Digits(individual_digits=True)` + `ByteLevel`.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1] if steps else {}
    if byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex", True) and not byte_level.get(
        "add_prefix_space", False
    ):
        if len(steps) == 1:
            return "gpt-2"
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
            return "smollm"
    raise ValueError(f"Cannot write this tokenizer's pre-tokenizer {json.dumps(pre)} to GGUF; supported: "
                     f"{_SUPPORTED_PRE_TOKENIZERS}")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """Vocabulary, token types, merges, special ids, add-BOS/EOS flags and chat template, as llama.cpp reads them.

    Ids the tokenizer does not use up to the model's vocabulary size become `[PAD<id>]` tokens of type UNUSED,
    as llama.cpp's converter does.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    model_type = tokenizer_json["model"]["type"]
    if model_type != "BPE" or tokenizer_json.get("normalizer") is not None:
        raise ValueError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2's) without a "
                         f"normalizer; this one is {model_type} with normalizer {tokenizer_json.get('normalizer')}")
    pre = _pre_tokenizer_name(tokenizer_json)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"The tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has "
                         f"{vocab_size} entries: they do not belong together")
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_tokens = len(with_special) > len(plain)
    special_vocab.add_special_token["bos"] = adds_tokens and with_special[0] == tokenizer.bos_token_id
    special_vocab.add_special_token["eos"] = adds_tokens and with_special[-1] == tokenizer.eos_token_id
    special_vocab.add_to_gguf(writer, quiet=True)


def transformers_bias_kwargs(path: str | os.PathLike) -> dict[str, bool]:
    """`attention_bias` / `mlp_bias` for `from_pretrained(..., gguf_file=...)`, from the bias tensors in the file.

    transformers derives a Llama config from GGUF metadata alone, which never sets these, so without them it loads
    a bias-free model and silently ignores the file's bias tensors.
    """
    names = {tensor.name.split(".", 2)[-1] for tensor in gguf.GGUFReader(path).tensors if tensor.name.endswith(".bias")}
    return {"attention_bias": bool(names & set(_ATTENTION_BIASES)), "mlp_bias": bool(names & set(_MLP_BIASES))}


__all__ = ["GGUF_DTYPES", "transformers_bias_kwargs", "write_gguf"]
