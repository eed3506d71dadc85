"""Stage 1 end to end: importance-ordered widths, then DP depth tables, written into the model (resumable)."""

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from ..fingerprint import Fingerprint, data_digests, loaded_model_identity, model_dtype, settings_record
from ..io import write_text_atomically
from ..modeling.shape_space import check_widths
from ..placement import input_device
from ..training.data import is_file_source
from .bridges import bridge_parameters, bridge_spans, fit_depth_bridges
from .compensation import compensation_parameters, fit_width_compensation
from .data import multiple_choice_prompts, text_blocks
from .depth import (
    SCORES,
    LayerRunner,
    block_influence_table,
    dp_depth_table,
    drop_last_table,
    kl_score,
    multiple_choice_score,
    perplexity_score,
    removable_layers,
)
from .width import (
    ATTENTION_UNITS,
    WIDTH_METHODS,
    ChannelStatistics,
    apply_width_order,
    collect_statistics,
    layer_scores,
)

DEPTH_METHODS = ("dp", "block-influence", "drop-last")
# depth bridges when neither --depth-bridges nor --no-depth-bridges is given (measured: docs/benchmarks.md)
DEPTH_BRIDGES_DEFAULT = True
BRIDGE_RIDGE = 1e-2
# width compensation when neither --width-compensation nor --no-width-compensation is given, with uniform widths
# (measured: docs/benchmarks.md)
WIDTH_COMPENSATION_DEFAULT = True
# rank 128 beats 32 and 64 on the development set at the 65% and 50% classes, level at 80%, for the same calibration
# time (docs/benchmarks.md); on SmolLM2-135M its corrections are 36M float32 parameters in the any-shape checkpoint
COMPENSATION_RANK = 128
COMPENSATION_RIDGE = 0.1  # better than 1e-2 at every development-set shape measured (docs/benchmarks.md)
WIDTH_MODES = ("global", "uniform")


@dataclass
class CalibrationSettings:
    """Stage 1's settings, also the flags of `amoeba calibrate`; all but the `OPERATIONAL` ones are in the
    fingerprint that guards resumption (chunk size and the DP's prefix cache change memory and time, not the tables).

    Defaults are the command line's (16 blocks of 256 tokens, enough for a model of ~100M parameters on CPU).
    """

    OPERATIONAL: ClassVar[tuple[str, ...]] = ("prefix_cache", "chunk_size")

    data: str | None = field(
        default=None,
        metadata={"help": "calibration text: .txt (a document per line) or JSON/JSONL `text`", "required": True},
    )
    score: str = field(default="ppl", metadata={"help": "DP score", "choices": SCORES})
    mc_data: str | None = field(
        default=None, metadata={"help": "MMLU-style JSONL {input, output} for --score mmlu"}
    )
    min_depth: int | None = field(default=None, metadata={"help": "smallest depth (default: the model's)"})
    widths: list[float] | None = field(
        default=None, metadata={"help": "width grid, e.g. 1,0.875,0.75,0.625,0.5 (default: the model's)"}
    )
    samples: int = field(default=16, metadata={"help": "calibration samples (blocks or prompts)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration block"})
    keep_last: int = field(default=1, metadata={"help": "never remove the last K layers"})
    keep_first: bool = field(default=False, metadata={"help": "never remove the first layer"})
    depth_method: str = field(
        default="dp", metadata={"help": "how each depth's layers are chosen", "choices": DEPTH_METHODS}
    )
    width_method: str = field(
        default="flap", metadata={"help": "importance that orders channels", "choices": WIDTH_METHODS}
    )
    width_mode: str = field(
        default="uniform",
        metadata={
            "help": "uniform: same fraction per layer, exports to plain Llama; global: one importance threshold "
            "over all layers (worse at 3 of 4 widths on SmolLM2-135M)",
            "choices": WIDTH_MODES,
        },
    )
    attention_unit: str = field(
        default="kv_groups",
        metadata={
            "help": "what a width removes from attention: kv_groups (whole KV groups with their query heads) or "
            "query_heads (the same number of query heads in every KV group, all groups kept)",
            "choices": ATTENTION_UNITS,
        },
    )
    bias_compensation: bool = field(default=True, metadata={"help": "do not add pruned channels' mean"})
    seed: int = field(default=0, metadata={"help": "seed of the calibration samples and random widths"})
    depth_bridges: bool | None = field(
        default=None,
        metadata={
            "help": "fit a linear map per removed span of the depth table (least squares on the calibration "
            "activations, applied to the MLP output of the layer before the span, merged into its down_proj on "
            f"export; hidden^2 parameters per span) (default: {'on' if DEPTH_BRIDGES_DEFAULT else 'off'})"
        },
    )
    bridge_ridge: float = field(
        default=BRIDGE_RIDGE,
        metadata={"help": "ridge of the depth-bridge fit, relative to the mean eigenvalue of X^T X (towards identity)"},
    )
    width_compensation: bool | None = field(
        default=None,
        metadata={
            "help": "fit, per grid width, a least-squares update of the kept input columns of o_proj and down_proj "
            "(stored low-rank, applied at that width and the widths just below it, merged on export; uniform widths "
            f"only) (default: {'on with uniform widths' if WIDTH_COMPENSATION_DEFAULT else 'off'})"
        },
    )
    width_compensation_rank: int = field(
        default=COMPENSATION_RANK,
        metadata={"help": "rank of each stored width correction ((kept columns + hidden) x rank float32 parameters)"},
    )
    compensation_ridge: float = field(
        default=COMPENSATION_RIDGE,
        metadata={"help": "ridge of the width-compensation fit, relative to the mean eigenvalue of the kept inputs' "
                          "covariance (towards plain pruning)"},
    )
    prefix_cache: bool = field(default=True, metadata={"cli": False})
    chunk_size: int = field(default=4, metadata={"cli": False})

    def validate(self, num_layers: int | None = None) -> None:
        """Check settings before any expensive work; `num_layers` enables the model-dependent checks."""
        if self.data is None:
            raise ValueError("no calibration data: pass data (--data), a .txt or JSON/JSONL file with `text`")
        for path in (self.data, self.mc_data):
            if path is not None and is_file_source(path) and not Path(path).is_file():
                raise FileNotFoundError(f"calibration file {path} does not exist")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"need samples >= 1 and seq_len >= 2, got {self.samples} and {self.seq_len}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose from {SCORES}")
        if self.score == "mmlu" and not self.mc_data:
            raise ValueError("score 'mmlu' (--score mmlu) needs multiple-choice prompts: pass mc_data (--mc-data, e.g. "
                             "mmlu/zero_shot_val.jsonl)")
        if self.mc_data and self.score != "mmlu":
            raise ValueError(f"mc_data (--mc-data) is used only by score 'mmlu' (--score mmlu), not by score "
                             f"{self.score!r}; drop it or add --score mmlu")
        if self.depth_method not in DEPTH_METHODS:
            raise ValueError(f"unknown depth method {self.depth_method!r}; choose from {DEPTH_METHODS}")
        if self.width_method not in WIDTH_METHODS:
            raise ValueError(f"unknown width method {self.width_method!r}; choose from {WIDTH_METHODS}")
        if self.width_mode not in WIDTH_MODES:
            raise ValueError(f"width_mode must be one of {WIDTH_MODES}, got {self.width_mode!r}")
        if self.attention_unit not in ATTENTION_UNITS:
            raise ValueError(f"attention_unit must be one of {ATTENTION_UNITS}, got {self.attention_unit!r}")
        check_widths(self.widths)
        if not self.bridge_ridge >= 0:
            raise ValueError(f"bridge_ridge must be >= 0, got {self.bridge_ridge}")
        if not self.compensation_ridge >= 0:
            raise ValueError(f"compensation_ridge must be >= 0, got {self.compensation_ridge}")
        if isinstance(self.width_compensation_rank, bool) or not (
            isinstance(self.width_compensation_rank, int) and self.width_compensation_rank >= 1
        ):
            raise ValueError(f"width_compensation_rank must be an int >= 1, got {self.width_compensation_rank!r}")
        if self.width_compensation and self.width_mode == "global":
            raise ValueError("width compensation (--width-compensation) needs --width-mode uniform: with global widths "
                             "a layer's kept columns depend on the depth")
        if self.min_depth is not None and self.min_depth < 1:
            raise ValueError(f"min_depth must be in [1, number of layers], got {self.min_depth}")
        if num_layers is None:
            return
        if self.min_depth is not None and not 1 <= self.min_depth <= num_layers:
            raise ValueError(f"min_depth must be in [1, {num_layers}], got {self.min_depth}")
        if not 0 <= self.keep_last < num_layers:
            raise ValueError(f"keep_last must be in [0, {num_layers - 1}], got {self.keep_last}")


@dataclass
class CalibrationReport:
    depth_table: dict[str, list[int]]
    evaluations: int = 0
    layer_forwards: int = 0
    depth_seconds: float = 0.0
    width_seconds: float = 0.0
    resumed: bool = False
    extras: dict = field(default_factory=dict)


class ResumeState:
    """What an interrupted calibration has finished, in `state_dir` (nothing is kept without one).

    `fingerprint.json` names the run the progress belongs to (another run's is refused, see amoeba_hf.fingerprint);
    `state.json` holds whether the width step is done and the DP's last saved row; `width.pt` the channel statistics
    and importance scores (attention scores per KV group, or per query head with `attention_unit="query_heads"`).
    """

    def __init__(self, state_dir: str | os.PathLike | None, fingerprint: Fingerprint | None):
        self.folder = None if state_dir is None else Path(state_dir)
        self.fingerprint = fingerprint
        self.values: dict = {}
        if self.folder is not None:
            fingerprint.guard(self.folder)
            meta = self.folder / "state.json"
            if meta.exists():
                self.values = json.loads(meta.read_text())
        self.resumed = bool(self.values)

    def save(self, **values) -> None:
        if self.folder is not None:
            self.fingerprint.record(self.folder)
            write_text_atomically(self.folder / "state.json", json.dumps({**self.values, **values}))

    def load_width(self) -> tuple[dict, list[torch.Tensor], list[torch.Tensor]] | None:
        width_file = None if self.folder is None else self.folder / "width.pt"
        if not self.values.get("width_done") or width_file is None or not width_file.exists():
            return None
        saved = torch.load(width_file, weights_only=True)
        stats = {(int(key.split(".")[0]), key.split(".")[1]): ChannelStatistics.from_state(value)
                 for key, value in saved["stats"].items()}
        return stats, saved["groups"], saved["neurons"]

    def save_width(self, stats: dict, group_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor]) -> None:
        if self.folder is None:
            return
        self.fingerprint.record(self.folder)
        width_file = self.folder / "width.pt"
        tmp = width_file.with_suffix(".tmp")
        saved_stats = {f"{i}.{kind}": s.to_state() for (i, kind), s in stats.items()}
        torch.save({"stats": saved_stats, "groups": group_scores, "neurons": neuron_scores}, tmp)
        os.replace(tmp, width_file)
        self.values = {"width_done": True}
        self.save()


def calibrate(
    model,
    tokenizer: PreTrainedTokenizerBase,
    settings: CalibrationSettings,
    state_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    on_progress: Callable[[str], None] | None = None,
    model_identity: dict[str, str] | None = None,
) -> CalibrationReport:
    """Select widths (permuting the model in place) and depths for `model`; progress is saved in `state_dir`.

    Re-running with the same settings, model and data and `state_dir` after an interruption continues where it
    stopped; other ones are refused (ResumeMismatchError). `model_identity` identifies the model's source
    (`source_identity`); without it the loaded model is hashed. `on_progress` is called with "width" and then "dp"
    after each saved DP row.
    """
    num_layers = model.config.num_hidden_layers
    settings.validate(num_layers)
    fingerprint = None
    if state_dir is not None:
        fingerprint = Fingerprint({**settings_record(settings), **model_dtype(model)},
                                  model_identity or loaded_model_identity(model),
                                  data_digests([settings.data, settings.mc_data]))
    state = ResumeState(state_dir, fingerprint)
    model.eval()
    device = input_device(model)
    blocks = text_blocks(settings.data, tokenizer, settings.samples, settings.seq_len, settings.seed).to(device)
    mc_batch = (
        multiple_choice_prompts(settings.mc_data, tokenizer, settings.samples, settings.seed).to(device)
        if settings.score == "mmlu" else None
    )
    min_depth = settings.min_depth or model.config.min_depth
    scan = removable_layers(num_layers, settings.keep_last, settings.keep_first)
    if num_layers - min_depth > len(scan):
        raise ValueError(
            f"min_depth {min_depth} would remove {num_layers - min_depth} layers, but only {len(scan)} are removable "
            f"with keep_last={settings.keep_last}, keep_first={settings.keep_first}"
        )

    start = time.perf_counter()
    order_widths(model, blocks, settings, state, show_progress)
    if on_progress is not None:
        on_progress("width")
    width_seconds = time.perf_counter() - start

    start = time.perf_counter()
    table, evaluations, layer_forwards = select_depths(
        model, blocks, mc_batch, settings, scan, num_layers - min_depth, state, show_progress, on_progress
    )
    depth_seconds = time.perf_counter() - start

    shape_space = {"depth_table": table, "min_depth": min_depth}
    if settings.widths:
        shape_space.update(min_width=min(settings.widths), width_grid=sorted(settings.widths, reverse=True))
    model.update_shape_space(**shape_space)
    extras = fit_bridges(model, blocks, settings, show_progress)
    extras.update(fit_compensation(model, blocks, settings, show_progress))
    return CalibrationReport(table, evaluations, layer_forwards, depth_seconds, width_seconds, state.resumed, extras)


def fit_bridges(model, blocks: torch.Tensor, settings: CalibrationSettings, show_progress: bool) -> dict:
    """Depth bridges for the spans of the model's depth table if the settings ask for them (else none are kept);
    what they cost, for the report."""
    if not (DEPTH_BRIDGES_DEFAULT if settings.depth_bridges is None else settings.depth_bridges):
        model.set_depth_bridges(None)
        return {"depth_bridges": 0}
    start = time.perf_counter()
    config = model.config
    spans = bridge_spans(config.depth_table, config.num_hidden_layers)
    model.set_depth_bridges(
        fit_depth_bridges(model, blocks, spans, settings.bridge_ridge, settings.chunk_size, show_progress)
    )
    return {"depth_bridges": len(spans), "bridge_parameters": bridge_parameters(spans, config.hidden_size),
            "bridge_seconds": time.perf_counter() - start}


def fit_compensation(model, blocks: torch.Tensor, settings: CalibrationSettings, show_progress: bool) -> dict:
    """Width corrections for the grid widths if the settings ask for them (by default with uniform widths; else none
    are kept); what they cost, for the report."""
    wanted = settings.width_compensation
    if wanted is None:
        wanted = WIDTH_COMPENSATION_DEFAULT and settings.width_mode == "uniform"
    if not wanted:
        model.set_width_compensation(None)
        return {"width_compensation": []}
    start = time.perf_counter()
    rank = settings.width_compensation_rank
    corrections = fit_width_compensation(model, blocks, rank, settings.compensation_ridge, settings.chunk_size,
                                         show_progress)
    model.set_width_compensation(corrections, rank)
    parameters = compensation_parameters(corrections)
    return {"width_compensation": model.config.width_compensation or [], "compensation_rank": rank,
            "compensation_parameters": parameters, "compensation_bytes": 4 * parameters,
            "compensation_seconds": time.perf_counter() - start}


def order_widths(model, blocks: torch.Tensor, settings: CalibrationSettings, state: ResumeState,
                 show_progress: bool) -> None:
    """Width step: channel statistics and importance scores (or the saved ones), then the importance order."""
    saved = state.load_width()
    if saved is not None:
        stats, group_scores, neuron_scores = saved
    else:
        stats = collect_statistics(model, blocks, settings.chunk_size, show_progress)
        group_scores, neuron_scores = layer_scores(
            model, stats, settings.width_method, settings.seed, settings.attention_unit
        )
        state.save_width(stats, group_scores, neuron_scores)
    apply_width_order(
        model, group_scores, neuron_scores, stats, settings.width_mode, settings.bias_compensation,
        settings.attention_unit,
    )


def select_depths(
    model,
    blocks: torch.Tensor,
    mc_batch,
    settings: CalibrationSettings,
    scan: list[int],
    max_removed: int,
    state: ResumeState,
    show_progress: bool,
    on_progress: Callable[[str], None] | None,
) -> tuple[dict[str, list[int]], int, int]:
    """Depth step: the depth table, the DP's candidate evaluations and the layer-forwards it cost."""
    num_layers = model.config.num_hidden_layers
    if max_removed == 0:
        return {str(num_layers): list(range(num_layers))}, 0, 0
    if settings.depth_method == "drop-last":
        return drop_last_table(num_layers, scan, max_removed), 0, 0
    ids, mask = (mc_batch.input_ids, mc_batch.attention_mask) if mc_batch else (blocks, None)
    runner = LayerRunner(model, ids, mask, settings.chunk_size)
    if settings.depth_method == "block-influence":
        return block_influence_table(runner, scan, max_removed), 0, runner.layer_forwards
    if settings.prefix_cache or settings.score == "kl":
        runner.cache_layer_inputs()
    score = {
        "ppl": lambda: perplexity_score(runner, blocks, settings.chunk_size),
        "kl": lambda: kl_score(runner),
        "mmlu": lambda: multiple_choice_score(runner, mc_batch, settings.chunk_size),
    }[settings.score]()

    def evaluate(removed: frozenset[int], boundary: int) -> float:
        return score(runner.final_states(removed, boundary if settings.prefix_cache else 0))

    def save_row(row_state: dict) -> None:
        state.save(dp=row_state)
        if on_progress is not None:
            on_progress("dp")

    table, evaluations = dp_depth_table(
        num_layers, scan, max_removed, evaluate, state.values.get("dp"), save_row, show_progress
    )
    return table, evaluations, runner.layer_forwards
