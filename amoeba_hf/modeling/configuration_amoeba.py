"""Configuration of the any-shape model: a Llama-style architecture plus the shape space it can be cut to."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.models.llama.configuration_llama import LlamaConfig

SUPPORTED_SOURCE_TYPES = ("llama", "mistral", "qwen2")
WIDTH_MODES = ("uniform", "global")
ATTENTION_UNITS = ("kv_groups", "query_heads")
# What the stored weights mean: their layout (`attention_unit`) and the calibration results they carry. Calibration sets
# them together with the weights, so a config.json value is never overridden by a keyword argument of `from_pretrained`.
WEIGHT_LAYOUT_FIELDS = ("attention_unit", "width_mode", "bias_compensation", "depth_bridges", "width_compensation",
                        "width_compensation_rank")
# The sizes of the stored tensors: a keyword argument changing one would build a model the weights do not fit.
WEIGHT_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim")
SMOL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AUTO_MAP = {
    "AutoConfig": "configuration_amoeba.AmoebaConfig",
    "AutoModel": "modeling_amoeba.AmoebaModel",
    "AutoModelForCausalLM": "modeling_amoeba.AmoebaForCausalLM",
}


class AmoebaConfigError(ValueError):
    """An any-shape config field holds a value outside its valid range; the message names the field."""


@strict
class AmoebaConfig(LlamaConfig):
    """Llama-style config extended with the shape space of AmoebaLLM.

    A *shape* is `(depth, width)`. `depth_table[str(d)]` lists the layer indices kept at depth `d` (missing
    table: drop layers from the end, always keeping the last one). `width` is the fraction of decoder
    attention+MLP parameters kept; every layer keeps a prefix of its importance-ordered KV groups and MLP
    neurons, the same fraction everywhere (`width_mode="uniform"`) or one global importance threshold
    (`width_mode="global"`, needs calibrated importance scores).

    `attention_unit` is what a width removes from attention: whole KV groups (`"kv_groups"`), or query heads inside
    every group (`"query_heads"`): the width item is then a *slot*, the s-th most important query head of every KV
    group, all groups are kept, and q_proj rows / o_proj columns are stored slot-major so that kept slots are a
    prefix. Calibration (`permute_widths`) sets it together with the weight layout; setting it by hand on unpermuted
    weights would mix up the heads.

    `layer_num_key_value_heads` / `layer_num_attention_heads` / `layer_intermediate_sizes` give per-layer sizes for a
    statically exported, physically sliced subnet whose layers differ in width; `None` means every layer has the full
    size (`layer_num_attention_heads=None`: every layer keeps the config's query heads per KV group).

    `smol_experts > 0` adds the shape-aware mixture of LoRAs (SMoL): `smol_experts` LoRA experts of rank
    `smol_rank` on each of `smol_target_modules`, gated (top `smol_top_k`) by one router fed the shape.
    `smol_experts=1` is plain LoRA shared by all shapes. With `smol_exact_full_shape` the full shape (all layers,
    width 1.0) runs without experts, so it is exactly the base model: set when every shape was distilled from the
    base, whose full shape cannot do better than the base itself. `base_weights_trained` records that fine-tuning
    changed the base weights too (`train_base`): the full shape is then the fine-tuned base, not the source model.

    `depth_bridges` lists the depth bridges calibration fitted, as `[i, j]` pairs: kept layer `i` followed by the
    removed span `i+1..j`. Each has a (hidden x hidden) float32 map `T`, stored as
    `model.layers.{i}.mlp.depth_bridges.{j}` and applied to layer i's MLP output (`x -> x T^T`) at every shape that
    keeps layer i, removes layers i+1..j and keeps layer j+1 (or ends at j); export merges it into that layer's
    down_proj (`W <- T W`). A span starting at layer 0 has no kept layer before it and no bridge. `None`: none.

    `width_compensation` lists the grid widths (below 1, descending) calibration fitted a width compensation for, with
    `width_compensation_rank` its rank: per layer, o_proj and down_proj get a least-squares update of their kept input
    columns, `W_K <- W_K + B A` with A (r x kept columns) and B (out x r) float32, stored as
    `{o_proj,down_proj}.width_correction_A.{key}` / `width_correction_B.{key}` (key: the width with `_` for the
    point), r = min(rank, kept columns, out). Only with uniform widths, whose kept columns per layer do not depend on
    the depth. `None`: none.

    `depth` / `width` name the shape the model opens at after `from_pretrained` (`None`: all layers, width 1.0).
    Keyword arguments of `from_pretrained` set them, so `pipeline(model_kwargs=...)` and lm-eval's stock `hf`
    model can ask for a shape; saved with the config, they make a checkpoint open at that shape by default.

    `base_model` (a Hub id) and `base_model_license` record where the weights came from: the model card written
    by `save_pretrained` cites them, so they must survive any number of save/load round trips.

    `weights_digest` is written into config.json by `save_pretrained`: the digest of the weight files saved with it
    (`checkpoint_files.weights_digest`), so that `from_pretrained` refuses weight files of another stage.

    Keyword arguments of `from_pretrained` that name architecture or shape-space fields are built into the config
    together with config.json's values, so they pass the same validation; `WEIGHT_LAYOUT_FIELDS` cannot be changed so.
    """

    model_type = "amoeba"

    source_model_type: str = "llama"
    qkv_bias: bool = False
    sliding_window: int | None = None
    min_depth: int | None = None
    depth_table: dict[str, list[int]] | None = None
    min_width: float = 0.5
    width_grid: list[float] | None = None
    width_mode: str = "uniform"
    bias_compensation: bool = False
    attention_unit: str = "kv_groups"
    layer_num_key_value_heads: list[int] | None = None
    layer_num_attention_heads: list[int] | None = None
    layer_intermediate_sizes: list[int] | None = None
    base_model: str | None = None
    base_model_license: str | None = None
    depth_bridges: list[list[int]] | None = None
    width_compensation: list[float] | None = None
    width_compensation_rank: int = 32
    smol_experts: int = 0
    smol_top_k: int = 2
    smol_rank: int = 8
    smol_alpha: float = 16.0
    smol_dropout: float = 0.0
    smol_target_modules: list[str] | None = None
    smol_router_hidden: int = 16
    smol_router_noise: bool = True
    smol_exact_full_shape: bool = False
    base_weights_trained: bool = False
    depth: int | None = None
    width: int | float | None = None
    weights_digest: str | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "AmoebaConfig | tuple[AmoebaConfig, dict]":
        """Stock `from_dict`, but keyword arguments naming this architecture's fields join config.json's values
        before the config is built: transformers would set them afterwards and skip validation."""
        for key in WEIGHT_SIZE_FIELDS:
            if key in kwargs and key in config_dict and kwargs[key] != config_dict[key]:
                raise AmoebaConfigError(
                    f"{key}={kwargs[key]!r} cannot be set when loading: the stored weights have {key}="
                    f"{config_dict[key]!r}; choose a smaller shape with depth/width (or set_shape) instead"
                )
        generic = {field.name for field in dataclasses.fields(PreTrainedConfig)}
        own = {field.name: field for field in dataclasses.fields(cls) if field.name not in generic}
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in own}
        built = super().from_dict({**config_dict, **overrides}, **kwargs)
        for key in WEIGHT_LAYOUT_FIELDS:
            saved = config_dict.get(key, own[key].default)
            if key in overrides and overrides[key] != saved:
                raise AmoebaConfigError(
                    f"{key}={overrides[key]!r} cannot be set when loading: the saved {key}={saved!r} says what the "
                    f"stored weights mean, and only calibration changes it (the calibrate stage, or permute_widths)"
                )
        return built

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.min_depth is None:
            self.min_depth = max(1, (self.num_hidden_layers + 1) // 2)
        if self.width_grid is None:
            self.width_grid = [w for w in (1.0, 0.875, 0.75, 0.625, 0.5) if w >= self.min_width]
        if self.smol_target_modules is None:
            self.smol_target_modules = list(SMOL_TARGETS)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        # `@strict` validates again after this, but wraps every validator's error in its own exception type; checking
        # here first lets a bad config reach its builder or loader as an AmoebaConfigError (a ValueError).
        self.validate_architecture()

    def validate_architecture(self):
        """Part of `@strict` validation: the shape space must be consistent with the architecture.

        Unlike Llama, `hidden_size` need not be a multiple of the head count: `head_dim` is explicit, and a
        subnet keeping some KV groups rarely divides the hidden size.
        """
        num_layers = self.num_hidden_layers
        if self.source_model_type not in SUPPORTED_SOURCE_TYPES:
            raise AmoebaConfigError(
                f"source_model_type={self.source_model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_SOURCE_TYPES)}"
            )
        if self.head_dim is None or self.head_dim <= 0:
            raise AmoebaConfigError(f"head_dim must be a positive int, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise AmoebaConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.min_depth is not None and not 1 <= self.min_depth <= num_layers:
            raise AmoebaConfigError(f"min_depth must be in [1, {num_layers}], got {self.min_depth}")
        if not 0.0 < self.min_width <= 1.0:
            raise AmoebaConfigError(f"min_width must be in (0, 1], got {self.min_width}")
        if self.width_mode not in WIDTH_MODES:
            raise AmoebaConfigError(f"width_mode must be one of {WIDTH_MODES}, got {self.width_mode!r}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise AmoebaConfigError(
                f"attention_unit must be one of {', '.join(ATTENTION_UNITS)}, got {self.attention_unit!r}"
            )
        if self.width_grid is not None and not self.width_grid:
            raise AmoebaConfigError("width_grid must list at least one width, got []")
        for width in self.width_grid or ():
            if not self.min_width <= width <= 1.0:
                raise AmoebaConfigError(f"width_grid value {width} is outside [min_width={self.min_width}, 1]")
        if self.depth_table is not None:
            self._validate_depth_table(num_layers)
        if self.depth_bridges is not None:
            self._validate_depth_bridges(num_layers)
        if self.width_compensation is not None:
            self._validate_width_compensation()
        if self.smol_experts < 0 or (self.smol_experts and not 1 <= self.smol_top_k <= self.smol_experts):
            raise AmoebaConfigError(
                f"smol_experts must be >= 0 and smol_top_k in [1, smol_experts], got {self.smol_experts} and "
                f"{self.smol_top_k}"
            )
        if self.smol_experts and self.smol_rank < 1:
            raise AmoebaConfigError(f"smol_rank must be >= 1 (the LoRA rank), got {self.smol_rank}")
        unknown = set(self.smol_target_modules or ()) - set(SMOL_TARGETS)
        if unknown:
            raise AmoebaConfigError(f"unknown smol_target_modules {sorted(unknown)}; valid: {', '.join(SMOL_TARGETS)}")
        for name in ("layer_num_key_value_heads", "layer_num_attention_heads", "layer_intermediate_sizes"):
            sizes = getattr(self, name)
            if sizes is not None and len(sizes) != num_layers:
                raise AmoebaConfigError(f"{name} must have one entry per layer ({num_layers}), got {len(sizes)}")
        if self.layer_num_attention_heads is not None:
            key_value_heads = self.layer_num_key_value_heads or [self.num_key_value_heads] * num_layers
            for index, (heads, groups) in enumerate(zip(self.layer_num_attention_heads, key_value_heads)):
                if heads < groups or heads % groups:
                    raise AmoebaConfigError(
                        f"layer_num_attention_heads[{index}] ({heads}) must be a positive multiple of that layer's "
                        f"key-value heads ({groups})"
                    )

    def _validate_depth_bridges(self, num_layers: int) -> None:
        """Sorted, unique `[kept layer, last removed layer]` pairs, the span after a layer and inside the model."""
        pairs = [tuple(pair) if isinstance(pair, (list, tuple)) else pair for pair in self.depth_bridges]
        for pair in pairs:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(type(value) is int for value in pair)
                    and 0 <= pair[0] < pair[1] < num_layers):
                raise AmoebaConfigError(
                    f"depth_bridges entries must be [kept layer i, last removed layer j] with 0 <= i < j < "
                    f"{num_layers}, got {list(pair) if isinstance(pair, tuple) else pair!r}"
                )
        if pairs != sorted(set(pairs)):
            raise AmoebaConfigError(f"depth_bridges must be sorted and unique, got {self.depth_bridges}")

    def _validate_width_compensation(self) -> None:
        """Descending unique widths in [min_width, 1), uniform widths (the fitted columns are fixed per layer), rank
        >= 1."""
        widths = self.width_compensation
        if not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in widths):
            raise AmoebaConfigError(f"width_compensation must list grid widths below 1, got {widths!r}")
        if any(not self.min_width <= w < 1.0 for w in widths) or list(widths) != sorted(set(widths), reverse=True):
            raise AmoebaConfigError(
                f"width_compensation must be descending, unique widths in [min_width={self.min_width}, 1), got {widths}"
            )
        if self.width_mode != "uniform":
            raise AmoebaConfigError(
                f"width_mode={self.width_mode!r} cannot be used with width_compensation (fitted for the uniform widths "
                "of this calibration): with global widths a layer's kept columns depend on the depth, and one fitted "
                "correction cannot serve them all; for global widths re-calibrate with `amoeba calibrate --width-mode "
                "global`, which fits none"
            )
        if type(self.width_compensation_rank) is not int or self.width_compensation_rank < 1:
            raise AmoebaConfigError(
                f"width_compensation_rank must be an int >= 1, got {self.width_compensation_rank!r}"
            )

    def _validate_depth_table(self, num_layers: int) -> None:
        """Keys are the depths of the shape space, the full depth among them; each lists that many kept layers."""
        min_depth = self.min_depth or 1
        for key, layers in self.depth_table.items():
            if not (key.isascii() and key.isdigit()):
                raise AmoebaConfigError(
                    f"depth_table key {key!r} is not a depth: keys are layer counts written as digit strings, "
                    f"e.g. '{num_layers}'"
                )
            if int(key) != len(layers):
                raise AmoebaConfigError(f"depth_table[{key!r}] must list exactly {key} layers, got {len(layers)}")
            if sorted(set(layers)) != list(layers) or not all(0 <= i < num_layers for i in layers):
                raise AmoebaConfigError(
                    f"depth_table[{key!r}] must be sorted, unique layer indices in [0, {num_layers}), got {layers}"
                )
            if not min_depth <= int(key) <= num_layers:
                raise AmoebaConfigError(
                    f"depth_table key {key!r} is outside the depths [min_depth={min_depth}, "
                    f"num_hidden_layers={num_layers}]"
                )
        if str(num_layers) not in self.depth_table:
            raise AmoebaConfigError(
                f"depth_table lacks the full depth: it must have the key '{num_layers}' (num_hidden_layers) listing "
                f"every layer; it has {sorted(self.depth_table, key=lambda k: (len(k), k))}"
            )


def weight_layout(values: Mapping[str, Any]) -> dict[str, Any]:
    """The `WEIGHT_LAYOUT_FIELDS` of a config's values that differ from their defaults: what `weights_digest` ties to
    the weight files, so an edit of them in config.json is refused. Defaults are left out because a saved config.json
    may omit them, and so that a field added in a later version leaves earlier checkpoints' digests valid."""
    defaults = {field.name: field.default for field in dataclasses.fields(AmoebaConfig)}
    return {key: values[key] for key in WEIGHT_LAYOUT_FIELDS if key in values and values[key] != defaults[key]}


__all__ = [
    "ATTENTION_UNITS",
    "SUPPORTED_SOURCE_TYPES",
    "WEIGHT_LAYOUT_FIELDS",
    "AmoebaConfig",
    "AmoebaConfigError",
    "weight_layout",
]
