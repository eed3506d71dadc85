"""A Linear whose active size is a prefix of its rows and columns: width is sliced, not masked."""

import torch
import torch.nn.functional as F
from torch import nn


class ElasticLinear(nn.Linear):
    """`nn.Linear` that computes with `weight[:active_out, :active_in]`, a view (no copy, no mask).

    Keeps the parameter names of `nn.Linear`, so Llama state dicts load unchanged. With `track_input_mean`, a
    buffer `input_mean` holds the calibration mean of each input channel; when input channels are pruned their
    mean contribution `W[:, pruned] @ mean[pruned]` is added as an output bias (FLAP bias compensation).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, track_input_mean: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.active_in = in_features
        self.active_out = out_features
        self.compensation: torch.Tensor | None = None
        if track_input_mean:
            self.register_buffer("input_mean", torch.zeros(in_features))

    def set_active(self, active_in: int | None = None, active_out: int | None = None) -> None:
        """Select the prefix of input columns / output rows to use; `None` means all."""
        self.active_in = self.in_features if active_in is None else active_in
        self.active_out = self.out_features if active_out is None else active_out
        mean = getattr(self, "input_mean", None)
        if mean is None or self.active_in == self.in_features:
            self.compensation = None
        else:
            with torch.no_grad():
                pruned = self.weight[: self.active_out, self.active_in :]
                self.compensation = pruned @ mean[self.active_in :].to(pruned.dtype)

    def active_weight(self) -> torch.Tensor:
        return self.weight[: self.active_out, : self.active_in]

    def active_bias(self) -> torch.Tensor | None:
        """Bias of the active rows, with the pruned channels' compensation folded in."""
        bias = None if self.bias is None else self.bias[: self.active_out]
        if self.compensation is None:
            return bias
        return self.compensation if bias is None else bias + self.compensation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.active_weight(), self.active_bias())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, active_in={self.active_in}, active_out={self.active_out}"


__all__ = ["ElasticLinear"]
