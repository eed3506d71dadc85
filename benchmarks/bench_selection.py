"""Stage-1 selection quality without fine-tuning: DP depth tables and FLAP widths against baselines.

Calibration on ../shared/data/calibration (never on evaluation data); evaluation as WikiText-2 *test* perplexity
on the first `--eval-tokens` tokens in non-overlapping windows of `--window` tokens. Rows are saved as they finish,
so an interrupted run resumes; the DP is timed with prefix caching and naively.

    python benchmarks/bench_selection.py --data-dir ../shared/data
    python benchmarks/bench_selection.py --calibration calibration/wiki_demo.txt --depth-only \
        --out benchmarks/results/bench_selection_wiki.json     # depth methods only, DP-kl, other calibration text
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from amoeba_hf.evaluation.scoring import perplexity
from amoeba_hf.pipeline.sources import convert_source, load_tokenizer
from amoeba_hf.selection.data import text_blocks
from amoeba_hf.selection.depth import (
    LayerRunner,
    block_influence_table,
    dp_depth_table,
    drop_last_table,
    kl_score,
    perplexity_score,
    removable_layers,
)
from amoeba_hf.selection.width import apply_width_order, collect_statistics, layer_scores

DEPTHS = (27, 24, 21, 18)
WIDTHS = (0.875, 0.75, 0.625, 0.5)
# (row name, score method, width mode, bias compensation)
WIDTH_METHODS = (
    ("FLAP global", "flap", "global", True),
    ("FLAP uniform", "flap", "uniform", True),
    ("FLAP global, no bias comp.", "flap", "global", False),
    ("magnitude", "magnitude", "uniform", False),
    ("Wanda-sp", "wanda-sp", "uniform", False),
    ("random", "random", "uniform", False),
)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": {}, "dp": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def run_dp(model, blocks: torch.Tensor, scan: list[int], max_removed: int, score_name: str, cached: bool,
           chunk: int) -> dict:
    """One DP run, timed, with its layer-forward count."""
    runner = LayerRunner(model, blocks, chunk_size=chunk)
    if cached or score_name == "kl":
        runner.cache_layer_inputs()
    score = perplexity_score(runner, blocks, chunk) if score_name == "ppl" else kl_score(runner)
    start = time.perf_counter()
    table, evaluations = dp_depth_table(
        model.config.num_hidden_layers, scan, max_removed,
        lambda removed, boundary: score(runner.final_states(removed, boundary if cached else 0)),
    )
    return {"table": table, "evaluations": evaluations, "layer_forwards": runner.layer_forwards,
            "seconds": time.perf_counter() - start}


def depth_tables(model, blocks: torch.Tensor, timing_blocks: torch.Tensor | None, min_depth: int, results: dict,
                 out: Path, chunk: int) -> dict:
    """Tables of every depth method. The DP's prefix cache is timed against the naive DP on `timing_blocks`;
    without them only DP-kl runs (the cheaper score, for extra calibration sources)."""
    num_layers = model.config.num_hidden_layers
    scan = removable_layers(num_layers, keep_last=1)
    max_removed = num_layers - min_depth
    tables = {"drop-last": drop_last_table(num_layers, scan, max_removed)}
    runner = LayerRunner(model, blocks, chunk_size=chunk)
    runner.cache_layer_inputs()
    tables["ShortGPT-BI"] = block_influence_table(runner, scan, max_removed)
    runs = [("DP-kl", "kl", True, blocks)]
    if timing_blocks is not None:
        runs = [("DP-ppl", "ppl", True, blocks), *runs, ("timing: DP-ppl cached", "ppl", True, timing_blocks),
                ("timing: DP-ppl naive", "ppl", False, timing_blocks)]
    for name, score_name, cached, data in runs:
        if name not in results["dp"]:
            results["dp"][name] = run_dp(model, data, scan, max_removed, score_name, cached, chunk)
            save_results(out, results)
        if not name.startswith("timing"):
            tables[name] = results["dp"][name]["table"]
    if timing_blocks is not None and (
        results["dp"]["timing: DP-ppl cached"]["table"] != results["dp"]["timing: DP-ppl naive"]["table"]
    ):
        print("warning: naive and cached DP tables differ", file=sys.stderr)
    return tables


def plot(results: dict, path: Path) -> None:
    """One panel per kind of selection that has rows (depth, width), perplexity on a log scale."""
    titles = {"depth": "depth (full width), no fine-tuning", "width": "width (full depth), no fine-tuning"}
    kinds = [kind for kind in titles if any(r["kind"] == kind for r in results["rows"].values())]
    figure, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        methods = sorted({r["method"] for r in results["rows"].values() if r["kind"] == kind})
        for method in methods:
            rows = sorted((r for r in results["rows"].values() if r["kind"] == kind and r["method"] == method),
                          key=lambda r: r[kind])
            axis.plot([r[kind] for r in rows], [r["ppl"] for r in rows], marker="o", label=method)
        axis.set_yscale("log")
        axis.set_xlabel(kind)
        axis.set_ylabel("WikiText-2 test perplexity")
        axis.set_title(titles[kind])
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--calibration", default="calibration/c4_demo.jsonl")
    parser.add_argument("--samples", type=int, default=8, help="DP calibration blocks")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per DP calibration block")
    parser.add_argument("--timing-samples", type=int, default=2, help="blocks of 64 tokens for cached-vs-naive timing")
    parser.add_argument("--width-samples", type=int, default=16, help="blocks of 256 tokens for width statistics")
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth-only", action="store_true",
                        help="depth methods only, DP-kl without DP-ppl and timing (e.g. to compare calibration texts)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_selection.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = load_results(out)
    results["config"] = vars(args) | {"date": time.strftime("%Y-%m-%d")}

    data_dir = Path(args.data_dir)
    model = convert_source(None, min_depth=min(DEPTHS)).eval()
    tokenizer = load_tokenizer(None)
    wiki = (data_dir / "wikitext2" / "wiki.test.raw").read_text()
    eval_ids = tokenizer(wiki[: args.eval_tokens * 8], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    eval_ids = eval_ids[: args.eval_tokens]
    calibration = data_dir / args.calibration

    def evaluate(key: str, row: dict, shaped_model, depth: int, width: float) -> None:
        if key in results["rows"]:
            return
        shaped_model.set_shape(depth, width)
        start = time.perf_counter()
        ppl = perplexity(shaped_model, eval_ids, window=args.window, batch_size=4)["ppl"]
        row |= {"depth": depth, "width": width, "ppl": ppl, "seconds": time.perf_counter() - start,
                "param_ratio": shaped_model.shape_space.parameter_count(depth, width)
                / shaped_model.shape_space.parameter_count(30, 1.0)}
        results["rows"][key] = row
        save_results(out, results)
        print(f"{row['kind']:<5} {row['method']:<28} d={depth:<2} w={width:<5} params={row['param_ratio']:.1%} "
              f"ppl={ppl:9.2f}", flush=True)

    evaluate("dense", {"kind": "dense", "method": "dense"}, model, 30, 1.0)

    blocks = text_blocks(calibration, tokenizer, args.samples, args.seq_len)
    timing_blocks = None if args.depth_only else text_blocks(calibration, tokenizer, args.timing_samples, 64)
    tables = depth_tables(model, blocks, timing_blocks, min(DEPTHS), results, out, chunk=4)
    # Perplexity of each depth table on the DP's calibration blocks: how well a method fits what it saw.
    calibration_ppl = results.setdefault("calibration_ppl", {})
    if any(method not in calibration_ppl for method in tables):
        runner = LayerRunner(model, blocks, chunk_size=4)
        score = perplexity_score(runner, blocks, 4)
        every_layer = frozenset(range(model.config.num_hidden_layers))
        for method, table in tables.items():
            kept = {int(depth): layers for depth, layers in table.items()}
            calibration_ppl[method] = {str(d): score(runner.final_states(every_layer - set(kept[d]))) for d in DEPTHS}
        save_results(out, results)
    for method, table in tables.items():
        model.config.depth_table = table
        model.model.reset_shape_space()
        for depth in DEPTHS:
            evaluate(f"depth/{method}/{depth}", {"kind": "depth", "method": method}, model, depth, 1.0)
    model.config.depth_table = None
    model.model.reset_shape_space()

    if not args.depth_only:
        width_blocks = text_blocks(calibration, tokenizer, args.width_samples, 256)
        stats = collect_statistics(model, width_blocks)
        for name, method, mode, compensation in WIDTH_METHODS:
            if all(f"width/{name}/{w}" in results["rows"] for w in WIDTHS):
                continue
            pruned = copy.deepcopy(model)
            groups, neurons = layer_scores(pruned, stats, method)
            apply_width_order(pruned, groups, neurons, stats, mode, compensation)
            for width in WIDTHS:
                evaluate(f"width/{name}/{width}", {"kind": "width", "method": name}, pruned, 30, width)
            del pruned

    print(f"\nWikiText-2 test perplexity, first {len(eval_ids):,} tokens, windows of {args.window}, no fine-tuning")
    print(f"dense: {results['rows']['dense']['ppl']:.2f}")
    for kind, values, key in (("depth", DEPTHS, "depth"), ("width", WIDTHS, "width")):
        methods = list(dict.fromkeys(r["method"] for r in results["rows"].values() if r["kind"] == kind))
        print(f"{kind:<28}" + "".join(f"{v:>10}" for v in values))
        for method in methods:
            cells = [results["rows"].get(f"{kind}/{method}/{v}") for v in values]
            print(f"{method:<28}" + "".join(f"{c['ppl']:>10.2f}" if c else f"{'-':>10}" for c in cells))
    for name, dp in results["dp"].items():
        print(f"{name}: {dp['evaluations']} evaluations, {dp['layer_forwards']} layer-forwards, {dp['seconds']:.0f} s")
    print(f"\nperplexity on the DP's {args.samples} calibration blocks (what the DP-ppl optimises)")
    for method, values in results["calibration_ppl"].items():
        print(f"{method:<28}" + "".join(f"{values[str(d)]:>10.2f}" for d in DEPTHS))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
