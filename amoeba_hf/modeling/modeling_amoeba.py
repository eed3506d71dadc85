"""The any-shape model: Llama pieces whose layers can be skipped and whose widths are sliced in place.

Subclassing the Llama modules keeps the state-dict keys of `LlamaForCausalLM`, so Llama-family weights load
directly, and every shape computes exactly what a physically pruned `LlamaForCausalLM` computes.
"""

import copy
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.hub import hf_api
from transformers.utils.output_capturing import capture_outputs

from .checkpoint_files import (
    CALIBRATION_BUFFERS,
    check_loading_info,
    record_weight_hashes,
    saved_config_values,
    verify_weight_files,
)
from .configuration_amoeba import ATTENTION_UNITS, SMOL_TARGETS, SUPPORTED_SOURCE_TYPES, AmoebaConfig
from .elastic_linear import ElasticLinear
from .model_card import fill_repo_id, read_eval_rows, render_model_card, write_card
from .shape_router import ShapeRouter
from .shape_space import (
    GlobalWidthAllocator,
    LayerWidth,
    Shape,
    ShapeSpace,
    compensation_key,
    compensation_sizes,
    full_layer_sizes,
)
from .subnet_export import amoeba_config_from_source, build_subnet, check_local_source

logger = logging.get_logger(__name__)

SHAPE_SPACE_KEYS = ("depth_table", "min_depth", "min_width", "width_grid", "width_mode", "bias_compensation")
RECOVERY_PARAMETERS = ("depth_bridges", "width_correction_A", "width_correction_B")


def is_recovery_parameter(name: str) -> bool:
    """A depth bridge or width correction: calibration's closed-form recovery, used only below the full shape."""
    return any(part in RECOVERY_PARAMETERS for part in name.split("."))


def elastic_linear(config: AmoebaConfig, name: str, in_features: int, out_features: int, bias: bool,
                   track_input_mean: bool = False) -> ElasticLinear:
    """An ElasticLinear, with SMoL experts if the config targets this projection."""
    experts = config.smol_experts if name in config.smol_target_modules else 0
    return ElasticLinear(
        in_features, out_features, bias=bias, track_input_mean=track_input_mean, experts=experts,
        rank=config.smol_rank, alpha=config.smol_alpha, dropout=config.smol_dropout,
    )


def _permute_rows(linear: ElasticLinear, order: torch.Tensor, block: int) -> None:
    """Reorder the output rows (weight and bias) of `linear` in blocks of `block` rows."""
    weight = linear.weight.data
    linear.weight.data = weight.view(-1, block, weight.shape[1])[order].reshape_as(weight).contiguous()
    if linear.bias is not None:
        linear.bias.data = linear.bias.data.view(-1, block)[order].reshape(-1).contiguous()


def _permute_columns(linear: ElasticLinear, order: torch.Tensor, block: int) -> None:
    """Reorder the input columns of `linear` in blocks of `block` columns."""
    weight = linear.weight.data
    linear.weight.data = weight.view(weight.shape[0], -1, block)[:, order].reshape_as(weight).contiguous()


def _store_calibration(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Keep a calibration result as a float32 buffer, so the checkpoint carries it; `None` removes it."""
    if value is not None:
        module.register_buffer(name, value.to(torch.float32).contiguous())
    elif name in module._buffers:
        delattr(module, name)


class AmoebaMLP(LlamaMLP):
    """SwiGLU MLP whose active neurons are a prefix of the (importance-ordered) intermediate channels."""

    def __init__(self, config: AmoebaConfig, intermediate_size: int, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = elastic_linear(config, "gate_proj", self.hidden_size, intermediate_size, config.mlp_bias)
        self.up_proj = elastic_linear(config, "up_proj", self.hidden_size, intermediate_size, config.mlp_bias)
        self.down_proj = elastic_linear(
            config, "down_proj", intermediate_size, self.hidden_size, config.mlp_bias, config.bias_compensation
        )
        self.act_fn = ACT2FN[config.hidden_act]
        if config.width_mode == "global":
            self.register_buffer("neuron_importance", torch.zeros(intermediate_size))
        ends = [end for kept, end in config.depth_bridges or () if kept == layer_idx]
        self.depth_bridges = self._new_bridges(ends) if ends else None
        self.active_bridge: str | None = None

    def _new_bridges(self, ends: Iterable[int], device: torch.device | None = None) -> nn.ParameterDict:
        """Identity maps (no change until set) for the spans ending at `ends`, float32 and frozen."""
        return nn.ParameterDict({
            str(end): nn.Parameter(torch.eye(self.hidden_size, dtype=torch.float32, device=device), requires_grad=False)
            for end in ends
        })

    def set_bridges(self, maps: dict[int, torch.Tensor]) -> None:
        """Store the depth bridges after this layer, `maps[j]` for the removed span ending at layer j (None-free);
        an empty dict removes them. The previous ones are dropped."""
        device = self.down_proj.weight.device
        self.depth_bridges = self._new_bridges(sorted(maps), device) if maps else None
        self.active_bridge = None
        with torch.no_grad():
            for end, value in maps.items():
                self.depth_bridges[str(end)].copy_(value)

    def select_bridge(self, span_end: int | None) -> None:
        """Apply the bridge of the removed span ending at `span_end` (if this layer has one), or none."""
        key = None if span_end is None else str(span_end)
        self.active_bridge = key if self.depth_bridges is not None and key in self.depth_bridges else None

    def bridge_map(self) -> torch.Tensor | None:
        """The active depth bridge T (hidden x hidden, applied as `output @ T.T`), or None."""
        return None if self.active_bridge is None else self.depth_bridges[self.active_bridge]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        bridge = self.bridge_map()
        if bridge is None:
            return output
        return F.linear(output.to(bridge.dtype), bridge).to(output.dtype)

    def set_width(self, neurons: int) -> None:
        self.gate_proj.set_active(active_out=neurons)
        self.up_proj.set_active(active_out=neurons)
        self.down_proj.set_active(active_in=neurons)

    def permute_neurons(
        self, order: torch.Tensor, input_mean: torch.Tensor | None, importance: torch.Tensor | None
    ) -> None:
        """Put neuron `order[i]` at position i (the MLP's function is unchanged); `input_mean` (down_proj's input
        means, for bias compensation) and `importance` (global widths) are stored reordered, or removed if None."""
        _permute_rows(self.gate_proj, order, 1)
        _permute_rows(self.up_proj, order, 1)
        _permute_columns(self.down_proj, order, 1)
        _store_calibration(self.down_proj, "input_mean", None if input_mean is None else input_mean[order])
        _store_calibration(self, "neuron_importance", None if importance is None else importance[order])


class AmoebaAttention(LlamaAttention):
    """GQA attention whose width keeps a prefix of importance-ordered items.

    With `attention_unit="kv_groups"` an item is a KV group with all its query heads (q_proj rows and o_proj columns
    stored group-major, as in the source). With `"query_heads"` an item is a slot, one query head of every KV group;
    all groups are kept and q_proj rows / o_proj columns are stored slot-major (`[slot 0: group 0..G-1][slot 1: ...]`),
    so that kept slots are a prefix of the weights. `forward` then puts the projected queries in the group-major
    order the attention kernels expect, and the attention output back, with a view and a transpose.
    """

    def __init__(self, config: AmoebaConfig, layer_idx: int, size: LayerWidth):
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_heads = size.key_value_groups
        self.num_key_value_groups = size.query_heads_per_group
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        query_dim = size.query_heads * self.head_dim
        kv_dim = size.key_value_groups * self.head_dim
        in_bias = config.attention_bias or config.qkv_bias
        self.q_proj = elastic_linear(config, "q_proj", config.hidden_size, query_dim, in_bias)
        self.k_proj = elastic_linear(config, "k_proj", config.hidden_size, kv_dim, in_bias)
        self.v_proj = elastic_linear(config, "v_proj", config.hidden_size, kv_dim, in_bias)
        self.o_proj = elastic_linear(
            config, "o_proj", query_dim, config.hidden_size, config.attention_bias, config.bias_compensation
        )
        if config.width_mode == "global" and config.attention_unit == "query_heads":
            self.register_buffer("slot_importance", torch.zeros(size.query_heads_per_group))
        elif config.width_mode == "global":
            self.register_buffer("group_importance", torch.zeros(size.key_value_groups))

    @property
    def slot_major(self) -> bool:
        """Query heads are stored slot-major (the config's `attention_unit` is "query_heads")."""
        return self.config.attention_unit == "query_heads"

    def set_width(self, size: LayerWidth) -> None:
        kv_dim = size.key_value_groups * self.head_dim
        query_dim = size.query_heads * self.head_dim
        self.q_proj.set_active(active_out=query_dim)
        self.k_proj.set_active(active_out=kv_dim)
        self.v_proj.set_active(active_out=kv_dim)
        self.o_proj.set_active(active_in=query_dim)
        self.num_key_value_heads = size.key_value_groups
        self.num_key_value_groups = size.query_heads_per_group

    def _reorder_heads(self, states: torch.Tensor, dim: int, to_group_major: bool) -> torch.Tensor:
        """Reorder the active query heads along `dim` (head blocks, or heads if `states` has a head_dim axis after
        it) between slot-major and group-major; unchanged unless stored slot-major with several groups and slots."""
        groups, slots = self.num_key_value_heads, self.num_key_value_groups
        if not self.slot_major or groups == 1 or slots == 1:
            return states
        moved = states.movedim(dim, 0)
        outer, inner = (slots, groups) if to_group_major else (groups, slots)
        blocks = moved.reshape(outer, inner, -1, *moved.shape[1:])
        return blocks.transpose(0, 1).reshape(moved.shape).movedim(0, dim)

    def stock_head_order(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor`'s active query-head blocks along `dim` (q_proj rows and bias, o_proj columns, their LoRA factors)
        in the group-major order of a stock model with these heads: what export writes."""
        return self._reorder_heads(tensor, dim, to_group_major=True)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`LlamaAttention.forward` (Mistral's sliding window arrives in `kwargs`), with slot-major queries put in
        group-major order for the attention interface and its output put back before o_proj."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        query_states = self._reorder_heads(query_states, -2, to_group_major=True).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )

        attn_output = self._reorder_heads(attn_output, -2, to_group_major=False)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights

    def _stored_head_index(self, group: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """Stored position (in head blocks) of query head `head` (within its group) of KV group `group`."""
        groups = self.k_proj.out_features // self.head_dim
        per_group = self.q_proj.out_features // self.head_dim // groups
        return head * groups + group if self.slot_major else group * per_group + head

    def _permute_query_heads(self, head_order: torch.Tensor, input_mean: torch.Tensor | None) -> None:
        """Put stored query head `head_order[i]` at position i in q_proj rows, o_proj columns and o_proj's input
        means (bias compensation; removed if None)."""
        _permute_rows(self.q_proj, head_order, self.head_dim)
        _permute_columns(self.o_proj, head_order, self.head_dim)
        input_mean = None if input_mean is None else input_mean.view(-1, self.head_dim)[head_order].reshape(-1)
        _store_calibration(self.o_proj, "input_mean", input_mean)

    def heads_by_group(self, values: torch.Tensor) -> torch.Tensor:
        """Per-channel values of o_proj's input (query heads' outputs), in stored order, as
        (KV group, query head within the group, head_dim): what importance is aggregated over."""
        groups = self.k_proj.out_features // self.head_dim
        if self.slot_major:
            return values.view(-1, groups, self.head_dim).transpose(0, 1)
        return values.view(groups, -1, self.head_dim)

    def permute_groups(
        self, order: torch.Tensor, input_mean: torch.Tensor | None, importance: torch.Tensor | None
    ) -> None:
        """Put KV group `order[i]` (with its query heads) at position i, query heads group-major (the function is
        unchanged); `input_mean` (o_proj's input means, for bias compensation) and `importance` (global widths) are
        stored reordered, or removed if None."""
        per_group = self.q_proj.out_features // self.k_proj.out_features
        heads = torch.arange(per_group, device=order.device)
        head_order = self._stored_head_index(order.repeat_interleave(per_group), heads.repeat(len(order)))
        self._permute_query_heads(head_order, input_mean)
        _permute_rows(self.k_proj, order, self.head_dim)
        _permute_rows(self.v_proj, order, self.head_dim)
        _store_calibration(self, "slot_importance", None)
        _store_calibration(self, "group_importance", None if importance is None else importance[order])

    def permute_slots(
        self, head_orders: torch.Tensor, input_mean: torch.Tensor | None, importance: torch.Tensor | None
    ) -> None:
        """Store query heads slot-major: slot s holds, for every KV group g, its head `head_orders[g, s]` (an index
        within the group, in the stored order). KV groups stay in place; the function is unchanged once the config
        says `attention_unit="query_heads"`. `importance` are the slots' scores (global widths), in slot order."""
        groups, per_group = head_orders.shape
        group_index = torch.arange(groups, device=head_orders.device).repeat(per_group)
        head_order = self._stored_head_index(group_index, head_orders.T.reshape(-1))
        self._permute_query_heads(head_order, input_mean)
        _store_calibration(self, "group_importance", None)
        _store_calibration(self, "slot_importance", importance)


class AmoebaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: AmoebaConfig, layer_idx: int, size: LayerWidth):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = AmoebaAttention(config, layer_idx, size)
        self.mlp = AmoebaMLP(config, size.intermediate_size, layer_idx)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        for name, linear in self.output_projections():
            linear.new_corrections(compensation_sizes(config, name, size))

    def set_width(self, size: LayerWidth) -> None:
        self.self_attn.set_width(size)
        self.mlp.set_width(size.intermediate_size)

    def output_projections(self) -> tuple[tuple[str, ElasticLinear], tuple[str, ElasticLinear]]:
        """o_proj and down_proj by name: the projections whose input columns a width removes."""
        return ("o_proj", self.self_attn.o_proj), ("down_proj", self.mlp.down_proj)


def _calibrated(scores: list[torch.Tensor | None]) -> bool:
    """Importance buffers exist and hold Stage-1 scores: all-zero buffers (a config switched to global widths by
    hand) would make the global allocator keep one arbitrary item per layer."""
    if None in scores:
        return False
    return any(score.is_meta or bool(score.any()) for score in scores)


class AmoebaPreTrainedModel(LlamaPreTrainedModel):
    config_class = AmoebaConfig
    config: AmoebaConfig
    _no_split_modules = ["AmoebaDecoderLayer"]
    # Calibration statistics decide which channels a width keeps (bf16 rounding changes the choice) and the experts
    # and router train in float32 over a base of any dtype, as peft keeps adapters.
    _keep_in_fp32_modules_strict = [
        "lora_A", "lora_B", "shape_router", *RECOVERY_PARAMETERS, *CALIBRATION_BUFFERS,
    ]
    _can_record_outputs = {"hidden_states": AmoebaDecoderLayer, "attentions": AmoebaAttention}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """Stock loading, then the shape `config.depth` / `config.width` name, so that keyword arguments
        (`from_pretrained(dir, depth=24, width=0.75)`, which transformers sets on the config) choose the shape.

        The shape cannot be set in `__init__`: transformers builds the model on the meta device, and global widths
        and bias compensation read the loaded buffers.
        """
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        depth, width = model.config.depth, model.config.width
        if depth is not None or width is not None:
            full = model.shape_space.full_shape
            model.set_shape(full.depth if depth is None else depth, full.width if width is None else width)
        return loaded

    def _init_weights(self, module: nn.Module) -> None:
        """Calibration buffers start at zero (no compensation, no importance) when absent from a checkpoint, and
        LoRA experts as in LoRA (A random, B zero) so that adding them leaves the model's function unchanged."""
        super()._init_weights(module)
        for name in CALIBRATION_BUFFERS:
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor):
                init.zeros_(buffer)
        if isinstance(module, AmoebaMLP) and module.depth_bridges is not None:
            for bridge in module.depth_bridges.values():
                init.eye_(bridge)
        if isinstance(module, ElasticLinear) and module.width_correction_A is not None:
            for correction in (*module.width_correction_A.values(), *module.width_correction_B.values()):
                init.zeros_(correction)
        if isinstance(module, ElasticLinear) and module.lora_A is not None:
            for expert in module.lora_A:
                init.kaiming_uniform_(expert, a=math.sqrt(5))
            init.zeros_(module.lora_B)


@dataclass
class LayerInputs:
    """What every decoder layer of one forward pass receives besides the hidden states (see `prepare_inputs`)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    position_ids: torch.LongTensor
    layer_kwargs: dict[str, Any]


class AmoebaModel(AmoebaPreTrainedModel, LlamaModel):
    """Decoder stack that runs only the layers of the current shape, each at its current width."""

    def __init__(self, config: AmoebaConfig):
        AmoebaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AmoebaDecoderLayer(config, i, size) for i, size in enumerate(full_layer_sizes(config))]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.shape_router = self._new_router(config) if config.smol_experts else None
        self._shape_space: ShapeSpace | None = None
        self._shape = Shape(config.num_hidden_layers, 1.0)
        self._active_layers: tuple[AmoebaDecoderLayer, ...] = tuple(self.layers)
        self._expert_linears = self._collect_expert_linears()
        self.post_init()

    @staticmethod
    def _new_router(config: AmoebaConfig) -> ShapeRouter:
        return ShapeRouter(
            config.num_hidden_layers, config.smol_experts, config.smol_top_k, config.smol_router_hidden,
            config.smol_router_noise,
        )

    def _collect_expert_linears(self) -> list[ElasticLinear]:
        return [m for layer in self._active_layers for m in layer.modules()
                if isinstance(m, ElasticLinear) and m.lora_A is not None]

    def add_experts(self) -> None:
        """Attach SMoL experts and the router as the config now says (used by `enable_smol`)."""
        config = self.config
        for layer in self.layers:
            for name, module in layer.named_modules():
                if isinstance(module, ElasticLinear) and name.split(".")[-1] in config.smol_target_modules:
                    module.add_experts(config.smol_experts, config.smol_rank, config.smol_alpha, config.smol_dropout)
        self.shape_router = self._new_router(config).to(self.embed_tokens.weight.device)
        self.set_shape(*self._shape)

    def route(self, deterministic: bool = False) -> None:
        """Hand the current shape's expert gates to every active LoRA linear (noisy, with grad, in training);
        `None` at the full shape of a `smol_exact_full_shape` model, which runs the base weights only."""
        if self.shape_router is None:
            return
        if self.config.smol_exact_full_shape and self._shape == self.shape_space.full_shape:
            gates = None
        else:
            gates = self.shape_router.deterministic_gates() if deterministic else self.shape_router()
        for linear in self._expert_linears:
            linear.gates = gates

    @property
    def shape_space(self) -> ShapeSpace:
        if self._shape_space is None:
            allocator = None
            item = "slot_importance" if self.config.attention_unit == "query_heads" else "group_importance"
            attention_scores = [getattr(layer.self_attn, item, None) for layer in self.layers]
            neuron_scores = [getattr(layer.mlp, "neuron_importance", None) for layer in self.layers]
            if self.config.width_mode == "global" and _calibrated(attention_scores + neuron_scores):
                allocator = GlobalWidthAllocator(self.config, attention_scores, neuron_scores)
            self._shape_space = ShapeSpace(self.config, allocator)
        return self._shape_space

    def reset_shape_space(self) -> None:
        """Rebuild the shape space after the config's tables or the importance buffers changed; back to full shape."""
        self._shape_space = None
        self.set_shape(*self.shape_space.full_shape)

    def update_shape_space(self, **changes: Any) -> None:
        """Set Stage-1 results in the config (keys: `SHAPE_SPACE_KEYS`), validated together, and rebuild the shape
        space at the full shape. Invalid values raise a ValueError and leave the config as it was."""
        unknown = sorted(set(changes) - set(SHAPE_SPACE_KEYS))
        if unknown:
            raise ValueError(f"update_shape_space cannot set {unknown}; valid keys: {', '.join(SHAPE_SPACE_KEYS)}")
        previous = {key: getattr(self.config, key) for key in changes}
        try:
            for key, value in changes.items():
                setattr(self.config, key, value)
            self.config.validate_architecture()
            self.reset_shape_space()
        except Exception:
            for key, value in previous.items():
                setattr(self.config, key, value)
            self.reset_shape_space()
            raise

    def permute_widths(
        self,
        group_orders: list[torch.Tensor],
        neuron_orders: list[torch.Tensor],
        input_means: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        importance: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        attention_unit: str = "kv_groups",
    ) -> None:
        """Reorder every layer's attention items and MLP neurons so that each width keeps a prefix (Stage 1).

        The full model's function is unchanged. With `attention_unit="kv_groups"`, `group_orders[i]` orders layer i's
        KV groups (most important first). With `"query_heads"` it is a (KV groups, query heads per group) tensor whose
        row g orders group g's query heads (indices within the group, most important first): slot s is column s, and
        query heads are stored slot-major. Per layer, `input_means` are the calibration means of the inputs of o_proj
        and down_proj (bias compensation) in the current order; `importance` the scores of the attention items and
        neurons (global widths), groups and neurons in the current order, slots in slot order. Both are stored as
        buffers, so checkpoints carry them; `None` removes them. The config's `attention_unit`, `bias_compensation`
        and `width_mode` follow, and the model is at full shape after.
        """
        if self.config.smol_experts:
            raise ValueError("permute_widths must run before enable_smol: the LoRA experts would not be permuted")
        if attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"attention_unit must be one of {', '.join(ATTENTION_UNITS)}, got {attention_unit!r}")
        named = {"group_orders": group_orders, "neuron_orders": neuron_orders, "input_means": input_means,
                 "importance": importance}
        for name, values in named.items():
            if values is not None and len(values) != len(self.layers):
                raise ValueError(f"{name} must have one entry per layer ({len(self.layers)}), got {len(values)}")
        self.set_width_compensation(None)
        for index, layer in enumerate(self.layers):
            attention_mean, mlp_mean = (None, None) if input_means is None else input_means[index]
            attention_scores, neuron_scores = (None, None) if importance is None else importance[index]
            if attention_unit == "query_heads":
                layer.self_attn.permute_slots(group_orders[index], attention_mean, attention_scores)
            else:
                layer.self_attn.permute_groups(group_orders[index], attention_mean, attention_scores)
            layer.mlp.permute_neurons(neuron_orders[index], mlp_mean, neuron_scores)
        self.config.attention_unit = attention_unit
        self.update_shape_space(
            width_mode="uniform" if importance is None else "global", bias_compensation=input_means is not None
        )

    def set_depth_bridges(self, bridges: dict[tuple[int, int], torch.Tensor] | None) -> None:
        """Store depth bridges (Stage 1, `selection/bridges.py`): `bridges[(i, j)]` is the (hidden x hidden) map
        applied to layer i's MLP output at shapes that keep layer i and remove layers i+1..j (see the config's
        `depth_bridges`). Replaces any previous ones; `None` or `{}` removes them. The current shape is kept."""
        bridges = dict(bridges or {})
        hidden = self.config.hidden_size
        for (kept, end), value in bridges.items():
            if tuple(value.shape) != (hidden, hidden):
                raise ValueError(f"depth bridge {(kept, end)} must be {hidden} x {hidden}, got {tuple(value.shape)}")
        previous = self.config.depth_bridges
        self.config.depth_bridges = [list(pair) for pair in sorted(bridges)] or None
        try:
            self.config.validate_architecture()
        except Exception:
            self.config.depth_bridges = previous
            raise
        for index, layer in enumerate(self.layers):
            layer.mlp.set_bridges({end: value for (kept, end), value in bridges.items() if kept == index})
        self.set_shape(*self._shape)

    def set_width_compensation(
        self, corrections: dict[tuple[float, int, str], tuple[torch.Tensor, torch.Tensor]] | None, rank: int = 32
    ) -> None:
        """Store width corrections (Stage 1, `selection/compensation.py`): `corrections[(width, i, name)] = (A, B)`
        for layer i's `"o_proj"` or `"down_proj"` at grid width `width`, A (r x kept columns), B (out x r), r =
        min(rank, kept columns, out); every projection that width prunes needs one (see the config's
        `width_compensation`). Replaces any previous ones; `None` or `{}` removes them. The current shape is kept."""
        corrections = dict(corrections or {})
        previous = self.config.width_compensation, self.config.width_compensation_rank
        self.config.width_compensation = sorted({width for width, _, _ in corrections}, reverse=True) or None
        self.config.width_compensation_rank = rank
        try:
            self.config.validate_architecture()
            expected = {}
            for index, layer in enumerate(self.layers):
                for name, linear in layer.output_projections():
                    sizes = compensation_sizes(self.config, name, self.shape_space.full_sizes[index])
                    for width in self.config.width_compensation or ():
                        if compensation_key(width) in sizes:
                            expected[width, index, name] = (*sizes[compensation_key(width)], linear.out_features)
            if set(corrections) != set(expected):
                raise ValueError(f"width corrections must cover exactly {sorted(expected)}, got {sorted(corrections)}")
            for entry, (a, b) in corrections.items():
                r, kept, out = expected[entry]
                if tuple(a.shape) != (r, kept) or tuple(b.shape) != (out, r):
                    raise ValueError(f"width correction {entry} must be A {r} x {kept} and B {out} x {r}, got "
                                     f"{tuple(a.shape)} and {tuple(b.shape)}")
        except Exception:
            self.config.width_compensation, self.config.width_compensation_rank = previous
            raise
        for index, layer in enumerate(self.layers):
            for name, linear in layer.output_projections():
                linear.new_corrections(compensation_sizes(self.config, name, self.shape_space.full_sizes[index]),
                                       linear.weight.device)
                with torch.no_grad():
                    for (width, slot, projection), (a, b) in corrections.items():
                        if (slot, projection) == (index, name):
                            linear.width_correction_A[compensation_key(width)].copy_(a)
                            linear.width_correction_B[compensation_key(width)].copy_(b)
        self.set_shape(*self._shape)

    @property
    def shape(self) -> Shape:
        return self._shape

    @property
    def active_layers(self) -> tuple[AmoebaDecoderLayer, ...]:
        """The decoder layers of the current shape, in order, each at its width and in its compact cache slot."""
        return self._active_layers

    def output_projections(self) -> list[tuple[ElasticLinear, ElasticLinear]]:
        """Per layer, o_proj and down_proj: their input channels are the query heads' and the neurons' outputs, where
        width calibration measures importance."""
        return [(layer.self_attn.o_proj, layer.mlp.down_proj) for layer in self.layers]

    def set_shape(self, depth: int, width: float = 1.0) -> None:
        """Activate a shape: pick the depth's layers (compact KV-cache slots) and slice each layer's width."""
        depth, width = self.shape_space.validate(depth, width)
        widths = self.shape_space.layer_widths(depth, width)
        active = []
        kept = sorted(widths)
        fitted = self.shape_space.compensation_width(width)
        correction = None if fitted is None else compensation_key(fitted)
        for layer in self.layers:
            layer.mlp.select_bridge(None)
            for _, linear in layer.output_projections():
                linear.select_correction(correction)
        for slot, index in enumerate(kept):
            layer = self.layers[index]
            layer.self_attn.layer_idx = slot
            layer.set_width(widths[index])
            following = kept[slot + 1] if slot + 1 < len(kept) else len(self.layers)
            if following > index + 1:
                layer.mlp.select_bridge(following - 1)
            active.append(layer)
        self._active_layers = tuple(active)
        self._shape = Shape(depth, width)
        self._expert_linears = self._collect_expert_linears()
        if self.shape_router is not None:
            self.shape_router.set_shape(sorted(widths), width)

    def _check_cache(self, cache: Cache) -> None:
        """A cache filled at one shape holds keys of other layers/widths: refuse to mix it with another shape."""
        filled_at = getattr(cache, "amoeba_shape", None)
        if filled_at is None:
            cache.amoeba_shape = self._shape
        elif filled_at != self._shape:
            raise ValueError(
                f"This KV cache was filled at shape depth={filled_at.depth}, width={filled_at.width}, but the model "
                f"is now at depth={self._shape.depth}, width={self._shape.width}. A cache cannot be reused across "
                "shapes: start from a new cache (generate() does this for you)."
            )

    def prepare_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **layer_kwargs,
    ) -> LayerInputs:
        """Embeddings, the mask (causal, or sliding-window when the config has a window), position ids and rotary
        embeddings of one forward pass, exactly as `forward` builds them: tooling that runs layers one by one
        (Stage 1) calls this and `run_layers` so that it cannot drift from the model."""
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)
        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        causal_mask = mask_function(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        if self.config.sliding_window is not None:
            layer_kwargs["sliding_window"] = self.config.sliding_window
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        return LayerInputs(inputs_embeds, causal_mask, position_embeddings, position_ids, {"cache": cache, **layer_kwargs})

    def run_layers(
        self, hidden_states: torch.Tensor, layers: Iterable[AmoebaDecoderLayer], inputs: LayerInputs
    ) -> torch.Tensor:
        """Apply `layers` in order with the shared inputs of one pass (`forward` passes the active layers)."""
        for decoder_layer in layers:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=inputs.attention_mask,
                position_embeddings=inputs.position_embeddings,
                position_ids=inputs.position_ids,
                **inputs.layer_kwargs,
            )
        return hidden_states

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None:
            self._check_cache(cache)
        self.route()
        inputs = self.prepare_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache=use_cache, **kwargs
        )
        hidden_states = self.run_layers(inputs.inputs_embeds, self._active_layers, inputs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)


class AmoebaForCausalLM(AmoebaPreTrainedModel, LlamaForCausalLM, GenerationMixin):
    """Causal LM of any shape: `set_shape(depth, width)`, then forward/generate run that subnet for real."""

    def __init__(self, config: AmoebaConfig):
        AmoebaPreTrainedModel.__init__(self, config)
        self.model = AmoebaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def shape_space(self) -> ShapeSpace:
        return self.model.shape_space

    @property
    def shape(self) -> Shape:
        return self.model.shape

    def set_shape(self, depth: int, width: float = 1.0) -> "AmoebaForCausalLM":
        """Switch to a shape in place (no weight copies); returns the model for chaining."""
        self.model.set_shape(depth, width)
        return self

    def update_shape_space(self, **changes: Any) -> None:
        """Set Stage-1 results in the config, validated, and rebuild the shape space (see `AmoebaModel`)."""
        self.model.update_shape_space(**changes)

    def set_depth_bridges(self, bridges: dict[tuple[int, int], torch.Tensor] | None) -> None:
        """Store the depth bridges calibration fitted (see `AmoebaModel.set_depth_bridges`)."""
        self.model.set_depth_bridges(bridges)

    def set_width_compensation(
        self, corrections: dict[tuple[float, int, str], tuple[torch.Tensor, torch.Tensor]] | None, rank: int = 32
    ) -> None:
        """Store the width corrections calibration fitted (see `AmoebaModel.set_width_compensation`)."""
        self.model.set_width_compensation(corrections, rank)

    @contextmanager
    def shaped(self, depth: int, width: float = 1.0) -> Iterator["AmoebaForCausalLM"]:
        """Run a block at a shape and restore the previous shape afterwards, even on error."""
        previous = self.shape
        self.set_shape(depth, width)
        try:
            yield self
        finally:
            self.set_shape(*previous)

    def shape_view(self, depth: int, width: float = 1.0) -> "AmoebaForCausalLM":
        """This model at another shape, sharing every weight and buffer: a draft model for self-speculative decoding.

        `model.generate(ids, assistant_model=model.shape_view(15, 0.5))` drafts with the smaller shape and verifies
        with this one; greedy output equals plain greedy decoding of this shape. The view has its own modules,
        config, generation config and shape state (each shape keeps its own KV cache), so setting one's shape never
        moves the other's; only the module objects are new (a few hundred KB), no weight is copied.
        """
        shared = {id(tensor): tensor for tensor in (*self.parameters(), *self.buffers())}
        view = copy.deepcopy(self, shared)
        for module in view.modules():
            module._forward_pre_hooks.clear()
            module._forward_hooks.clear()
        return view.set_shape(depth, width)

    def export_subnet(
        self, depth: int | None = None, width: float | None = None, merge: bool = True
    ) -> PreTrainedModel:
        """A physically smaller copy of one shape (default: the current one), independent of this model.

        Uniform widths become the source family's stock class (e.g. `LlamaForCausalLM`), loadable without
        remote code. Shapes a stock config cannot express (per-layer widths, compensation biases where the
        family has no output bias) become a static `AmoebaForCausalLM` with per-layer sizes; the reason is logged.
        `merge=False` leaves the shape's SMoL LoRA out (the base weights only), for a separate adapter.
        """
        shape = Shape(*self.shape_space.validate(
            self.shape.depth if depth is None else depth, self.shape.width if width is None else width
        ))
        with self.shaped(*shape):
            return build_subnet(self, type(self), merge)

    def enable_smol(
        self,
        experts: int = 5,
        top_k: int = 2,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
        router_hidden: int = 16,
        router_noise: bool = True,
        train_base: bool = False,
        exact_full_shape: bool = False,
        train_recovery: bool = False,
    ) -> "AmoebaForCausalLM":
        """Add the shape-aware mixture of LoRAs for one-for-all fine-tuning; `experts=1` is plain shared LoRA.

        Only the experts and the router are trainable unless `train_base` (every weight) or `train_recovery` (also
        the depth bridges and width corrections of calibration); the function is unchanged until trained.
        `exact_full_shape` keeps the full shape expert-free, i.e. the base model (for distillation from the base).
        """
        if experts < 1:
            raise ValueError(f"experts must be >= 1 (1 = plain LoRA), got {experts}")
        if self.config.smol_experts:
            raise ValueError(f"SMoL is already enabled ({self.config.smol_experts} experts)")
        self.config.smol_experts, self.config.smol_top_k, self.config.smol_rank = experts, top_k, rank
        self.config.smol_alpha, self.config.smol_dropout = alpha, dropout
        self.config.smol_target_modules = list(target_modules or SMOL_TARGETS)
        self.config.smol_router_hidden, self.config.smol_router_noise = router_hidden, router_noise
        self.config.smol_exact_full_shape = exact_full_shape
        self.config.validate_architecture()
        self.model.add_experts()
        return self.set_trainable(train_base, train_recovery)

    def set_trainable(self, train_base: bool = False, train_recovery: bool = False) -> "AmoebaForCausalLM":
        """Make only the SMoL experts and the router trainable, plus the depth bridges and width corrections with
        `train_recovery` (the full shape uses neither, so it stays the base), or every weight with `train_base`. A
        reloaded checkpoint comes back with every parameter trainable, so Stage 2 calls this before training it."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad = (train_base or "lora_" in name or "shape_router" in name
                                       or (train_recovery and is_recovery_parameter(name)))
        return self

    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, push_to_hub: bool = False, **kwargs
    ) -> None:
        """Stock save plus README.md, the any-shape model card, so that the folder is a complete Hub repo, and
        `weights_sha256.json`, the hashes `from_pretrained` checks the weight files against.

        The card includes `amoeba_eval.json` if the folder holds one; it is rendered first, so a malformed file fails
        before anything is written. `push_to_hub=True` goes through `push_to_hub` (a second save, to a temporary
        folder), because the stock path would replace the card with a generic one.
        """
        # A config changed by assignment after loading skipped validation: refuse it here, before anything is written,
        # rather than fail half-way (the model card indexes depth_table) or save a checkpoint no loader accepts.
        self.config.validate_architecture()
        card = render_model_card(self, read_eval_rows(save_directory))
        hub_options = {
            key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs
        }
        super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not self.should_save_on_this_rank(is_main_process):
            return
        write_card(card, save_directory)
        record_weight_hashes(save_directory)
        if push_to_hub:
            repo_id = hub_options.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
            self.push_to_hub(repo_id, token=kwargs.get("token"), max_shard_size=kwargs.get("max_shard_size", "50GB"),
                             **hub_options)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "50GB",
        tags: list[str] | None = None,
        exist_ok: bool = True,
    ) -> str:
        """Upload weights, config, modeling files, the model card and (if given) the tokenizer in one commit.

        Replaces the stock method, which would swap the any-shape card for a generic one, and goes through the same
        transformers machinery (no other import here: this file travels with the checkpoint). Returns the new
        commit's `CommitInfo`; a Hub failure raises huggingface_hub's error (an OSError) and commits none of the files.
        """
        repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=exist_ok).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            write_card(fill_repo_id(render_model_card(self, tags=tags), repo_id), folder)
            return self._upload_modified_files(
                folder,
                repo_id,
                files_timestamps={},
                commit_message=commit_message or "Upload any-shape model",
                token=token,
                create_pr=create_pr,
                revision=revision,
                commit_description=commit_description,
            )

    @classmethod
    def from_llama(
        cls,
        source: PreTrainedModel | str | os.PathLike,
        *,
        gguf_file: str | None = None,
        min_depth: int | None = None,
        min_width: float = 0.5,
        width_grid: list[float] | None = None,
        dtype: torch.dtype | str = "auto",
        **load_kwargs,
    ) -> "AmoebaForCausalLM":
        """Convert a Llama-family causal LM (a model, a local folder, a Hub id or a GGUF file) to any-shape form.

        Supported source architectures: Llama (incl. SmolLM2, TinyLlama, Llama-2/3), Mistral, Qwen2. The full
        shape computes exactly what the source model computes. `dtype` is the source's own ("auto") or a torch
        dtype; `load_kwargs` go to `from_pretrained` (`device_map`, `revision`, ...). The any-shape model is built
        on the meta device and takes the source's tensors themselves, so conversion holds one copy of the weights.
        """
        if isinstance(source, (str, os.PathLike)):
            check_local_source(source, gguf_file)
            source_config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, **load_kwargs)
            amoeba_config_from_source(source_config)
            source = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=dtype, **load_kwargs)
        config = amoeba_config_from_source(
            source.config, min_depth=min_depth, min_width=min_width, width_grid=width_grid
        )
        with torch.device("meta"), init.no_init_weights():
            model = cls(config)
        model.load_state_dict(source.state_dict(), strict=True, assign=True)
        model.tie_weights()
        embeddings = model.model.embed_tokens.weight
        model.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(embeddings.device)
        return model if dtype == "auto" else model.to(dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained` that refuses a checkpoint it would otherwise load wrongly without a word.

        Before loading, each weight file is checked against the sha256 recorded when it was saved (or, for checkpoints
        without that record, for truncation): `CorruptWeightsError`, an OSError; weight files other than the ones
        config.json was saved with, or a config.json whose weight layout was edited since (its `weights_digest`
        covers both), raise `CheckpointMismatchError`, a ValueError. After loading, weights that config.json expects but the checkpoint
        lacks, or holds but config.json does not describe, raise `CheckpointMismatchError` too. A caller passing
        `output_loading_info=True` gets the stock `(model, loading_info)` instead of that second check, and judges the
        loading info itself. Keyword arguments naming config fields are validated with config.json's values (see
        `AmoebaConfig.from_dict`).
        """
        return_loading_info = kwargs.pop("output_loading_info", False)
        from_files = kwargs.get("state_dict") is None and not kwargs.get("gguf_file")
        if pretrained_model_name_or_path is not None and from_files:
            config = kwargs.get("config")
            if isinstance(config, PreTrainedConfig):
                saved = config.to_dict()
            else:
                saved = saved_config_values(config or pretrained_model_name_or_path, kwargs)
                if saved is not None and saved.get("model_type") == AmoebaConfig.model_type:
                    # An invalid config.json is named as such before its weights are compared with it.
                    AmoebaConfig.from_dict(saved)
            verify_weight_files(pretrained_model_name_or_path, kwargs, saved)
        if not return_loading_info:
            # Weights of another shape than the config's (an edited num_key_value_heads, say) then reach the check
            # below, which names them, instead of a RuntimeError pointing at a report in the log.
            kwargs.setdefault("ignore_mismatched_sizes", True)
        model, loading_info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if return_loading_info:
            return model, loading_info
        check_loading_info(pretrained_model_name_or_path, model.state_dict().keys(), loading_info)
        return model

__all__ = [
    "SUPPORTED_SOURCE_TYPES",
    "AmoebaForCausalLM",
    "AmoebaModel",
    "AmoebaPreTrainedModel",
    "LayerInputs",
    "Shape",
]
