"""Conversion between source-family configs and the any-shape config, and physical export of one shape."""

import copy
import os
import re

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging

from .configuration_amoeba import SUPPORTED_SOURCE_TYPES, AmoebaConfig
from .shape_space import LayerWidth

logger = logging.get_logger(__name__)

_COMMON_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` if it names a Hub repo (`owner/name`) rather than a local folder, else None.

    Only a Hub id is recorded as `base_model`: a local path means nothing to readers of a published model card.
    """
    if not name_or_path or os.path.exists(name_or_path) or not _HUB_ID.match(name_or_path):
        return None
    return name_or_path


def check_local_source(source: str | os.PathLike, gguf_file: str | None = None) -> None:
    """Refuse a source that names a local path but is no model folder, before transformers reports it as an unknown
    Hub repo id. A path is what exists, starts with `.`, `/` or `~`, or has a separator and is no `owner/name` id."""
    text = os.fspath(source)
    looks_like_path = text.startswith((".", "/", "~")) or (os.sep in text and not _HUB_ID.match(text))
    if not os.path.exists(text):
        if looks_like_path or isinstance(source, os.PathLike):
            raise FileNotFoundError(f"model folder {text} does not exist")
        return
    if not os.path.isdir(text):
        raise ValueError(f"{text} is a file, not a model folder (a folder with config.json; a .gguf goes in gguf_file)")
    if gguf_file is None and not os.path.isfile(os.path.join(text, "config.json")):
        raise FileNotFoundError(f"no config.json in {text}: it is not a model folder")


def amoeba_config_from_source(
    source: PreTrainedConfig,
    min_depth: int | None = None,
    min_width: float = 0.5,
    width_grid: list[float] | None = None,
) -> AmoebaConfig:
    """Any-shape config for a Llama/Mistral/Qwen2 config; other architectures get an error naming the supported."""
    model_type = getattr(source, "model_type", None)
    if model_type == "amoeba":
        raise ValueError("this model is already converted (an any-shape checkpoint, model_type 'amoeba'): calibrate, "
                         "train, export or load it as it is; convert takes a Llama, Mistral or Qwen2 model")
    if model_type not in SUPPORTED_SOURCE_TYPES:
        raise ValueError(
            f"Cannot convert a {model_type!r} model: supported architectures are {', '.join(SUPPORTED_SOURCE_TYPES)} "
            "(Llama covers SmolLM2, TinyLlama and Llama-2/3)."
        )
    fields = {name: getattr(source, name) for name in _COMMON_FIELDS if hasattr(source, name)}
    fields["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    if model_type == "llama":
        fields.update(attention_bias=source.attention_bias, mlp_bias=source.mlp_bias)
    elif model_type == "mistral":
        fields.update(sliding_window=source.sliding_window)
    else:
        if any(kind != "full_attention" for kind in (source.layer_types or [])):
            raise ValueError("Qwen2 checkpoints with sliding-window layers (use_sliding_window=True) are not supported")
        fields.update(qkv_bias=True)
    if width_grid is not None:
        fields["width_grid"] = list(width_grid)
    return AmoebaConfig(
        source_model_type=model_type,
        min_depth=min_depth,
        min_width=min_width,
        base_model=hub_model_id(getattr(source, "name_or_path", None)),
        **fields,
    )


def _family_config(config: AmoebaConfig, depth: int, size: LayerWidth, attention_out_bias: bool,
                   mlp_out_bias: bool) -> PreTrainedConfig:
    """Stock config of the source family for a uniform shape; raises ValueError if the family cannot express it."""
    if (attention_out_bias or mlp_out_bias) and config.source_model_type != "llama":
        raise ValueError(f"{config.source_model_type} has no output-projection biases for bias compensation")
    if config.source_model_type == "llama" and config.hidden_size % size.query_heads:
        raise ValueError(f"LlamaConfig needs hidden_size ({config.hidden_size}) to be a multiple of the query heads "
                         f"({size.query_heads})")
    fields = {name: getattr(config, name) for name in _COMMON_FIELDS}
    fields.update(
        num_hidden_layers=depth,
        num_key_value_heads=size.key_value_groups,
        num_attention_heads=size.query_heads,
        intermediate_size=size.intermediate_size,
        head_dim=config.head_dim,
    )
    if config.source_model_type == "llama":
        fields.update(attention_bias=config.attention_bias or attention_out_bias, mlp_bias=config.mlp_bias or mlp_out_bias)
    elif config.source_model_type == "mistral":
        fields.update(sliding_window=config.sliding_window)
    else:
        fields.update(use_sliding_window=False)
    return AutoConfig.for_model(config.source_model_type, **fields)


def _static_config(config: AmoebaConfig, sizes: list[LayerWidth], attention_out_bias: bool,
                   mlp_out_bias: bool) -> AmoebaConfig:
    """Any-shape config with fixed per-layer sizes and a single shape: the physically sliced subnet (query heads
    group-major, as `_active_tensors` writes them)."""
    fields = config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    fields.update(
        num_hidden_layers=len(sizes),
        layer_num_key_value_heads=[s.key_value_groups for s in sizes],
        layer_num_attention_heads=[s.query_heads for s in sizes],
        attention_unit="kv_groups",
        layer_intermediate_sizes=[s.intermediate_size for s in sizes],
        depth_table=None,
        depth_bridges=None,
        width_compensation=None,
        min_depth=len(sizes),
        min_width=1.0,
        width_grid=[1.0],
        width_mode="uniform",
        bias_compensation=False,
        smol_experts=0,
        attention_bias=config.attention_bias or attention_out_bias,
        mlp_bias=config.mlp_bias or mlp_out_bias,
    )
    return type(config)(**fields)


def _merge_bridge(bridge: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None):
    """down_proj's weight and bias with the layer's active depth bridge T merged in (W <- T W, b <- T b), computed in
    float32 and returned in the weight's dtype; unchanged without a bridge."""
    if bridge is None:
        return weight, bias
    with torch.no_grad():
        merged = (bridge.float() @ weight.float()).to(weight.dtype)
        if bias is not None:
            bias = (bridge.float() @ bias.float()).to(bias.dtype)
    return merged, bias


def _active_tensors(model: PreTrainedModel, merge: bool) -> dict[str, torch.Tensor]:
    """The current shape's weights (width corrections merged, LoRA too if `merge`) under the key names of a compact Llama state dict, query
    heads in the stock group-major order."""
    inner = model.model
    inner.route(deterministic=True)
    tensors = {"model.embed_tokens.weight": inner.embed_tokens.weight, "model.norm.weight": inner.norm.weight}
    tensors["lm_head.weight"] = model.lm_head.weight
    for slot, layer in enumerate(inner.active_layers):
        prefix = f"model.layers.{slot}."
        tensors[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight
        tensors[prefix + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        for name, module in layer.named_modules():
            if hasattr(module, "merged_weight"):
                weight, bias = module.merged_weight() if merge else module.shape_weight(), module.active_bias()
                if name == "self_attn.q_proj":
                    weight = layer.self_attn.stock_head_order(weight, 0)
                    bias = None if bias is None else layer.self_attn.stock_head_order(bias, 0)
                elif name == "self_attn.o_proj":
                    weight = layer.self_attn.stock_head_order(weight, 1)
                elif name == "mlp.down_proj":
                    weight, bias = _merge_bridge(layer.mlp.bridge_map(), weight, bias)
                tensors[f"{prefix}{name}.weight"] = weight
                if bias is not None:
                    tensors[f"{prefix}{name}.bias"] = bias
    return tensors


def build_subnet(model: PreTrainedModel, amoeba_class: type, merge: bool = True) -> PreTrainedModel:
    """Physically sliced copy of `model` at its current shape (see `AmoebaForCausalLM.export_subnet`)."""
    config = model.config
    depth = model.shape.depth
    layer_widths = model.shape_space.layer_widths(*model.shape)
    sizes = [layer_widths[i] for i in sorted(layer_widths)]
    layers = model.model.active_layers
    attention_out_bias = any(layer.self_attn.o_proj.compensation() is not None for layer in layers)
    mlp_out_bias = any(layer.mlp.down_proj.compensation() is not None for layer in layers)
    try:
        if len(set(sizes)) != 1:
            raise ValueError("layers have different widths")
        target_config = _family_config(config, depth, sizes[0], attention_out_bias, mlp_out_bias)
        build = lambda: AutoModelForCausalLM.from_config(target_config, dtype=model.dtype)
    except ValueError as reason:
        logger.warning(
            f"Shape {tuple(model.shape)} is not expressible as a stock {config.source_model_type} config ({reason}); "
            "exporting a static, physically sliced AmoebaForCausalLM instead."
        )
        target_config = _static_config(config, sizes, attention_out_bias, mlp_out_bias)
        build = lambda: amoeba_class(target_config).to(model.dtype)
    with init.no_init_weights():
        target = build()
    source = _active_tensors(model, merge)
    with torch.no_grad():
        for key, tensor in target.state_dict().items():
            if key in source:
                tensor.copy_(source.pop(key))
            elif key.endswith(".bias"):
                tensor.zero_()
            else:
                raise RuntimeError(f"export produced no value for {key}")
    leftover = [key for key in source if not (key == "lm_head.weight" and config.tie_word_embeddings)]
    if leftover:
        raise RuntimeError(f"export target has no place for {leftover}")
    target.tie_weights()
    target.generation_config = copy.deepcopy(model.generation_config)
    return target.eval()
