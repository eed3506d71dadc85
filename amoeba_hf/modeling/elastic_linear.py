"""A Linear whose active size is a prefix of its rows and columns: width is sliced, not masked."""

import math

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_CACHE_MODES = ("off", "strided", "merged")


class ElasticLinear(nn.Linear):
    """`nn.Linear` that computes with `weight[:active_out, :active_in]`, a view (no copy, no mask).

    Keeps the parameter names of `nn.Linear`, so Llama state dicts load unchanged. With `track_input_mean`, a
    buffer `input_mean` holds the calibration mean of each input channel; when input channels are pruned their
    mean contribution `W[:, pruned] @ mean[pruned]` is added as an output bias (FLAP bias compensation).

    The compensation is computed in `forward`, not when the width is set: under FSDP the weight is whole only
    there, and a later `.to(dtype)` or device move must not leave a stale copy behind.

    With `experts > 0` it also holds the SMoL LoRA experts `lora_A` (E x r x in) and `lora_B` (E x out x r). For
    gates g set by the model before each forward, the update is `s * (sum_e g_e B_e)(sum_e g_e A_e)` sliced to
    the active width, i.e. one ordinary rank-r LoRA per shape. Gates of `None` mean no update (a shape that runs
    the base weights only). Experts are float32 over a base of any dtype (as peft keeps adapters): their update
    is computed in their dtype and added in the base's.

    An output projection may hold width corrections (`width_correction_A` / `_B`, float32, frozen, one pair per
    fitted grid width, see `selection/compensation.py`): with one selected, the shape computes with
    `W[:, kept] + B A[:, kept]` and, with input means, the bias `W[:, pruned] @ mean[pruned] - B A[:, kept] @
    mean[kept]` (the centred fit's offset). The sum is formed in the weight's dtype, so export writes the same weight.

    Inference keeps a contiguous copy of the active weight where computing with the view would be slower
    (`weight_cache_mode`, see `set_weight_cache`): a column prefix `weight[:, :active_in]` is a strided view, and
    with `"merged"` the shape's LoRA update is folded into the copy (two matmuls fewer per token). The copy is
    made on the second forward at the same sizes, so `set_active` stays cheap and a one-off forward (a prefill
    right after a shape switch) pays no copy; it is rebuilt whenever the sizes, weight, bias, gates or experts
    change, and never used while autograd needs gradients through them, so training is unchanged.
    """

    weight_cache_mode: str = "strided"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        track_input_mean: bool = False,
        experts: int = 0,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.active_in = in_features
        self.active_out = out_features
        self._compensation: tuple[tuple, torch.Tensor] | None = None
        if track_input_mean:
            self.register_buffer("input_mean", torch.zeros(in_features))
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.gates: torch.Tensor | None = None
        self._mixed: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._weight_cache: tuple[tuple, tuple, torch.Tensor | None, torch.Tensor | None] | None = None
        self.width_correction_A: nn.ParameterDict | None = None
        self.width_correction_B: nn.ParameterDict | None = None
        self.active_correction: str | None = None
        if experts > 0:
            self.add_experts(experts, rank, alpha, dropout)

    def add_experts(self, experts: int, rank: int, alpha: float, dropout: float) -> None:
        """Attach E LoRA experts (A random, B zero: the model's function is unchanged until trained)."""
        options = {"dtype": torch.float32, "device": self.weight.device}
        self.lora_A = nn.Parameter(torch.empty(experts, rank, self.in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(experts, self.out_features, rank, **options))
        self.reset_experts()
        self.lora_scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def reset_experts(self) -> None:
        with torch.no_grad():
            for expert in self.lora_A:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            self.lora_B.zero_()

    def new_corrections(self, sizes: dict[str, tuple[int, int]], device: torch.device | None = None) -> None:
        """Zero width corrections (no change until set), `sizes[key] = (rank, kept input columns)`, float32 and
        frozen; `{}` removes them. None is selected after."""
        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float32, device=device), requires_grad=False)

        if sizes:
            self.width_correction_A = nn.ParameterDict({key: zeros(r, kept) for key, (r, kept) in sizes.items()})
            self.width_correction_B = nn.ParameterDict({key: zeros(self.out_features, r) for key, (r, _) in
                                                        sizes.items()})
        else:
            self.width_correction_A = self.width_correction_B = None
        self.active_correction = None

    def select_correction(self, key: str | None) -> None:
        """Use the width correction stored under `key` (if this projection has one; the model picks a key whose kept
        columns cover the active ones), or none."""
        corrections = self.width_correction_A
        self.active_correction = key if corrections is not None and key in corrections else None

    def correction(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A sliced to the active input columns, B sliced to the active rows) of the selected correction, or `None`
        without one or at full input width."""
        key = self.active_correction
        if key is None or self.active_in == self.in_features:
            return None
        return self.width_correction_A[key][:, : self.active_in], self.width_correction_B[key][: self.active_out]

    def _correction_state(self) -> tuple | None:
        """What the selected correction's folded weight and bias depend on (cache keys)."""
        correction = self.correction()
        if correction is None:
            return None
        a, b = self.width_correction_A[self.active_correction], self.width_correction_B[self.active_correction]
        return self.active_correction, id(a), a._version, id(b), b._version

    def set_active(self, active_in: int | None = None, active_out: int | None = None) -> None:
        """Select the prefix of input columns / output rows to use; `None` means all."""
        active_in = self.in_features if active_in is None else active_in
        active_out = self.out_features if active_out is None else active_out
        if (active_in, active_out) != (self.active_in, self.active_out):
            self._weight_cache = None
        self.active_in, self.active_out = active_in, active_out

    def compensation(self) -> torch.Tensor | None:
        """`W[:active_out, pruned] @ input_mean[pruned]` (less `B A[:, kept] @ input_mean[kept]` with a width
        correction) in the weight's dtype (accumulated in float32), or `None` without calibration means or pruned
        inputs; cached per sizes, weight version and correction."""
        mean = getattr(self, "input_mean", None)
        if mean is None or self.active_in == self.in_features:
            return None
        weight = self.weight
        key = (self.active_in, self.active_out, id(weight), weight.data_ptr(), weight._version, weight.dtype,
               id(mean), mean._version, self._correction_state())
        if self._compensation is None or self._compensation[0] != key:
            with torch.no_grad():
                pruned = weight[: self.active_out, self.active_in :].float()
                value = pruned @ mean[self.active_in :].to(pruned)
                correction = self.correction()
                if correction is not None:
                    a, b = correction
                    value = value - b @ (a @ mean[: self.active_in].to(a))
                value = value.to(weight.dtype)
            self._compensation = (key, value)
        return self._compensation[1]

    def active_weight(self) -> torch.Tensor:
        if self.active_out == self.out_features and self.active_in == self.in_features:
            return self.weight
        return self.weight[: self.active_out, : self.active_in]

    def shape_weight(self) -> torch.Tensor:
        """Active weight with the selected width correction folded in (`W[:, kept] + B A[:, kept]`, the update cast
        to the weight's dtype): what the shape computes with and export writes, LoRA aside."""
        weight = self.active_weight()
        correction = self.correction()
        if correction is None:
            return weight
        a, b = correction
        return weight + (b @ a).to(weight.dtype)

    def active_bias(self) -> torch.Tensor | None:
        """Bias of the active rows, with the pruned channels' compensation folded in."""
        bias = self.bias if self.bias is None or self.active_out == self.out_features else self.bias[: self.active_out]
        compensation = self.compensation()
        if compensation is None:
            return bias
        return compensation if bias is None else bias + compensation

    def mixed_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff) for the current gates, sliced to the active width.

        Cached while gates and expert weights are unchanged (inference); recomputed when they carry gradients.
        """
        key = (id(self.gates), self.gates._version, self.lora_A._version, self.lora_B._version, id(self.lora_A))
        gates = self.gates.to(self.lora_A)
        if self.gates.requires_grad or (torch.is_grad_enabled() and self.lora_A.requires_grad):
            mixed_a = torch.einsum("e,eri->ri", gates, self.lora_A)
            mixed_b = torch.einsum("e,eor->or", gates, self.lora_B)
        elif self._mixed is not None and self._mixed[0] == key:
            mixed_a, mixed_b = self._mixed[1]
        else:
            with torch.inference_mode(False), torch.no_grad():
                mixed_a = torch.einsum("e,eri->ri", gates, self.lora_A)
                mixed_b = torch.einsum("e,eor->or", gates, self.lora_B)
            self._mixed = (key, (mixed_a, mixed_b))
        return mixed_a[:, : self.active_in], mixed_b[: self.active_out]

    def merged_weight(self) -> torch.Tensor:
        """Shape weight (`shape_weight`) with the current shape's LoRA update merged in (for export)."""
        if self.lora_A is None or self.gates is None:
            return self.shape_weight()
        mixed_a, mixed_b = self.mixed_experts()
        return self.shape_weight() + (self.lora_scaling * (mixed_b @ mixed_a)).to(self.weight.dtype)

    def set_weight_cache(self, mode: str) -> None:
        """`"strided"` (default): cache a contiguous copy where input columns are sliced; `"merged"`: also cache
        the weight with the shape's LoRA merged in, for every linear with gates; `"off"`: never, and free it."""
        if mode not in WEIGHT_CACHE_MODES:
            raise ValueError(f"weight cache mode must be one of {', '.join(WEIGHT_CACHE_MODES)}, got {mode!r}")
        self.weight_cache_mode = mode
        self._weight_cache = None

    def weight_cache_bytes(self) -> int:
        """Memory the cache adds: its weight and bias, less what are views of parameters or the compensation."""
        if self._weight_cache is None:
            return 0
        return sum(
            tensor.numel() * tensor.element_size() for tensor in self._weight_cache[2:]
            if tensor is not None and tensor._base is None and tensor is not self.compensation()
        )

    def _weight_cache_key(self, merge: bool) -> tuple | None:
        """What the cached weight depends on: the sizes, and the identity, storage and version of each source
        tensor (the entry keeps them alive, so ids stay unique). `None` for inference tensors (no version)."""
        weight, bias, gates = self.weight, self.bias, self.gates
        try:
            mean = getattr(self, "input_mean", None)
            key = (
                self.active_in, self.active_out, merge, None if mean is None else (id(mean), mean._version),
                id(weight), weight.data_ptr(), weight._version, None if bias is None else (id(bias), bias._version),
                self._correction_state(),
            )
            if merge:
                lora_a, lora_b = self.lora_A, self.lora_B
                key += (id(gates), gates._version, id(lora_a), lora_a._version, id(lora_b), lora_b._version)
        except RuntimeError:
            return None
        return key

    def cached_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, bool] | None:
        """(weight, bias, LoRA merged) from the cache, or `None` where the plain path is as fast or must be used."""
        mode = self.weight_cache_mode
        merge = (
            mode == "merged" and self.gates is not None and self.lora_A is not None
            and not (self.training and isinstance(self.lora_dropout, nn.Dropout))
        )
        if mode == "off" or (not merge and self.active_in == self.in_features):
            return None
        if torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad
            for tensor in (self.weight, self.bias, self.gates, self.lora_A, self.lora_B, *(self.correction() or ()))
        ):
            return None
        key = self._weight_cache_key(merge)
        if key is None:
            return None
        entry = self._weight_cache
        if entry is None or entry[0] != key:
            sources = (self.weight, self.bias, getattr(self, "input_mean", None), self.gates, self.lora_A, self.lora_B,
                       *(self.correction() or ()))
            self._weight_cache = (key, sources, None, None)
            return None
        weight, bias = entry[2], entry[3]
        if weight is None:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.merged_weight() if merge else self.shape_weight().contiguous()
                bias = self.active_bias()
            self._weight_cache = (key, entry[1], weight, bias)
        return weight, bias, merge

    def __getstate__(self) -> dict:
        """Copies (`shape_view`, pickling) start without this module's cached tensors; they rebuild on use."""
        state = super().__getstate__()
        state["_weight_cache"] = None
        state["_mixed"] = None
        state["_compensation"] = None
        return state

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        cached = self.cached_weight()
        if cached is None:
            output = F.linear(input, self.shape_weight(), self.active_bias())
        else:
            weight, bias, merged = cached
            output = F.linear(input, weight, bias)
            if merged:
                return output
        if self.lora_A is None or self.gates is None:
            return output
        mixed_a, mixed_b = self.mixed_experts()
        update = F.linear(F.linear(self.lora_dropout(input).to(mixed_a.dtype), mixed_a), mixed_b)
        return output + (self.lora_scaling * update).to(output.dtype)

    def extra_repr(self) -> str:
        experts = "" if self.lora_A is None else f", experts={self.lora_A.shape[0]}, rank={self.lora_A.shape[1]}"
        return f"{super().extra_repr()}, active_in={self.active_in}, active_out={self.active_out}{experts}"


def set_weight_cache(model: nn.Module, mode: str = "strided") -> None:
    """Set the inference weight cache of every `ElasticLinear` in `model` (see `ElasticLinear.set_weight_cache`)."""
    for module in model.modules():
        if isinstance(module, ElasticLinear):
            module.set_weight_cache(mode)


def weight_cache_bytes(model: nn.Module) -> int:
    """Bytes held by the weight caches of every `ElasticLinear` in `model`."""
    return sum(module.weight_cache_bytes() for module in model.modules() if isinstance(module, ElasticLinear))


__all__ = ["WEIGHT_CACHE_MODES", "ElasticLinear", "set_weight_cache", "weight_cache_bytes"]
