"""Host memory and time of every stage at three real model sizes on this CPU, next to `amoeba plan`'s estimate.

Random-weight Llama-style models in bf16 with the configs of SmolLM2-135M, SmolLM2-360M and Llama-3.2-1B (no
download: each source is built on the meta device, materialised in bf16 with `to_empty`, initialised and saved with
a word-level tokenizer of its vocabulary). Each stage then runs as the command line runs it, in its own process:

    source     build the random bf16 model and save it (this script, not the CLI)
    convert    amoeba convert SOURCE --min-depth L-1
    calibrate  amoeba calibrate (DP for depth L-1, 2 samples x SEQ tokens, widths 1,0.75,0.5)
    train      amoeba train (STEPS steps of batch 2, prompts and answers of SEQ/2 tokens, 2 experts of rank 4)
    eval       amoeba eval --tasks wikitext2 at the full shape (4 windows of SEQ tokens, batch 2)
    export     amoeba export of depth L-1 at width 0.75 (a plain LlamaForCausalLM)

Each process reports its own peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`, which the kernel keeps as
the process's high-water mark, so no sampling misses a short peak) and the parent times it (interpreter start and
imports included, as a user sees it). The baseline is a process that imports torch, transformers and the whole CLI
(every command's module, as `amoeba` does before running one) and builds the parser: "above baseline" is a stage's
peak minus that. The check: convert's peak <= 1.2 x the source's weight bytes (its safetensors file) + baseline.
`plan` is `amoeba plan`'s estimate for the same settings (per-stage memory total: weights, experts, optimizer,
gradients, activations; it leaves the runtime out, so it compares with "above baseline"). `load` is the 1-minute
load average when the stage started: the CPU is shared, and times on a busy machine are longer.

    python benchmarks/bench_scale.py                       # 135m, 360m, 1b; writes benchmarks/results/bench_scale.json
    python benchmarks/bench_scale.py --sizes 135m --out /tmp/bench_scale_135m.json
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SIZES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=True),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
               rope_theta=500000.0, tie_word_embeddings=True),
}
CONVERT_LIMIT = 1.2
EXPORT_WIDTH = 0.75

# A child process: run one CLI command (or none: the baseline) and report its own peak RSS as JSON on the last line.
CHILD = """
import json, resource, sys
from amoeba_hf.cli import build_parser, main
argv = json.loads(sys.argv[1])
code = main(argv) if argv else (build_parser() and 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"code": code, "peak_rss": peak, "children_peak_rss": children}))
"""

# The random bf16 source: built on the meta device, materialised once in bf16, initialised in place, saved.
SOURCE = """
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
fields, folder = json.loads(sys.argv[1]), sys.argv[2]
config = LlamaConfig(**fields, bos_token_id=1, eos_token_id=2)
with torch.device("meta"):
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
model.to_empty(device="cpu")
generator = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.fill_(1.0)
        else:
            parameter.normal_(0.0, 0.02, generator=generator)
model.tie_weights()
assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
model.save_pretrained(folder)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": 0, "peak_rss": peak, "children_peak_rss": 0,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def run_child(code: str, args: list[str], log: Path, threads: int | None = None) -> dict:
    """Run `python -c code args` with amoeba_hf importable; its report, wall time and output (kept in `log`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(result.stdout + "\n--- stderr\n" + result.stderr)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"{args[:2]} failed (exit {result.returncode}); see {log}:\n{result.stderr[-2000:]}")
    report = json.loads(lines[-1])
    if report["code"] != 0:
        raise RuntimeError(f"{args[:2]} exited {report['code']}; see {log}:\n{result.stderr[-2000:]}")
    return {**report, "seconds": seconds, "load_average_before": load}


def word_tokenizer(vocab_size: int):
    """Llama-style word-level tokenizer over the whole vocabulary: BOS added, EOS, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_data(folder: Path, vocab_size: int, seq_len: int) -> dict[str, Path]:
    """Random-word calibration text, instructions and a WikiText-2-shaped evaluation file."""
    rng = random.Random(0)
    words = lambda n: " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(n))
    text = folder / "text.jsonl"
    text.write_text("".join(json.dumps({"text": words(4 * seq_len)}) + "\n" for _ in range(8)))
    instructions = folder / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": words(seq_len), "input": "", "output": words(seq_len)}
                                        for _ in range(16)]))
    wiki = folder / "eval" / "wikitext2" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_text(words(8 * seq_len))
    return {"text": text, "instructions": instructions, "eval_dir": wiki.parents[1]}


def stage_commands(work: Path, data: dict[str, Path], layers: int, args: argparse.Namespace) -> dict[str, list[str]]:
    seq, min_depth = args.seq_len, layers - 1
    return {
        "convert": ["convert", str(work / "source"), "--min-depth", str(min_depth), "--out", str(work / "converted")],
        "calibrate": ["calibrate", str(work / "converted"), "--data", str(data["text"]), "--samples", "2",
                      "--seq-len", str(seq), "--widths", "1,0.75,0.5", "--out", str(work / "calibrated")],
        "train": ["train", str(work / "calibrated"), "--data", str(data["instructions"]), "--steps", str(args.steps),
                  "--batch-size", "2", "--grad-accum", "1", "--experts", "2", "--rank", "4", "--random-shapes", "1",
                  "--max-prompt-tokens", str(seq // 2), "--max-response-tokens", str(seq // 2),
                  "--save-steps", str(args.steps + 1), "--out", str(work / "trained")],
        "eval": ["eval", str(work / "trained"), "--shapes", f"{layers}x1", "--tasks", "wikitext2", "--data-dir",
                 str(data["eval_dir"]), "--ppl-window", str(seq), "--ppl-tokens", str(4 * seq), "--batch-size", "2",
                 "--out", str(work / "eval.json")],
        "export": ["export", str(work / "trained"), "--depth", str(min_depth), "--width", str(EXPORT_WIDTH),
                   "--out", str(work / "subnet")],
    }


def plan_estimate(source: Path, layers: int, args: argparse.Namespace) -> dict[str, int]:
    """`amoeba plan`'s memory total per stage for the settings the stages run with."""
    from amoeba_hf.pipeline.plan import plan

    estimate = plan(source, dtype="bfloat16", batch_size=2, seq_len=args.seq_len, grad_accum=1, experts=2, top_k=2,
                    rank=4, random_shapes=1, steps=args.steps, min_depth=layers - 1, samples=2,
                    widths=[1.0, 0.75, 0.5], eval_tokens=4 * args.seq_len)
    stages = {}
    for stage in estimate["stages"]:
        name = "eval" if stage["stage"] == "evaluate" else stage["stage"]
        if name == "eval" and tuple(stage["shape"]) != (layers, 1.0):
            continue
        stages[name] = stage["memory"]["total"]
    return {"stages": stages, "parameters": estimate["parameters"]}


def bench_size(size: str, root: Path, baseline: int, args: argparse.Namespace) -> dict:
    work = root / size
    work.mkdir()
    fields = SIZES[size]
    layers = fields["num_hidden_layers"]
    data = write_data(work, fields["vocab_size"], args.seq_len)
    print(f"=== {size}", flush=True)
    rows = []
    source = run_child(SOURCE, [json.dumps(fields), str(work / "source")], work / "source.log", args.threads)
    word_tokenizer(fields["vocab_size"]).save_pretrained(work / "source")
    weight_bytes = sum(path.stat().st_size for path in (work / "source").glob("*.safetensors"))
    rows.append({"stage": "source", **source})
    print(f"  source    {source['seconds']:7.1f} s  peak {source['peak_rss'] / 2**30:6.2f} GiB  "
          f"({source['parameters']:,} parameters, {weight_bytes / 2**30:.2f} GiB of weights)", flush=True)
    for name, command in stage_commands(work, data, layers, args).items():
        report = run_child(CHILD, [json.dumps(command)], work / f"{name}.log", args.threads)
        rows.append({"stage": name, **report})
        print(f"  {name:<9} {report['seconds']:7.1f} s  peak {report['peak_rss'] / 2**30:6.2f} GiB", flush=True)
    estimate = plan_estimate(work / "source", layers, args)
    for row in rows:
        row["above_baseline"] = row["peak_rss"] - baseline
        row["plan"] = estimate["stages"].get(row["stage"])
    convert = next(row for row in rows if row["stage"] == "convert")
    limit = CONVERT_LIMIT * weight_bytes + baseline
    scored = json.loads((work / "eval.json").read_text())["shapes"]
    ppl = {shape: row["tasks"]["wikitext2"] for shape, row in scored.items()}  # random weights: ~ the vocabulary
    if not args.keep:
        for path in work.iterdir():  # the checkpoints and data; the logs stay in the work folder
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
    return {"size": size, "config": fields, "parameters": source["parameters"], "source_weight_bytes": weight_bytes,
            "plan_parameters": estimate["parameters"], "stages": rows, "eval": ppl,
            "convert_check": {"peak_rss": convert["peak_rss"], "limit": limit,
                              "ratio_above_baseline_to_weights": (convert["peak_rss"] - baseline) / weight_bytes,
                              "passed": convert["peak_rss"] <= limit}}


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_table(results: list[dict], baseline: dict) -> str:
    lines = [f"baseline (import torch, transformers, amoeba CLI): peak RSS {gib(baseline['peak_rss'])} GiB, "
             f"{baseline['seconds']:.1f} s",
             f"{'size':<5} {'stage':<10} {'seconds':>8} {'peak GiB':>9} {'above base':>11} {'plan GiB':>9} "
             f"{'load':>5}"]
    for result in results:
        for row in result["stages"]:
            lines.append(f"{result['size']:<5} {row['stage']:<10} {row['seconds']:>8.1f} {gib(row['peak_rss']):>9} "
                         f"{gib(row['above_baseline']):>11} {gib(row['plan']):>9} {row['load_average_before']:>5.1f}")
        check = result["convert_check"]
        lines.append(f"{result['size']:<5} convert peak {gib(check['peak_rss'])} GiB <= 1.2 x weights "
                     f"({gib(result['source_weight_bytes'])} GiB) + baseline = {gib(check['limit'])} GiB: "
                     f"{'yes' if check['passed'] else 'NO'} (above baseline = "
                     f"{check['ratio_above_baseline_to_weights']:.2f} x weights)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="135m,360m,1b", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sample in every stage (default: 64)")
    parser.add_argument("--steps", type=int, default=2, help="training steps (default: 2)")
    parser.add_argument("--work", default=None, help="work folder, kept with each stage's log (default: a temporary "
                        "folder, removed)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP threads of each stage (default: torch's, one per core); on a CPU other jobs share, "
                             "1 avoids the collapse of spinning threads that wait for each other")
    parser.add_argument("--keep", action="store_true", help="keep each size's checkpoints in the work folder")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_scale.json"))
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    unknown = [size for size in sizes if size not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {', '.join(SIZES)}")
    root = Path(args.work or tempfile.mkdtemp(prefix="bench_scale."))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    baseline = run_child(CHILD, ["[]"], root / "baseline.log", args.threads)
    print(f"baseline peak RSS {gib(baseline['peak_rss'])} GiB ({baseline['seconds']:.1f} s)", flush=True)
    results = [bench_size(size, root, baseline["peak_rss"], args) for size in sizes]
    import torch

    summary = {"cpu_threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(), "seq_len": args.seq_len,
               "steps": args.steps, "baseline": baseline, "results": results,
               "total_seconds": time.perf_counter() - started}
    print()
    print(format_table(results, baseline))
    print(f"total {summary['total_seconds'] / 60:.1f} min")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
