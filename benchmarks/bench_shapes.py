"""Speed and memory of shapes: set_shape latency, prefill and decode tokens/s, elastic vs exported, peak RSS, and the
memory of the elastic model's weight cache (contiguous copies of column-sliced weights, see `ElasticLinear`).

Ratios are taken within one run: every repetition measures all shapes round-robin, so machine noise hits them alike.

    python benchmarks/bench_shapes.py                      # embedded SmolLM2-135M, fp32, 2 threads
    python benchmarks/bench_shapes.py --repeats 5 --out benchmarks/results/bench_shapes.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.deploy.profile import time_decode, time_prefill, time_set_shape
from amoeba_hf.modeling.elastic_linear import WEIGHT_CACHE_MODES, set_weight_cache, weight_cache_bytes
from amoeba_hf.pipeline.sources import convert_source

TARGETS = (0.8, 0.65, 0.5)
CACHE = Path(__file__).resolve().parent / ".cache"


def pick_shapes(model: AmoebaForCausalLM) -> list[tuple[str, int, float]]:
    """Full model plus, per target parameter ratio: depth only, width only, and both halved alike."""
    space = model.shape_space
    full = space.parameter_count(space.num_layers, 1.0)
    ratio = lambda d, w: space.parameter_count(d, w) / full
    widths = [round(space.min_width + i * 0.0125, 4) for i in range(int((1 - space.min_width) / 0.0125) + 1)]
    shapes = [("full", space.num_layers, 1.0)]
    for target in TARGETS:
        depth_only = min(space.depths, key=lambda d: abs(ratio(d, 1.0) - target))
        width_only = min(widths, key=lambda w: abs(ratio(space.num_layers, w) - target))
        both = min(((d, w) for d in space.depths for w in widths if abs(d / space.num_layers - w) < 0.1),
                   key=lambda s: abs(ratio(*s) - target))
        shapes += [(f"{target:.0%} depth", depth_only, 1.0), (f"{target:.0%} width", space.num_layers, width_only),
                   (f"{target:.0%} both", *both)]
    return shapes


def load_model(path: str | None) -> tuple[Path, AmoebaForCausalLM]:
    """The checkpoint at `path`, or the embedded SmolLM2 converted once into the benchmark cache."""
    folder = Path(path) if path else CACHE / "smollm2-amoeba"
    if not folder.exists():
        convert_source(None).save_pretrained(folder)
    return folder, AmoebaForCausalLM.from_pretrained(folder).eval()


def prefill_tokens_per_s(model, ids: torch.Tensor) -> float:
    return ids.numel() / time_prefill(model, ids)[0]


def decode_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode speed after reading `ids` (the prompt is not timed)."""
    _, cache, next_tokens = time_prefill(model, ids)
    return new_tokens / time_decode(model, cache, next_tokens, new_tokens)


def peak_rss_mb(folder: Path, shape: tuple[int, float] | None, seq: int) -> float:
    """Peak resident memory (VmHWM, reset by exec unlike ru_maxrss) of a fresh process: load, one prefill."""
    code = (
        "import torch; from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
        + (f"m.set_shape({shape[0]}, {shape[1]})\n" if shape else "")
        + f"with torch.no_grad(): m(torch.randint(0, 1000, (1, {seq})), use_cache=False)\n"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="any-shape checkpoint folder (default: convert SmolLM2)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=128, help="decode length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weight-cache", choices=WEIGHT_CACHE_MODES, default="strided",
                        help="the elastic model's inference weight cache (default: strided, the model's default)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_shapes.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder, model = load_model(args.model)
    set_weight_cache(model, args.weight_cache)
    shapes = pick_shapes(model)
    space = model.shape_space
    full_params = space.parameter_count(space.num_layers, 1.0)

    switch = time_set_shape(model, [(depth, width) for _, depth, width in shapes])

    exported_dir = Path(tempfile.mkdtemp(prefix="amoeba-bench-"))
    subnets = {}
    for name, depth, width in shapes:
        subnets[name] = model.export_subnet(depth, width).eval()
        subnets[name].save_pretrained(exported_dir / name.replace(" ", "_").replace("%", "pct"))
    generator = torch.Generator().manual_seed(0)
    prefill_ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=generator)
    decode_ids = prefill_ids[:, :16]

    for name, depth, width in shapes:  # warm-up: first calls allocate and pick kernels
        model.set_shape(depth, width)
        prefill_tokens_per_s(model, prefill_ids)
        prefill_tokens_per_s(subnets[name], prefill_ids)
    samples = {name: {"elastic_prefill": [], "exported_prefill": [], "elastic_decode": [], "exported_decode": []}
               for name, _, _ in shapes}
    cache_bytes = {}
    for repetition in range(args.repeats):
        # Prefills and decodes in separate passes: interleaved, decodes biased the prefill ratios (docs/benchmarks.md).
        for phase in ("prefill", "decode"):
            for name, depth, width in shapes:
                model.set_shape(depth, width)
                # Alternate which of the pair runs first: the second run of a pair finds warmer caches.
                pair = (("elastic", model), ("exported", subnets[name]))
                for kind, timed in pair if repetition % 2 == 0 else pair[::-1]:
                    speed = (prefill_tokens_per_s(timed, prefill_ids) if phase == "prefill"
                             else decode_tokens_per_s(timed, decode_ids, args.new_tokens))
                    samples[name][f"{kind}_{phase}"].append(speed)
                if phase == "decode":  # the shape's own layers, and all the model holds (inactive layers keep theirs)
                    cache_bytes[name] = (sum(weight_cache_bytes(layer) for layer in model.model.active_layers),
                                         weight_cache_bytes(model))
        print(f"repetition done ({len(samples['full']['elastic_prefill'])}/{args.repeats})", file=sys.stderr)

    median = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    base = median["full"]
    rows = []
    for name, depth, width in shapes:
        m = median[name]
        params = space.parameter_count(depth, width)
        subdir = exported_dir / name.replace(" ", "_").replace("%", "pct")
        rows.append({
            "shape": name, "depth": depth, "width": width, "params": params, "param_ratio": params / full_params,
            "ideal_speedup": full_params / params,
            "prefill_tok_s_elastic": m["elastic_prefill"], "prefill_tok_s_exported": m["exported_prefill"],
            "decode_tok_s_elastic": m["elastic_decode"], "decode_tok_s_exported": m["exported_decode"],
            "prefill_speedup_elastic": m["elastic_prefill"] / base["elastic_prefill"],
            "prefill_speedup_exported": m["exported_prefill"] / base["elastic_prefill"],
            "decode_speedup_elastic": m["elastic_decode"] / base["elastic_decode"],
            "decode_speedup_exported": m["exported_decode"] / base["elastic_decode"],
            "elastic_over_exported_prefill": m["elastic_prefill"] / m["exported_prefill"],
            "elastic_over_exported_decode": m["elastic_decode"] / m["exported_decode"],
            "weight_cache_mb": cache_bytes[name][0] / 2**20, "weight_cache_mb_held": cache_bytes[name][1] / 2**20,
            "peak_rss_mb_elastic": peak_rss_mb(folder, (depth, width), args.seq),
            "peak_rss_mb_exported": peak_rss_mb(subdir, None, args.seq),
        })

    header = (f"{'shape':<10} {'d':>3} {'w':>6} {'params':>7} {'ideal':>6} {'prefill el/ex':>14} "
              f"{'decode el/ex':>13} {'el/ex pre':>9} {'el/ex dec':>9} {'RSS MB el/ex':>13} {'cache MB':>8}")
    print(header)
    for r in rows:
        print(f"{r['shape']:<10} {r['depth']:>3} {r['width']:>6.3f} {r['param_ratio']:>6.1%} {r['ideal_speedup']:>5.2f}x "
              f"{r['prefill_speedup_elastic']:>6.2f}x/{r['prefill_speedup_exported']:>5.2f}x "
              f"{r['decode_speedup_elastic']:>5.2f}x/{r['decode_speedup_exported']:>5.2f}x "
              f"{r['elastic_over_exported_prefill']:>9.2f} {r['elastic_over_exported_decode']:>9.2f} "
              f"{r['peak_rss_mb_elastic']:>6.0f}/{r['peak_rss_mb_exported']:<6.0f} {r['weight_cache_mb']:>8.1f}")
    switch_median = statistics.median(switch)
    print(f"set_shape latency: median {switch_median:.3f} ms, max {max(switch):.3f} ms over {len(switch)} switches")
    print(f"full model: prefill {base['elastic_prefill']:.0f} tok/s (seq {args.seq}), "
          f"decode {base['elastic_decode']:.1f} tok/s ({args.new_tokens} new tokens); median of {args.repeats}")

    result = {
        "config": vars(args) | {"torch": torch.__version__, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")},
        "set_shape_ms_median": switch_median, "set_shape_ms_max": max(switch), "rows": rows,
        "full_prefill_tok_s": base["elastic_prefill"], "full_decode_tok_s": base["elastic_decode"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
