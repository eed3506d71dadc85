"""The shape-aware router of SMoL (AmoebaLLM §4): one router, fed the shape, gates the LoRA experts of every layer."""

import torch
import torch.nn.functional as F
from torch import nn


class ShapeRouter(nn.Module):
    """Maps a shape code `[layer-keep vector (L); width]` to sparse expert gates (top-k, softmax over the kept).

    The width enters as a scalar, so widths between grid points get their own gates. Gates depend only on the
    shape: in eval they are computed once per shape and cached (no noise, deterministic); in training they are
    recomputed every forward with noise `eps * softplus(noise(z))` so the router receives gradients.
    """

    def __init__(self, num_layers: int, experts: int, top_k: int, hidden: int = 16, noisy: bool = True):
        super().__init__()
        self.experts = experts
        self.top_k = min(top_k, experts)
        self.noisy = noisy
        self.encoder = nn.Linear(num_layers + 1, hidden)
        self.logits = nn.Linear(hidden, experts)
        self.noise = nn.Linear(num_layers + 1, experts)
        self.register_buffer("code", torch.ones(num_layers + 1), persistent=False)
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self._shape_version = 0

    def set_shape(self, kept_layers: list[int], width: float) -> None:
        code = torch.zeros_like(self.code)
        code[kept_layers] = 1.0
        code[-1] = width
        self.code = code
        self._shape_version += 1

    def _gates(self, noisy: bool) -> torch.Tensor:
        """Computed in the router's own dtype (float32) even under autocast, which would mix bf16 and fp32 here."""
        code = self.code.to(self.encoder.weight.dtype)
        with torch.autocast(device_type=code.device.type, enabled=False):
            logits = self.logits(self.encoder(code))
            if noisy:
                logits = logits + torch.randn_like(logits) * F.softplus(self.noise(code))
            top_values, top_indices = logits.topk(self.top_k)
            return torch.zeros_like(logits).scatter(0, top_indices, F.softmax(top_values, dim=-1))

    def deterministic_gates(self) -> torch.Tensor:
        """Gates without noise and without autograd history: what inference and export use.

        Cached per shape; the cache key includes the parameters' versions, so an optimizer step invalidates it.
        Computed outside inference mode so the cached tensor also serves later autograd-enabled forwards.
        """
        key = (self._shape_version, *(p._version for p in self.parameters()))
        if self._cached is None or self._cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                self._cached = (key, self._gates(noisy=False))
        return self._cached[1]

    def forward(self) -> torch.Tensor:
        if self.training:
            return self._gates(noisy=self.noisy)
        return self.deterministic_gates()

