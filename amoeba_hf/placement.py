"""Where a model lives and in which dtype: the `--dtype`/`--device`/`--device-map` of every command that loads one,
and the device its inputs must be on."""

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass
class LoadSettings:
    """How a command loads its model, passed to transformers' own `from_pretrained(dtype=..., device_map=...)`.

    Where the weights go does not change the result: only `dtype` is in the resume fingerprint."""

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("device", "device_map")

    dtype: str = field(
        default="auto",
        metadata={"help": "weights' dtype: the source's own (auto), bfloat16, float16 or float32", "choices": DTYPES},
    )
    device: str | None = field(
        default=None, metadata={"help": "device for the whole model, e.g. cuda, cuda:1, cpu (default: cuda if any)"}
    )
    device_map: str | None = field(
        default=None, metadata={"help": "spread layers over devices: auto, balanced, sequential (overrides --device)"}
    )

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"--device {self.device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from error
            check_device(self.device)

    def from_pretrained_kwargs(self) -> dict:
        """`dtype` and `device_map` for `from_pretrained`; when nothing was asked, this process's GPU if there is one
        (`LOCAL_RANK` under `accelerate launch`)."""
        self.validate()
        device_map = self.device_map or self.device
        if device_map is None and torch.cuda.is_available():
            device_map = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        dtype = self.dtype if self.dtype == "auto" else getattr(torch, self.dtype)
        return {"dtype": dtype} if device_map is None else {"dtype": dtype, "device_map": device_map}


def check_device(name: str) -> None:
    """Refuse a device this machine lacks (torch would fail later with an assertion about how it was compiled)."""
    device = torch.device(name)
    if device.type in ("cpu", "meta"):
        return
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {name}: this machine has no {device.type} device that torch can use; "
                         "use --device cpu")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0..{device.type}:{count - 1}")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (the first of several under a device map)."""
    return model.get_input_embeddings().weight.device


__all__ = ["DTYPES", "LoadSettings", "check_device", "input_device"]
