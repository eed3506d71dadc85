"""Which KV groups (or query heads) and MLP neurons each width keeps: FLAP-style importance (AmoebaLLM §3) and
baselines.

Statistics of the inputs of `o_proj` and `down_proj` are streamed over calibration tokens. Each layer's attention
items (KV groups, or query-head slots) and neurons are then permuted by importance (the full model's function is
unchanged), so every width keeps a prefix and slicing stays a view.
"""

import torch
from torch import nn
from tqdm.auto import tqdm

WIDTH_METHODS = ("flap", "magnitude", "wanda-sp", "random")
ATTENTION_UNITS = ("kv_groups", "query_heads")


class ChannelStatistics:
    """Exact streaming mean and variance per channel (Chan et al. parallel update, float64 accumulators)."""

    def __init__(self, size: int):
        self.count = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)

    def update(self, values: torch.Tensor) -> None:
        rows = values.detach().reshape(-1, values.shape[-1]).double()
        if self.mean.device != rows.device:
            self.mean, self.m2 = self.mean.to(rows.device), self.m2.to(rows.device)
        batch_count = rows.shape[0]
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta**2 * self.count * batch_count / total
        self.count = total

    def to_state(self) -> dict:
        return {"count": torch.tensor(self.count), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state(cls, state: dict) -> "ChannelStatistics":
        stats = cls(state["mean"].numel())
        stats.count, stats.mean, stats.m2 = int(state["count"]), state["mean"], state["m2"]
        return stats

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over all tokens seen."""
        return self.m2 / self.count

    @property
    def mean_square(self) -> torch.Tensor:
        return self.variance + self.mean**2


def collect_statistics(model, input_ids: torch.Tensor, chunk_size: int = 4, show_progress: bool = True) -> dict:
    """Per layer, statistics of the inputs of o_proj ("attention") and down_proj ("mlp") at full shape."""
    stats, hooks = {}, []
    for index, projections in enumerate(model.model.output_projections()):
        for kind, linear in zip(("attention", "mlp"), projections):
            stats[index, kind] = ChannelStatistics(linear.in_features)
            hooks.append(linear.register_forward_pre_hook(lambda _m, args, s=stats[index, kind]: s.update(args[0])))
    try:
        with torch.no_grad(), model.shaped(*model.shape_space.full_shape):
            for start in tqdm(range(0, input_ids.shape[0], chunk_size), desc="width statistics", disable=not show_progress):
                model(input_ids[start : start + chunk_size], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _standardise(scores: torch.Tensor) -> torch.Tensor:
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def channel_scores(method: str, linear: nn.Linear, stats: ChannelStatistics, generator: torch.Generator) -> torch.Tensor:
    """Importance of each input channel of an output projection (higher is kept longer)."""
    weight = linear.weight.detach().double()
    if method == "flap":
        return stats.variance * weight.pow(2).sum(0)
    if method == "magnitude":
        return weight.pow(2).sum(0).sqrt()
    if method == "wanda-sp":
        return weight.abs().sum(0) * stats.mean_square.sqrt()
    if method == "random":
        return torch.rand(weight.shape[1], generator=generator, dtype=torch.float64)
    raise ValueError(f"unknown width method {method!r}; choose from {WIDTH_METHODS}")


def layer_scores(
    model, stats: dict, method: str = "flap", seed: int = 0, attention_unit: str = "kv_groups"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Standardised importance (z-scores, comparable across layers) of the attention and the neurons, per layer.

    Attention: per KV group (`attention_unit="kv_groups"`), or per query head as a (KV group, head within the group)
    tensor (`"query_heads"`); each is the mean z-score of its o_proj input channels, in the stored order.
    """
    if attention_unit not in ATTENTION_UNITS:
        raise ValueError(f"attention_unit must be one of {', '.join(ATTENTION_UNITS)}, got {attention_unit!r}")
    generator = torch.Generator().manual_seed(seed)
    attention_scores, neuron_scores = [], []
    for index, layer in enumerate(model.model.layers):
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        attention = _standardise(channel_scores(method, o_proj, stats[index, "attention"], generator))
        by_head = layer.self_attn.heads_by_group(attention)
        if attention_unit == "query_heads":
            attention_scores.append(by_head.mean(-1))
        else:
            attention_scores.append(by_head.reshape(by_head.shape[0], -1).mean(1))
        neuron_scores.append(_standardise(channel_scores(method, down_proj, stats[index, "mlp"], generator)))
    return attention_scores, neuron_scores


def slot_orders(head_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (KV group, query head) scores: each group's heads best first (slot s = the s-th best head of every group)
    and the slots' scores, the mean over groups (like a KV group's score, a mean, so it compares with neurons')."""
    ranked, order = torch.sort(head_scores, dim=1, descending=True, stable=True)
    return order, ranked.mean(0)


def apply_width_order(
    model,
    attention_scores: list[torch.Tensor],
    neuron_scores: list[torch.Tensor],
    stats: dict | None,
    width_mode: str = "global",
    bias_compensation: bool = True,
    attention_unit: str = "kv_groups",
) -> None:
    """Permute every layer by importance, store what set_shape needs, and switch the model's width mode.

    `attention_scores` are `layer_scores`' for the same `attention_unit`. Stores sorted importance (global mode)
    and per-channel input means (bias compensation) as buffers, so the checkpoint carries them and any width can
    be cut later. With `"query_heads"` every width keeps all KV groups and the same number of query heads in each.
    """
    if width_mode not in ("global", "uniform"):
        raise ValueError(f"width_mode must be 'global' or 'uniform', got {width_mode!r}")
    if attention_unit not in ATTENTION_UNITS:
        raise ValueError(f"attention_unit must be one of {', '.join(ATTENTION_UNITS)}, got {attention_unit!r}")
    if bias_compensation and stats is None:
        raise ValueError("bias compensation needs calibration statistics")
    layers = range(len(attention_scores))
    input_means = [(stats[i, "attention"].mean, stats[i, "mlp"].mean) for i in layers] if bias_compensation else None
    if attention_unit == "query_heads":
        attention_orders, item_scores = zip(*(slot_orders(scores) for scores in attention_scores))
    else:
        attention_orders = [torch.argsort(scores, descending=True, stable=True) for scores in attention_scores]
        item_scores = attention_scores
    model.model.permute_widths(
        list(attention_orders),
        [torch.argsort(scores, descending=True, stable=True) for scores in neuron_scores],
        input_means=input_means,
        importance=list(zip(item_scores, neuron_scores)) if width_mode == "global" else None,
        attention_unit=attention_unit,
    )
