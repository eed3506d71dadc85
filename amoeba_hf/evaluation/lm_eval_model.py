"""lm-evaluation-harness model `amoeba`: one shape of an any-shape checkpoint, scored by the harness's own HF code.

From Python, import this module and use `lm_eval.simple_evaluate(model="amoeba", model_args=...)`. The stock
`lm_eval` command cannot discover models of other packages, so the same CLI is installed as `amoeba-lm-eval`:

    amoeba-lm-eval --model amoeba --model_args pretrained=DIR,depth=24,width=0.75 --tasks arc_easy --device cpu

Needs the `eval` extra: pip install "amoeba_hf[eval]".
"""

import torch
from transformers import PreTrainedModel

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "the `amoeba` lm-eval model needs lm-evaluation-harness, which the `eval` extra installs: "
        "pip install 'amoeba_hf[eval]'"
    ) from error


@register_model("amoeba")
class AmoebaLM(HFLM):
    """`HFLM` that loads an Amoeba checkpoint with its remote code and switches it to (`depth`, `width`).

    `pretrained` may also be an already loaded Amoeba model; its shape is set in place. `depth` defaults to all
    layers, `width` to 1.0; an invalid shape raises the model's ValueError listing the valid range.
    """

    def __init__(
        self, pretrained: str | PreTrainedModel, depth: int | None = None, width: float = 1.0, **kwargs
    ) -> None:
        kwargs.setdefault("trust_remote_code", True)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(pretrained=pretrained, **kwargs)
        if not hasattr(self.model, "set_shape"):
            raise ValueError(f"{pretrained} is not an Amoeba checkpoint (no set_shape); evaluate it with --model hf")
        space = self.model.shape_space
        self.model.set_shape(space.num_layers if depth is None else int(depth), float(width))

    def get_model_info(self) -> dict:
        depth, width = self.model.shape
        return {**super().get_model_info(), "amoeba_depth": depth, "amoeba_width": width}


def main() -> None:
    """The lm-eval command line with the `amoeba` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = ["AmoebaLM", "main"]
