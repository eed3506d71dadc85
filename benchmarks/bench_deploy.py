"""Deployment speed of shapes: prefill and decode speed-up against the full model and against the ideal (the
parameter ratio), elastic model vs exported subnet, at batch 1 and a larger batch; peak memory; set_shape latency.

The numbers come from one `amoeba_hf.deploy.profile.profile_shapes` run, which measures every shape round-robin, so
all ratios are taken within one run, from medians of `--repeats` repetitions. Speed-ups are against the full model
exported, i.e. the stock model the checkpoint was converted from. The profile is also stored in the checkpoint's
cache, so `amoeba search` with the same settings reuses it.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_deploy.py    # embedded SmolLM2-135M, fp32, 2 threads, median of 5
    python benchmarks/bench_deploy.py --model smollm2-calibrated --out benchmarks/results/bench_deploy_global.json

On a CPU shared with other jobs, OMP_WAIT_POLICY=PASSIVE keeps OpenMP threads from spinning while they wait for a
descheduled partner (default spinning made 2-thread runs up to 10x slower here, and very noisy).
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_shapes import load_model, pick_shapes

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.deploy.profile import (
    DeviceProfile,
    ProfileSettings,
    Runtime,
    profile_shapes,
    save_profile,
    time_set_shape,
)
from amoeba_hf.io import write_text_atomically
from amoeba_hf.modeling.shape_space import shape_key

DEPTH_TARGET = 0.85  # exported decode speed-up / ideal, depth-only shapes
WIDTH_TARGET = 0.7  # the same for shapes with width < 1
ELASTIC_TARGET = 0.9  # elastic speed / exported speed
SET_SHAPE_TARGET_MS = 5.0


def speed_rows(model: AmoebaForCausalLM, named_shapes: list[tuple[str, int, float]], measured: dict,
               settings: ProfileSettings) -> list[dict]:
    """Per shape: ideal and measured speed-ups (prefill, decode at each batch size) and elastic/exported ratios."""
    space = model.shape_space
    full_key = shape_key(space.num_layers, 1.0)
    full_params = space.parameter_count(space.num_layers, 1.0)
    base = measured[full_key]["exported"]
    length = settings.prompt_lengths[-1]
    rows = []
    for name, depth, width in named_shapes:
        params = space.parameter_count(depth, width)
        by_mode = measured[shape_key(depth, width)]
        row = {"shape": name, "depth": depth, "width": width, "params": params, "ideal": full_params / params}
        for mode, profile in by_mode.items():
            for batch in settings.batch_sizes:
                key = f"{batch}x{length}"
                row[f"prefill_b{batch}_{mode}"] = base.prefill_ms[key] / profile.prefill_ms[key]
                row[f"decode_b{batch}_{mode}"] = base.decode_latency_ms(batch) / profile.decode_latency_ms(batch)
                row[f"decode_ms_b{batch}_{mode}"] = profile.decode_latency_ms(batch)
                row[f"memory_mb_b{batch}_{mode}"] = (profile.memory_bytes(batch) or 0) / 2**20
        ratios = [row[f"{kind}_b{batch}_elastic"] / row[f"{kind}_b{batch}_exported"]
                  for kind in ("prefill", "decode") for batch in settings.batch_sizes]
        row["elastic_over_exported"] = min(ratios)
        row["elastic_over_exported_mean"] = math.exp(statistics.fmean(math.log(r) for r in ratios))
        row["decode_over_ideal"] = row["decode_b1_exported"] / row["ideal"]
        if depth == space.num_layers and width == 1.0:
            row["target"] = None
        else:
            row["target"] = WIDTH_TARGET if width < 1.0 else DEPTH_TARGET
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], large_batch: int) -> str:
    header = ("| shape | depth | width | params | ideal | prefill b1 el / ex | decode b1 el / ex "
              f"| decode b1 ex / ideal (target) | decode b{large_batch} el / ex | el / ex mean (worst) "
              "| ms/token b1 ex | peak MB b1 ex |")
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        target = ""
        if r["target"] is not None:
            target = f" ({'ok' if r['decode_over_ideal'] >= r['target'] else 'MISS'} ≥{r['target']})"
        lines.append(
            f"| {r['shape']} | {r['depth']} | {r['width']:g} | {r['params'] / 1e6:.1f}M | {r['ideal']:.2f}× "
            f"| {r['prefill_b1_elastic']:.2f}× / {r['prefill_b1_exported']:.2f}× "
            f"| {r['decode_b1_elastic']:.2f}× / {r['decode_b1_exported']:.2f}× "
            f"| {r['decode_over_ideal']:.2f}{target} "
            f"| {r[f'decode_b{large_batch}_elastic']:.2f}× / {r[f'decode_b{large_batch}_exported']:.2f}× "
            f"| {r['elastic_over_exported_mean']:.2f} ({r['elastic_over_exported']:.2f}) "
            f"| {r['decode_ms_b1_exported']:.1f} | {r['memory_mb_b1_exported']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="any-shape checkpoint folder (default: convert SmolLM2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-length", type=int, default=128, help="prefill length; decoding continues after it")
    parser.add_argument("--batch", type=int, default=4, help="the larger batch size (batch 1 is always measured)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_deploy.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder, model = load_model(args.model)
    named_shapes = pick_shapes(model)
    shapes = [(depth, width) for _, depth, width in named_shapes]
    switches = time_set_shape(model, shapes)
    settings = ProfileSettings((args.prompt_length,), (1, args.batch), args.new_tokens)
    started = time.perf_counter()
    measured = profile_shapes(model, shapes, settings, repeats=args.repeats,
                              progress=lambda message: print(message, file=sys.stderr))
    minutes = (time.perf_counter() - started) / 60
    runtime = Runtime.of(model)
    save_profile(folder, DeviceProfile(runtime, settings, measured))
    rows = speed_rows(model, named_shapes, measured, settings)

    set_shape_ms = statistics.median(switches)
    print(f"{runtime.describe()} | {settings.describe()} | median of {args.repeats} | {minutes:.1f} min")
    print(markdown_table(rows, args.batch))
    checks = {
        "depth-only decode ≥ 0.85 × ideal": all(r["decode_over_ideal"] >= r["target"] for r in rows
                                               if r["target"] == DEPTH_TARGET),
        "width decode ≥ 0.7 × ideal": all(r["decode_over_ideal"] >= r["target"] for r in rows
                                          if r["target"] == WIDTH_TARGET),
        "elastic within 10% of exported (every prefill and decode ratio)": all(
            r["elastic_over_exported"] >= ELASTIC_TARGET for r in rows),
        "set_shape < 5 ms (median)": set_shape_ms < SET_SHAPE_TARGET_MS,
    }
    print(f"set_shape: median {set_shape_ms:.2f} ms, max {max(switches):.2f} ms over {len(switches)} switches")
    for check, met in checks.items():
        print(f"{'met   ' if met else 'MISSED'} {check}")

    result = {
        "config": vars(args) | {"model": str(folder), "runtime": runtime.describe(), "settings": settings.describe(),
                                "cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "date": time.strftime("%Y-%m-%d"), "minutes": minutes},
        "set_shape_ms_median": set_shape_ms, "set_shape_ms_max": max(switches), "rows": rows, "checks": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
