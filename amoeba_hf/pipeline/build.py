"""`amoeba build`: convert, calibrate (Stage 1), fine-tune one-for-all (Stage 2), evaluate, save — resumable.

Every step writes into a work folder beside the output (`.<out>.build/`) and is skipped when its result exists;
steps that take long (data generation, the DP, training) also save progress inside, so re-running the same
command after an interruption continues where it stopped and ends with the same result.
"""

import json
import math
import os
import shutil
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..evaluation.scoring import perplexity
from ..io import ensure_free_output_dir, save_checkpoint, staged_checkpoint
from ..selection.calibrate import CalibrationSettings, calibrate
from ..training.finetune import FinetuneSettings, finetune
from ..training.self_generated import SEED_INSTRUCTIONS, generate_self_data
from .sources import check_source, load_or_convert

HELD_OUT = 8
FAULT_ENV = "AMOEBA_BUILD_FAULT"


@dataclass
class BuildPreset:
    """Sizes of every step, for SmolLM2-135M on 2 CPU cores: `quick` fits 15 minutes, `standard` 90.

    Router noise is off: on budgets of hundreds of steps it scatters each shape's updates over random experts
    (benchmarks/bench_oneforall.py); the paper's noise is for ~10K steps (`amoeba train` keeps it on).
    """

    generated_tokens: int
    calibration_samples: int
    calibration_seq_len: int
    depth_method: str
    steps: int
    batch_size: int
    grad_accum: int
    max_prompt_tokens: int
    max_response_tokens: int
    experts: int = 5
    router_noise: bool = False
    widths: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.625, 0.5])
    eval_tokens: int = 2048


PRESETS = {
    "quick": BuildPreset(96, 8, 128, "block-influence", 40, 2, 1, 160, 96),
    "standard": BuildPreset(192, 8, 128, "dp", 50, 2, 2, 256, 192, eval_tokens=8192),
}


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
    """Prints and appends to `build.log` in the work folder (kept across resumptions)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, message: str) -> None:
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["parameters"] / 1e6, r["perplexity"]) for r in rows if r["model"] == label)
        axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xlabel("parameters (M)")
    axis.set_ylabel("held-out perplexity")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _finetune_settings(settings: BuildPreset, train_files: list[str], data: list[str] | None,
                       seed: int) -> FinetuneSettings:
    """Stage 2 of a build: distilled from the base model when it generated the data itself."""
    return FinetuneSettings(
        data=train_files, steps=settings.steps, batch_size=settings.batch_size, grad_accum=settings.grad_accum,
        max_prompt_tokens=settings.max_prompt_tokens, max_response_tokens=settings.max_response_tokens,
        experts=settings.experts, router_noise=settings.router_noise, distill_teacher="largest" if data else "base",
        save_steps=max(1, math.ceil(settings.steps / 4)), seed=seed,
    )


def build(model: str | None, out: str | os.PathLike, preset: str = "quick", data: list[str] | None = None,
          eval_data: str | None = None, min_depth: int | None = None, seed: int = 0,
          overrides: dict | None = None) -> dict:
    """The whole pipeline; returns the report. Re-run with the same arguments to resume."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    settings = replace(PRESETS[preset], **(overrides or {}))
    for path in [*(data or []), *([eval_data] if eval_data else [])]:
        if not Path(path).is_file() or not os.access(path, os.R_OK):
            raise FileNotFoundError(f"data file {path} does not exist or is not readable")
    if min_depth is not None and min_depth < 1:
        raise ValueError(f"min_depth must be >= 1, got {min_depth}")
    if settings.generated_tokens < 1:
        raise ValueError(f"generated_tokens must be >= 1, got {settings.generated_tokens}")
    _finetune_settings(settings, [], data, seed).validate()
    check_source(model)
    out = ensure_free_output_dir(out)
    work = out.parent / f".{out.name}.build"
    work.mkdir(parents=True, exist_ok=True)
    log = BuildLog(work / "build.log")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(seed)

    converted = work / "converted"
    if not converted.exists():
        log(f"1/5 convert {model or 'embedded SmolLM2-135M-Instruct'}")
        step = time.perf_counter()
        base, tokenizer = load_or_convert(model, min_depth=min_depth)
        save_checkpoint(base, tokenizer, converted)
        timings["convert"] = time.perf_counter() - step
    base, tokenizer = load_or_convert(str(converted))

    if data:
        calibration_file, train_files = data[0], list(data)
        eval_data = eval_data or data[0]
    else:
        generated = work / "self_generated.jsonl"
        complete = generated.exists() and len(generated.read_text().splitlines()) >= len(SEED_INSTRUCTIONS)
        if not complete:
            log(f"2/5 generate calibration and fine-tuning data with the base model ({len(SEED_INSTRUCTIONS)} answers)")
            step = time.perf_counter()
            generate_self_data(base, tokenizer, generated, max_new_tokens=settings.generated_tokens, seed=seed,
                               on_batch=_fault("data"))
            timings["data"] = time.perf_counter() - step
        records = [json.loads(line) for line in generated.read_text().splitlines()]
        train_part = work / "train_data.jsonl"
        if not train_part.exists():
            train_part.write_text("".join(json.dumps(r) + "\n" for r in records[:-HELD_OUT]))
        calibration_file, train_files = str(train_part), [str(train_part)]
        if eval_data is None:
            held_out = work / "held_out.txt"
            if not held_out.exists():
                held_out.write_text("\n".join(r["text"] for r in records[-HELD_OUT:]) + "\n")
            eval_data = str(held_out)
    eval_text = Path(eval_data).read_text()
    eval_ids = tokenizer(eval_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    eval_ids = eval_ids[: settings.eval_tokens]

    calibrated = work / "calibrated"
    if not calibrated.exists():
        log(f"3/5 calibrate: widths by importance, depths by {settings.depth_method}")
        step = time.perf_counter()
        calibration = CalibrationSettings(
            data=calibration_file, samples=settings.calibration_samples, seq_len=settings.calibration_seq_len,
            depth_method=settings.depth_method, widths=settings.widths, min_depth=min_depth, seed=seed,
        )
        report = calibrate(base, tokenizer, calibration, state_dir=work / "calibrate-state",
                           on_progress=_fault("calibrate"))
        save_checkpoint(base, tokenizer, calibrated, files={"calibration.json": json.dumps(asdict(report), indent=2)})
        timings["calibrate"] = time.perf_counter() - step
    model_obj, tokenizer = load_or_convert(str(calibrated))
    shapes = eval_shapes(model_obj.shape_space)

    baseline_file = work / "eval_no_finetuning.json"
    if not baseline_file.exists():
        log("4/5 evaluate the calibrated model before fine-tuning")
        baseline_file.write_text(json.dumps(evaluate(model_obj.eval(), eval_ids, shapes, "no fine-tuning")))
    baseline = json.loads(baseline_file.read_text())

    log(f"5/5 one-for-all fine-tuning: {settings.steps} steps of batch {settings.batch_size}x{settings.grad_accum}")
    step = time.perf_counter()
    finetune(model_obj, tokenizer, _finetune_settings(settings, train_files, data, seed), work / "train",
             callbacks=[_FaultCallback()])
    timings["train"] = time.perf_counter() - step
    trained = evaluate(model_obj, eval_ids, shapes, "one-for-all")

    rows = baseline + trained
    report = {"preset": preset, "settings": asdict(settings), "model": model or "embedded SmolLM2-135M-Instruct",
              "eval_data": eval_data, "rows": rows, "seconds": time.perf_counter() - started, "step_seconds": timings}
    eval_rows = [{"depth": r["depth"], "width": r["width"], "held-out ppl": round(r["perplexity"], 3),
                  "prefill tok/s": round(r["prefill_tokens_per_s"], 1)} for r in trained]
    files = {"amoeba_eval.json": json.dumps(eval_rows, indent=2), "build_report.json": json.dumps(report, indent=2)}
    with staged_checkpoint(model_obj, tokenizer, out, files) as staging:
        plot(rows, staging / "frontier.png")
        shutil.copy(work / "build.log", staging / "build.log")
    shutil.rmtree(work, ignore_errors=True)
    return report


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
