"""The shape vocabulary: what a shape is, how it is written ("DEPTHxWIDTH"), which layers a depth keeps, how many
KV groups, query heads and neurons a width keeps, and what it costs.

Pure functions of the config (plus, for global widths, per-layer importance scores), so that training, export,
evaluation and deployment code agree on what a shape is without touching weights.
"""

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Real
from typing import NamedTuple

import torch

SHAPE_PATTERN = re.compile(r"(\d+)x(\d*\.?\d+)")


class Shape(NamedTuple):
    """A subnet: `depth` decoder layers (which ones: the depth table), `width` the fraction of their parameters."""

    depth: int
    width: float


@dataclass(frozen=True)
class LayerWidth:
    """Active size of one decoder layer: KV groups, query heads per group and a prefix of MLP neurons.

    A width removes whole KV groups (`attention_unit="kv_groups"`: every kept group keeps all its query heads) or
    query heads inside every group (`"query_heads"`: every group is kept), never both.
    """

    key_value_groups: int
    intermediate_size: int
    query_heads_per_group: int

    @property
    def query_heads(self) -> int:
        return self.key_value_groups * self.query_heads_per_group


def default_depth_table(num_layers: int, min_depth: int) -> dict[str, list[int]]:
    """Uncalibrated table: drop layers from the end but keep the last one (it maps to the output space)."""
    table = {str(num_layers): list(range(num_layers))}
    for depth in range(min_depth, num_layers):
        table[str(depth)] = list(range(depth - 1)) + [num_layers - 1]
    return table


def full_layer_sizes(config) -> list[LayerWidth]:
    """Physical size of every layer (differs per layer only in a statically exported subnet)."""
    num_layers = config.num_hidden_layers
    kv_heads = config.layer_num_key_value_heads or [config.num_key_value_heads] * num_layers
    intermediate = config.layer_intermediate_sizes or [config.intermediate_size] * num_layers
    per_group = config.num_attention_heads // config.num_key_value_heads
    query_heads = config.layer_num_attention_heads or [k * per_group for k in kv_heads]
    return [LayerWidth(k, i, q // k) for k, i, q in zip(kv_heads, intermediate, query_heads)]


def _has_qkv_bias(config) -> bool:
    return bool(config.attention_bias or config.qkv_bias)


def attention_parameters(config, size: LayerWidth) -> int:
    """Parameters of a layer's attention at `size`: q, k, v rows and o columns (with q/k/v biases), o bias excluded."""
    query_rows, kv_rows = size.query_heads * config.head_dim, size.key_value_groups * config.head_dim
    bias = query_rows + 2 * kv_rows if _has_qkv_bias(config) else 0
    return config.hidden_size * (2 * query_rows + 2 * kv_rows) + bias


def attention_item_cost(config) -> int:
    """Parameters of one attention width item of a full-size layer.

    A KV group: its query heads' q rows and o columns plus its own k and v rows. A query-head slot
    (`attention_unit="query_heads"`): one query head of every KV group, i.e. their q rows and o columns.
    """
    per_group = config.num_attention_heads // config.num_key_value_heads
    if config.attention_unit == "query_heads":
        slot_rows = config.num_key_value_heads * config.head_dim
        return 2 * config.hidden_size * slot_rows + (slot_rows if _has_qkv_bias(config) else 0)
    return attention_parameters(config, LayerWidth(1, 0, per_group))


def fixed_attention_cost(config) -> int:
    """Attention parameters of a full-size layer that no width removes: with query-head slots, the k and v rows."""
    if config.attention_unit != "query_heads":
        return 0
    kv_rows = config.num_key_value_heads * config.head_dim
    return 2 * config.hidden_size * kv_rows + (2 * kv_rows if _has_qkv_bias(config) else 0)


def neuron_cost(config) -> int:
    """Parameters of one MLP neuron: a gate row, an up row and a down column."""
    return 3 * config.hidden_size + (2 if config.mlp_bias else 0)


def fixed_layer_cost(config) -> int:
    """Parameters of a kept layer that no width removes: two RMSNorms and output biases."""
    out_biases = (1 if config.attention_bias else 0) + (1 if config.mlp_bias else 0)
    return config.hidden_size * (2 + out_biases)


def check_widths(widths: Iterable[float] | None) -> None:
    """Refuse a width grid (a settings field; None for the model's) with a width outside (0, 1]."""
    for width in widths or ():
        if not 0.0 < width <= 1.0:
            raise ValueError(f"width {width} is outside (0, 1]")


def _round_count(width: float, full: int) -> int:
    return min(full, max(1, math.floor(width * full + 0.5)))


def uniform_layer_width(full: LayerWidth, width: float, attention_unit: str = "kv_groups") -> LayerWidth:
    """Same fraction of attention items (KV groups, or query heads per group) and of MLP neurons in every layer,
    rounded to the nearest whole item.

    Counts grow monotonically with width, so a narrower shape keeps a subset of a wider shape's items (nested).
    With few attention items the parameter ratio differs from `width`; `ShapeSpace.parameter_count` gives the exact
    one.
    """
    neurons = _round_count(width, full.intermediate_size)
    if attention_unit == "query_heads":
        return LayerWidth(full.key_value_groups, neurons, _round_count(width, full.query_heads_per_group))
    return LayerWidth(_round_count(width, full.key_value_groups), neurons, full.query_heads_per_group)


def compensation_key(width: float) -> str:
    """Name of a grid width's width correction in a ParameterDict, which allows no dots: 0.875 -> "0_875"."""
    return f"{width:g}".replace(".", "_")


def compensation_sizes(
    config, projection: str, size: LayerWidth, widths: Iterable[float] | None = None, rank: int | None = None
) -> dict[str, tuple[int, int]]:
    """(rank, kept input columns) of each width correction of a layer's `"o_proj"` or `"down_proj"`, the layer at full
    size `size`, by `compensation_key`; a width keeping every column has none. `widths` and `rank` default to the
    config's `width_compensation` and `width_compensation_rank`."""
    widths = config.width_compensation or () if widths is None else widths
    rank = config.width_compensation_rank if rank is None else rank
    sizes = {}
    for width in widths:
        kept_size = uniform_layer_width(size, width, config.attention_unit)
        if projection == "o_proj":
            full, kept = size.query_heads * config.head_dim, kept_size.query_heads * config.head_dim
        else:
            full, kept = size.intermediate_size, kept_size.intermediate_size
        if kept < full:
            sizes[compensation_key(width)] = (min(rank, kept, config.hidden_size), kept)
    return sizes


class GlobalWidthAllocator:
    """One importance threshold over the items (attention items, neurons) of all active layers, weighted by cost.

    Attention items are KV groups, or query-head slots with `attention_unit="query_heads"` (whose k and v rows stay:
    they count as kept parameters of every width). Scores must be sorted descending within each layer (weights are
    permuted by importance, so a layer's kept items are a prefix). Every layer keeps at least one attention item and
    one neuron. The global order is sorted once; a width then costs one masked cumulative sum.
    """

    def __init__(self, config, attention_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor]):
        attention_cost, n_cost = attention_item_cost(config), neuron_cost(config)
        layers, costs, scores = [], [], []
        for index, (items, neurons) in enumerate(zip(attention_scores, neuron_scores)):
            for kind, (values, cost) in enumerate(((items, attention_cost), (neurons, n_cost))):
                optional = values.detach().float().cpu()[1:]
                scores.append(optional)
                costs.append(torch.full_like(optional, float(cost), dtype=torch.float64))
                layers.append(torch.full_like(optional, 2 * index + kind, dtype=torch.long))
        order = torch.argsort(torch.cat(scores), descending=True, stable=True)
        self._slot = torch.cat(layers)[order]
        self._cost = torch.cat(costs)[order]
        self._num_layers = len(attention_scores)
        self._full = [(len(a), len(n)) for a, n in zip(attention_scores, neuron_scores)]
        self._attention_cost, self._n_cost = attention_cost, n_cost
        self._fixed_attention = fixed_attention_cost(config)
        self._query_heads = config.attention_unit == "query_heads"
        self._groups = config.num_key_value_heads
        self._per_group = config.num_attention_heads // config.num_key_value_heads

    def layer_widths(self, width: float, active_layers: list[int]) -> dict[int, LayerWidth]:
        active = torch.zeros(2 * self._num_layers, dtype=torch.bool)
        for index in active_layers:
            active[2 * index : 2 * index + 2] = True
        keep_mask = active[self._slot]
        total = sum(self._fixed_attention + items * self._attention_cost + neurons * self._n_cost
                    for items, neurons in (self._full[i] for i in active_layers))
        mandatory = len(active_layers) * (self._fixed_attention + self._attention_cost + self._n_cost)
        budget = width * total - mandatory
        spent = torch.cumsum(self._cost * keep_mask, dim=0)
        selected = keep_mask & (spent <= budget + 0.5 * self._n_cost)
        extra = torch.bincount(self._slot[selected], minlength=2 * self._num_layers).tolist()
        widths = {}
        for i in active_layers:
            items, neurons = 1 + extra[2 * i], 1 + extra[2 * i + 1]
            if self._query_heads:
                widths[i] = LayerWidth(self._groups, neurons, items)
            else:
                widths[i] = LayerWidth(items, neurons, self._per_group)
        return widths


class ShapeSpace:
    """Valid shapes of a model and what each keeps. Built from the config; global widths need the allocator."""

    def __init__(self, config, allocator: GlobalWidthAllocator | None = None):
        self.num_layers = config.num_hidden_layers
        self.min_depth = config.min_depth
        self.min_width = config.min_width
        self.width_grid = sorted(config.width_grid, reverse=True)
        self.width_mode = config.width_mode
        self.attention_unit = config.attention_unit
        self.depth_table = config.depth_table or default_depth_table(self.num_layers, self.min_depth)
        self.full_sizes = full_layer_sizes(config)
        self._config = config
        self._allocator = allocator
        if self.width_mode == "global" and allocator is None:
            raise ValueError(
                "width_mode='global' needs calibrated importance scores from a global calibration, which this model "
                "lacks (its widths were calibrated with width_mode 'uniform', or not at all); re-calibrate it with "
                "`amoeba calibrate --width-mode global`"
            )

    @property
    def full_shape(self) -> Shape:
        """Every layer at full width: the converted source model itself."""
        return Shape(self.num_layers, 1.0)

    @property
    def depths(self) -> list[int]:
        return sorted((int(d) for d in self.depth_table), reverse=True)

    def validate(self, depth, width) -> tuple[int, float]:
        """Normalise a shape or raise a ValueError that says what is valid."""
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise ValueError(f"depth must be an int in {self.min_depth}..{self.num_layers}, got {depth!r}")
        if str(depth) not in self.depth_table:
            raise ValueError(f"depth {depth} is not in the shape space; valid depths: {self.min_depth}..{self.num_layers}")
        if isinstance(width, bool) or not isinstance(width, Real) or math.isnan(float(width)):
            raise ValueError(f"width must be a number in [{self.min_width}, 1.0], got {width!r}")
        width = float(width)
        if not self.min_width <= width <= 1.0:
            raise ValueError(f"width {width} is outside [{self.min_width}, 1.0] (min_width of this model)")
        return depth, width

    def kept_layers(self, depth: int) -> list[int]:
        return list(self.depth_table[str(depth)])

    def layer_widths(self, depth: int, width: float) -> dict[int, LayerWidth]:
        """Active size of every kept layer at this shape (layer index -> size)."""
        kept = self.kept_layers(depth)
        if width == 1.0:
            return {i: self.full_sizes[i] for i in kept}
        if self.width_mode == "global":
            return self._allocator.layer_widths(width, kept)
        return {i: uniform_layer_width(self.full_sizes[i], width, self.attention_unit) for i in kept}

    def compensation_width(self, width: float) -> float | None:
        """The fitted grid width whose width correction a shape of this width uses: the narrowest one at or above it
        (A sliced to the kept columns), none at full width or above every fitted width.

        Not simply the nearest: a narrower grid point's correction stands in for channels this width still keeps, and
        would count their contribution twice; a wider one's only for channels this width removes too.
        """
        fitted = [w for w in self._config.width_compensation or () if w >= width]
        return min(fitted) if fitted and width < 1.0 else None

    def parameter_count(self, depth: int, width: float) -> int:
        """Parameters of the physically sliced subnet (embeddings and head included, tied weights once)."""
        config = self._config
        embed = config.vocab_size * config.hidden_size
        total = embed * (1 if config.tie_word_embeddings else 2) + config.hidden_size
        n_cost, fixed = neuron_cost(config), fixed_layer_cost(config)
        for size in self.layer_widths(depth, width).values():
            total += fixed + attention_parameters(config, size) + size.intermediate_size * n_cost
        return total

    def grid(self) -> list[tuple[int, float]]:
        """The training/evaluation grid: every depth of the table times every width of `width_grid`."""
        return [(d, w) for d in self.depths for w in self.width_grid]


def shape_key(depth: int, width: float) -> str:
    """The "DEPTHxWIDTH" spelling of a shape (e.g. `24x0.75`), used in result files, profiles and on the command line."""
    return f"{depth}x{width:g}"


def parse_shapes(spec: str, space: ShapeSpace) -> list[tuple[int, float]]:
    """`grid` (the model's training grid) or comma-separated DEPTHxWIDTH, e.g. `30x1,24x0.75`; each validated."""
    if spec.strip() == "grid":
        return list(space.grid())
    shapes = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        match = SHAPE_PATTERN.fullmatch(part)
        if match is None:
            raise ValueError(f"shape {part!r} must be DEPTHxWIDTH (e.g. 24x0.75) or the word 'grid'")
        shapes.append(space.validate(int(match.group(1)), float(match.group(2))))
    if not shapes:
        raise ValueError("no shapes given; pass e.g. --shapes 30x1,24x0.75 or --shapes grid")
    return list(dict.fromkeys(shapes))


__all__ = [
    "GlobalWidthAllocator",
    "LayerWidth",
    "Shape",
    "ShapeSpace",
    "check_widths",
    "compensation_key",
    "compensation_sizes",
    "default_depth_table",
    "parse_shapes",
    "shape_key",
    "uniform_layer_width",
]
