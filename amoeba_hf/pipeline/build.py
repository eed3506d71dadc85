"""`amoeba build`: convert, calibrate (Stage 1), fine-tune one-for-all (Stage 2), evaluate, save — resumable.

Every step writes into a work folder beside the output (`.<out>.build/`) and is skipped when its result exists;
steps that take long (calibration, training) also save progress inside, so re-running the same
command after an interruption continues where it stopped and ends with the same result. The work folder's
`fingerprint.json` (`build_fingerprint`) refuses a re-run with other settings, model or data.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from ..evaluation.scoring import perplexity
from ..fingerprint import Fingerprint, data_digests, settings_record, source_identity
from ..data import C4_SAMPLE
from ..io import (
    DEFAULT_MAX_SHARD_SIZE,
    SaveSettings,
    ensure_free_output_dir,
    save_checkpoint,
    staged_checkpoint,
    write_text_atomically,
)
from ..placement import LoadSettings, input_device
from ..plotting import png_figure
from ..selection.calibrate import CalibrationSettings, calibrate
from ..training.data import encode_documents, is_file_source
from ..training.finetune import FinetuneSettings, TrainerSettings, finetune, trainer_record
from .sources import check_source, load_or_convert

HELD_OUT = 8
PREPARATION_TIMEOUT = timedelta(hours=6)
DEFAULT_MODEL_NAME = "embedded SmolLM2-135M-Instruct"
FAULT_ENV = "AMOEBA_BUILD_FAULT"
BUILD_WIDTHS = (1.0, 0.875, 0.75, 0.625, 0.5)


@dataclass(frozen=True)
class BuildPreset:
    """Sizes of every step, for SmolLM2-135M on 2 CPU cores: `quick` fits 15 minutes (12.5 measured, 100 steps of
    2 x 256 tokens of text), `standard` 90.

    The stages' own settings, without what a build decides per run (data files, seed, minimum depth). Both distil
    every shape from the frozen base model (KL on whatever text the build trains on), at lr 1e-3 decayed to 0, the
    recipe that measured best on real text (docs/benchmarks.md, "Shape quality"). Router noise is off: on budgets
    of hundreds of steps it scatters each shape's updates over random experts (benchmarks/bench_oneforall.py); the
    paper's noise is for ~10K steps (`amoeba train` keeps it on). Depth bridges and width compensation are off:
    their head start is gone after the standard Stage 2, which ends slightly better without them (docs/benchmarks.md,
    "Closed-form recovery under Stage 2").
    """

    calibration: CalibrationSettings
    finetuning: FinetuneSettings
    eval_tokens: int


QUICK = BuildPreset(
    calibration=CalibrationSettings(samples=8, seq_len=128, depth_method="block-influence", widths=list(BUILD_WIDTHS),
                                    depth_bridges=False, width_compensation=False),
    finetuning=FinetuneSettings(steps=100, batch_size=2, grad_accum=1, learning_rate=1e-3, lr_schedule="cosine",
                                max_prompt_tokens=160, max_response_tokens=96, router_noise=False,
                                distill_teacher="base"),
    eval_tokens=2048,
)
PRESETS = {
    "quick": QUICK,
    "standard": BuildPreset(
        calibration=replace(QUICK.calibration, samples=16, seq_len=256),
        finetuning=replace(QUICK.finetuning, steps=700, max_prompt_tokens=256, max_response_tokens=128),
        eval_tokens=8192,
    ),
}


@dataclass
class BuildSettings:
    """What `amoeba build` is asked for (its flags): the model, the data, a preset and the few overrides."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id, folder or .gguf (default: embedded SmolLM2-135M)"}
    )
    data: list[str] | None = field(
        default=None,
        metadata={"help": "calibration/fine-tuning files (default: the bundled C4 sample, its last 8 documents held "
                          "out)", "nargs": "+"},
    )
    eval_data: str | None = field(default=None, metadata={"help": "text file for the final perplexity table"})
    preset: str = field(
        default="quick",
        metadata={"help": "sizes of every step: quick (~15 min on 2 CPU cores) or standard (~90 min)",
                  "choices": tuple(PRESETS)},
    )
    min_depth: int | None = field(default=None, metadata={"help": "smallest depth (default: half the layers)"})
    steps: int | None = field(default=None, metadata={"help": "override the preset's training steps"})
    batch_size: int | None = field(
        default=None,
        metadata={"help": "override the preset's sequences per device and micro-batch (with N processes, the "
                          "preset's / N keeps its global batch)", "aliases": ("--per-device-train-batch-size",)},
    )
    seed: int = field(default=0, metadata={"help": "seed of calibration and fine-tuning"})

    def validate(self) -> None:
        """Everything that can be checked before a folder is made or a model is loaded."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        for path in [*(self.data or []), *([self.eval_data] if self.eval_data else [])]:
            if is_file_source(path) and (not Path(path).is_file() or not os.access(path, os.R_OK)):
                raise FileNotFoundError(f"data file {path} does not exist or is not readable")
        if self.min_depth is not None and self.min_depth < 1:
            raise ValueError(f"min_depth must be >= 1, got {self.min_depth}")
        self.finetuning([]).validate()

    def resolved_preset(self) -> BuildPreset:
        """The preset with this build's overrides applied."""
        preset = PRESETS[self.preset]
        if self.steps is not None:
            preset = replace(preset, finetuning=replace(preset.finetuning, steps=self.steps))
        if self.batch_size is not None:
            preset = replace(preset, finetuning=replace(preset.finetuning, batch_size=self.batch_size))
        return preset

    def calibration(self, data_file: str) -> CalibrationSettings:
        return replace(self.resolved_preset().calibration, data=data_file, min_depth=self.min_depth, seed=self.seed)

    def finetuning(self, train_files: list[str]) -> FinetuneSettings:
        """Stage 2 of a build on `train_files`, with a resumable checkpoint at least every 50 steps."""
        finetuning = self.resolved_preset().finetuning
        save_steps = max(1, min(50, math.ceil(finetuning.steps / 4)))
        return replace(finetuning, data=train_files, save_steps=save_steps, seed=self.seed)


def _fault(stage: str):
    """Test hook: `AMOEBA_BUILD_FAULT=stage:count:SIGNAL` signals this process at the count-th progress event."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(stage + ":"):
        return lambda *_: None
    _, count, name = spec.split(":")
    seen = {"n": 0}

    def hit(*_):
        seen["n"] += 1
        if seen["n"] == int(count):
            os.kill(os.getpid(), getattr(signal, name))

    return hit


class _FaultCallback(TrainerCallback):
    def __init__(self):
        self.hit = _fault("train")

    def on_save(self, args, state, control, **kwargs):
        self.hit()


class BuildLog:
    """Prints and appends to `build.log` in the work folder (kept across resumptions); only the main process
    writes."""

    def __init__(self, path: Path):
        self.path = path
        self.enabled = PartialState().is_main_process

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def eval_shapes(space) -> list[tuple[int, float]]:
    """Full shape plus three smaller ones spread over the shape space (about 85%, 70% and the smallest)."""
    depths = space.depths
    pick = lambda fraction: min(depths, key=lambda d: abs(d - fraction * space.num_layers))
    shapes = [space.full_shape, (pick(0.9), 0.875), (pick(0.75), 0.75), (min(depths), space.min_width)]
    return list(dict.fromkeys(shapes))


def prefill_tokens_per_s(model, ids: torch.Tensor, repeats: int = 3) -> float:
    times = []
    ids = ids.to(input_device(model))
    with torch.no_grad():
        model(ids[:, :16], use_cache=False)
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def evaluate(model, eval_ids: torch.Tensor, shapes, label: str) -> list[dict]:
    rows = []
    window = min(256, len(eval_ids))
    for depth, width in shapes:
        with model.shaped(depth, width):
            rows.append({
                "depth": depth, "width": width, "model": label,
                "parameters": model.shape_space.parameter_count(depth, width),
                "perplexity": perplexity(model, eval_ids, window=window, batch_size=4)["ppl"],
                "prefill_tokens_per_s": prefill_tokens_per_s(model, eval_ids[None, :window]),
            })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Held-out perplexity against parameters, one line per model (before and after fine-tuning)."""
    with png_figure(path) as (_, (axis,)):
        for label in dict.fromkeys(r["model"] for r in rows):
            points = sorted((r["parameters"] / 1e6, r["perplexity"]) for r in rows if r["model"] == label)
            axis.plot(*zip(*points), marker="o", label=label)
        axis.set_xlabel("parameters (M)")
        axis.set_ylabel("held-out perplexity")
        axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()


class BuildWork:
    """The work folder beside the output: every step's result, the log, and how long each step took in this run."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.log = BuildLog(folder / "build.log")
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str, message: str) -> Iterator[None]:
        """Log the step's start and time it (a step skipped on resumption is not timed)."""
        self.log(message)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start


@dataclass
class BuildData:
    """Where each stage reads its data: given by the user, or generated by the base model (held-out part apart)."""

    calibration_file: str
    train_files: list[str]
    eval_file: str


def build(
    settings: BuildSettings,
    out: str | os.PathLike,
    load: LoadSettings | None = None,
    trainer_settings: TrainerSettings | None = None,
    save: SaveSettings | None = None,
) -> dict | None:
    """The whole pipeline; returns the report. Re-run with the same settings to resume.

    `load` chooses dtype and device(s), `trainer_settings` precision and the distributed engine, `save` the shard
    size of the final checkpoint. Under `accelerate launch` the steps before training run on the main process while
    the others wait (then load its results), every process trains, and the main process evaluates and saves; the
    others return None.
    """
    settings.validate()
    trainer_settings = trainer_settings or TrainerSettings()
    trainer_settings.validate()
    save = save or SaveSettings()
    save.validate()
    check_source(settings.model)
    out = ensure_free_output_dir(out)
    state = PartialState(cpu=not torch.accelerator.is_available(), timeout=PREPARATION_TIMEOUT)
    folder = out.parent / f".{out.name}.build"
    fingerprint = build_fingerprint(settings, load or LoadSettings(), trainer_settings)
    fingerprint.guard(folder)
    if state.is_main_process:
        fingerprint.record(folder)
    work = BuildWork(folder)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    preset = settings.resolved_preset()

    with state.main_process_first():
        base, tokenizer = convert_step(work, settings, load)
        data = data_step(work, settings)
        eval_ids = torch.tensor(encode_documents(tokenizer, [Path(data.eval_file).read_text()], preset.eval_tokens))
        model, tokenizer = calibrate_step(work, settings.calibration(data.calibration_file), base, tokenizer, load)
        del base
        shapes = eval_shapes(model.shape_space)
        baseline = baseline_step(work, model, eval_ids, shapes)
    finetuning = settings.finetuning(data.train_files)
    finetune_step(work, finetuning, model, tokenizer, trainer_settings)
    if not state.is_main_process:
        return None
    trained = evaluate(model, eval_ids, shapes, "one-for-all")

    rows = baseline + trained
    report = {"preset": settings.preset, "settings": asdict(preset), "model": settings.model or DEFAULT_MODEL_NAME,
              "fingerprint": fingerprint.to_json(), "eval_data": data.eval_file, "rows": rows,
              "seconds": time.perf_counter() - started, "step_seconds": work.timings}
    save_step(work, out, model, tokenizer, report, trained, save.max_shard_size)
    return report


def build_fingerprint(settings: BuildSettings, load: LoadSettings, trainer_settings: TrainerSettings) -> Fingerprint:
    """What determines a build's checkpoint: its flags, the preset's definition (package code), the load dtype and
    result-affecting Trainer settings, the source model's files and the data files' contents. The work folder is
    resumed only under the same, so the report's settings are always those that made the weights."""
    definition = json.dumps(asdict(PRESETS[settings.preset]), sort_keys=True)
    return Fingerprint(
        {**settings_record(settings, load), **trainer_record(trainer_settings.training_arguments()),
         "the --preset's definition": hashlib.sha256(definition.encode()).hexdigest()[:16]},
        source_identity(settings.model), data_digests([*(settings.data or [str(C4_SAMPLE)]), settings.eval_data]),
    )


def convert_step(work: BuildWork, settings: BuildSettings, load: LoadSettings | None):
    """1/5: the source model as an any-shape checkpoint, loaded from the work folder."""
    converted = work.folder / "converted"
    if not converted.exists():
        with work.step("convert", f"1/5 convert {settings.model or DEFAULT_MODEL_NAME}"):
            base, tokenizer = load_or_convert(settings.model, load, min_depth=settings.min_depth)
            save_checkpoint(base, tokenizer, converted)
            del base
    return load_or_convert(str(converted), load)


def data_step(work: BuildWork, settings: BuildSettings) -> BuildData:
    """2/5: the user's files, or the bundled C4 sample: all but its last `HELD_OUT` documents for calibration and
    fine-tuning, those for the final perplexity table (unless `--eval-data` names another text)."""
    if settings.data:
        return BuildData(settings.data[0], list(settings.data), settings.eval_data or settings.data[0])
    train_part, held_out = work.folder / "train_data.jsonl", work.folder / "held_out.txt"
    if not (train_part.exists() and held_out.exists()):
        documents = [json.loads(line)["text"] for line in C4_SAMPLE.read_text(encoding="utf-8").splitlines()]
        message = (f"2/5 data: the bundled C4 sample, {len(documents) - HELD_OUT} documents for calibration and "
                   f"fine-tuning, {HELD_OUT} held out")
        with work.step("data", message):
            records = "".join(json.dumps({"text": text}) + "\n" for text in documents[:-HELD_OUT])
            write_text_atomically(train_part, records)
            write_text_atomically(held_out, "\n".join(documents[-HELD_OUT:]) + "\n")
    return BuildData(str(train_part), [str(train_part)], settings.eval_data or str(held_out))


def calibrate_step(work: BuildWork, calibration: CalibrationSettings, base, tokenizer, load: LoadSettings | None):
    """3/5: Stage 1 on the converted model, loaded back from the work folder."""
    calibrated = work.folder / "calibrated"
    if not calibrated.exists():
        with work.step("calibrate", f"3/5 calibrate: widths by importance, depths by {calibration.depth_method}"):
            report = calibrate(base, tokenizer, calibration, state_dir=work.folder / "calibrate-state",
                               on_progress=_fault("calibrate"),
                               model_identity=source_identity(str(work.folder / "converted")))
            save_checkpoint(base, tokenizer, calibrated,
                            files={"calibration.json": json.dumps(asdict(report), indent=2)})
    return load_or_convert(str(calibrated), load)


def baseline_step(work: BuildWork, model, eval_ids: torch.Tensor, shapes) -> list[dict]:
    """4/5: the calibrated model's rows before fine-tuning (kept in the work folder)."""
    baseline_file = work.folder / "eval_no_finetuning.json"
    if not baseline_file.exists():
        work.log("4/5 evaluate the calibrated model before fine-tuning")
        baseline_file.write_text(json.dumps(evaluate(model.eval(), eval_ids, shapes, "no fine-tuning")))
    return json.loads(baseline_file.read_text())


def finetune_step(
    work: BuildWork, finetuning: FinetuneSettings, model, tokenizer, trainer_settings: TrainerSettings
) -> None:
    """5/5: Stage 2, resumed from the newest complete checkpoint in the work folder."""
    message = (f"5/5 one-for-all fine-tuning: {finetuning.steps} steps of batch "
               f"{finetuning.batch_size}x{finetuning.grad_accum}")
    with work.step("train", message):
        finetune(model, tokenizer, finetuning, work.folder / "train", callbacks=[_FaultCallback()],
                 trainer_settings=trainer_settings, model_identity=source_identity(str(work.folder / "calibrated")))


def save_step(
    work: BuildWork, out: Path, model, tokenizer, report: dict, trained: list[dict],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """The checkpoint with its evaluation table, report, plot and log, written atomically; then the work folder goes."""
    eval_rows = [{"depth": r["depth"], "width": r["width"], "held-out ppl": round(r["perplexity"], 3),
                  "prefill tok/s": round(r["prefill_tokens_per_s"], 1)} for r in trained]
    files = {"amoeba_eval.json": json.dumps(eval_rows, indent=2), "build_report.json": json.dumps(report, indent=2)}
    with staged_checkpoint(model, tokenizer, out, files, max_shard_size) as staging:
        plot(report["rows"], staging / "frontier.png")
        shutil.copy(work.folder / "build.log", staging / "build.log")
    shutil.rmtree(work.folder, ignore_errors=True)


def format_report(report: dict) -> str:
    by_shape = {}
    for row in report["rows"]:
        by_shape.setdefault((row["depth"], row["width"]), {})[row["model"]] = row
    lines = [f"{'depth':>5} {'width':>6} {'params':>8} {'ppl (no FT)':>12} {'ppl (one-for-all)':>18} {'tok/s':>7}"]
    for (depth, width), models in by_shape.items():
        before, after = models.get("no fine-tuning"), models.get("one-for-all")
        lines.append(f"{depth:>5} {width:>6.3f} {after['parameters'] / 1e6:>7.1f}M {before['perplexity']:>12.2f} "
                     f"{after['perplexity']:>18.2f} {after['prefill_tokens_per_s']:>7.0f}")
    return "\n".join(lines)
