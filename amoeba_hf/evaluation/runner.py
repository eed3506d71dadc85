"""Evaluate a list of shapes of one loaded model: set_shape between shapes, save after every (shape, task).

Results are written atomically after each (shape, task), so an interrupted run resumes where it stopped; a
results file written with other settings or another model (its fingerprint, see amoeba_hf.fingerprint) is refused
rather than mixed.
"""

import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..fingerprint import Fingerprint, loaded_model_identity, model_dtype, settings_record
from ..io import write_text_atomically
from ..modeling.shape_space import shape_key
from .scoring import EncodedTask, EncodedText, encode_task, score_task
from .tasks import load_task, task_label

DEFAULT_PPL_WINDOW = 2048


@dataclass(frozen=True)
class EvalSettings:
    """Everything that determines the numbers, also the flags of `amoeba eval` (batch size does not determine them,
    so it is not here and may change when resuming)."""

    data_dir: str = field(
        metadata={"help": "folder holding the evaluation sets (layout in docs/results.md)", "required": True}
    )
    limit: int | None = field(default=None, metadata={"help": "seeded subset of N items per multiple-choice task"})
    mmlu_limit: int | None = field(
        default=None, metadata={"help": "seeded subset of N questions per MMLU subject"}
    )
    seed: int = field(default=1234, metadata={"help": "seed of the subsets"})
    ppl_window: int | None = field(
        default=None,
        metadata={"help": f"perplexity window in tokens (default: {DEFAULT_PPL_WINDOW}, or the model's "
                          "max_position_embeddings if that is smaller)"},
    )
    ppl_stride: int | None = field(
        default=None, metadata={"help": "window stride (default: the window, no overlap)"}
    )
    ppl_tokens: int | None = field(default=None, metadata={"help": "score only the first N tokens of the text"})

    def validate(self, max_position_embeddings: int | None = None) -> None:
        """Check the settings before a model is loaded, and the perplexity window against the model's context
        length once it is (a longer window is scored at positions the model never saw, without an error)."""
        if not Path(self.data_dir).is_dir():
            raise ValueError(f"data_dir {self.data_dir} (--data-dir) is not a folder")
        for name in ("limit", "mmlu_limit", "ppl_window", "ppl_stride", "ppl_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_position_embeddings is not None and self.ppl_window > max_position_embeddings:
            raise ValueError(f"ppl_window (--ppl-window) {self.ppl_window} exceeds the model's "
                             f"max_position_embeddings ({max_position_embeddings})")


    def for_model(self, max_position_embeddings: int | None) -> "EvalSettings":
        """These settings with the default window chosen for a model: `DEFAULT_PPL_WINDOW` tokens, or the model's
        context length if that is shorter (a window the model cannot hold would be refused by `validate`)."""
        if self.ppl_window is not None:
            return self
        return replace(self, ppl_window=min(DEFAULT_PPL_WINDOW, max_position_embeddings or DEFAULT_PPL_WINDOW))


def _load_results(out: Path, header: dict, fingerprint: Fingerprint) -> dict:
    """Previous results of the same model and settings (the same fingerprint), or a fresh record."""
    if not out.exists():
        return {**header, "shapes": {}}
    try:
        saved = json.loads(out.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{out} is not a results file ({error.msg}); choose a new --out") from None
    if not isinstance(saved, dict) or "shapes" not in saved:
        raise ValueError(f"{out} is not a results file (it has no shapes); choose a new --out")
    fingerprint.check(saved.get("fingerprint"), out)
    return saved


def _largest_token_id(task: EncodedTask) -> int:
    if isinstance(task, EncodedText):
        return int(task.token_ids.max()) if task.token_ids.numel() else -1
    return max((max(context + continuation) for requests in task.requests.values()
                for context, continuation in requests), default=-1)


def _check_token_ids(tasks: dict[str, EncodedTask], vocab_size: int) -> None:
    """A tokenizer that is not the model's yields ids past its embedding table (an IndexError deep in the model)."""
    for label, task in tasks.items():
        largest = _largest_token_id(task)
        if largest >= vocab_size:
            raise ValueError(
                f"{label}: the tokenizer produced token id {largest}, outside the model's vocabulary "
                f"(vocab_size {vocab_size}); the tokenizer does not belong to this model"
            )


def evaluate_shapes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    shapes: list[tuple[int, float]],
    tasks: list[str],
    settings: EvalSettings,
    *,
    model_name: str,
    out: str | Path | None = None,
    batch_size: int = 8,
    model_identity: dict[str, str] | None = None,
) -> dict:
    """Score every task at every shape of one loaded model, resuming from `out` and saving there as it goes.

    All tasks are read and tokenised before the first forward pass, so bad input fails fast; the model's shape
    is restored afterwards. `out` is resumed only by the same settings and model (`model_identity`, the source's
    `source_identity`; without it the loaded model is hashed): others are refused (ResumeMismatchError).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    settings = settings.for_model(getattr(model.config, "max_position_embeddings", None))
    out = Path(out) if out is not None else None
    header = {"model": model_name, "settings": asdict(settings)}
    if out is None:
        results = {**header, "shapes": {}}
    else:
        fingerprint = Fingerprint({**settings_record(settings), **model_dtype(model)},
                                  model_identity or loaded_model_identity(model), {})
        results = _load_results(out, {**header, "fingerprint": fingerprint.to_json()}, fingerprint)
    encoded = {
        task_label(name): encode_task(
            load_task(name, settings.data_dir, limit=settings.limit, mmlu_limit=settings.mmlu_limit,
                      seed=settings.seed),
            tokenizer, ppl_window=settings.ppl_window, ppl_stride=settings.ppl_stride, ppl_tokens=settings.ppl_tokens,
        )
        for name in dict.fromkeys(tasks)
    }
    _check_token_ids(encoded, model.config.vocab_size)
    space = model.shape_space
    for depth, width in shapes:
        key = shape_key(depth, width)
        entry = results["shapes"].setdefault(key, {
            "depth": depth, "width": width, "parameters": space.parameter_count(depth, width), "tasks": {},
        })
        with model.shaped(depth, width):
            for label, task in encoded.items():
                if label in entry["tasks"]:
                    continue
                start = time.perf_counter()
                metrics = score_task(model, task, batch_size=batch_size, description=f"{key} {label}")
                metrics["seconds"] = round(time.perf_counter() - start, 1)
                metrics["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
                entry["tasks"][label] = metrics
                if out is not None:
                    write_text_atomically(out, json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["EvalSettings", "evaluate_shapes"]
