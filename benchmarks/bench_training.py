"""Cost of one-for-all fine-tuning: a sandwich step against one plain LoRA step on the same batch.

Configurations, all rank `--rank` on q/k/v/o/gate/up/down, AdamW, batches of `--batch-size` Alpaca examples
(prompt <= 256, response <= 128 tokens, loss on the response) or, if `--data` is text, blocks of
`--text-block-size` tokens (loss on every token):
  lora      peft LoRA on the stock full model (LlamaForCausalLM exported from the checkpoint), stock `Trainer`
  smol      `AmoebaTrainer` sandwich of 2 + `--random-shapes` shapes, SMoL with `--experts` experts, top-`--top-k`
  smol_e1   the same sandwich with one expert (plain shared LoRA): the SMoL overhead is smol / smol_e1 - 1
A step is `training_step` (forward and backward of every shape) plus the optimizer step. Timing runs all
configurations in one process, round-robin (the CPU is shared: a slow moment hits every configuration of a round),
and reports the median over rounds of each configuration's time and of each per-round ratio, in CPU time of the
process (the targets: with one thread it is the step's cost, whatever else runs) and in wall time. Peak memory is the
peak resident set size of a fresh process per configuration after `--memory-steps` steps.

    python benchmarks/bench_training.py --model /tmp/sm_cal --threads 1 --rounds 9
    python benchmarks/bench_training.py --model /tmp/sm_cal --threads 1 --rounds 9 \
        --data ../shared/data/calibration/c4_demo.jsonl --out benchmarks/results/bench_training_text.json
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from amoeba_hf.modeling.configuration_amoeba import SMOL_TARGETS
from amoeba_hf.pipeline.sources import load_or_convert, load_tokenizer
from amoeba_hf.training.data import instruction_dataset, text_dataset
from amoeba_hf.training.finetune import is_instruction_file
from amoeba_hf.training.trainer import AmoebaTrainer, AmoebaTrainingArguments

CONFIGS = ("lora", "smol", "smol_e1")
CLOCKS = ("cpu", "wall")
TARGETS = {"sandwich_vs_lora": 3.2, "smol_overhead": 0.10, "memory_vs_lora": 1.5}


def fixed_batches(tokenizer, args: argparse.Namespace, count: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of seeded examples: instructions (loss on responses) or text blocks (loss on every token)."""
    if is_instruction_file(args.data):
        dataset = instruction_dataset(args.data, tokenizer, max_prompt_tokens=256, max_response_tokens=128)
    else:
        dataset = text_dataset(args.data, tokenizer, block_size=args.text_block_size)
    batch_size, seed = args.batch_size, args.seed
    rows = dataset.shuffle(seed=seed).select(range(count * batch_size))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    return [collator([rows[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(count)]


def stock_full_model(args: argparse.Namespace, work: Path) -> Path:
    """The checkpoint's full shape saved once as a plain model, so the LoRA baseline loads one copy, as a user would."""
    folder, source = work / "stock_full_model", str(args.model)
    if not (folder / "source.txt").exists() or (folder / "source.txt").read_text() != source:
        model, _ = load_or_convert(args.model)
        model.export_subnet(model.shape_space.num_layers, 1.0).save_pretrained(folder)
        (folder / "source.txt").write_text(source)
    return folder


def build(config: str, args: argparse.Namespace, work: Path):
    """(trainer, model) for one configuration, with its optimizer created."""
    tokenizer = load_tokenizer(args.model)
    common = {"output_dir": str(work / config), "per_device_train_batch_size": args.batch_size, "learning_rate": 2e-4,
              "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True}
    if config == "lora":
        lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(SMOL_TARGETS))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(stock_full_model(args, work)), lora)
        trainer = Trainer(model=model, args=TrainingArguments(**common), processing_class=tokenizer)
    else:
        model, _ = load_or_convert(args.model)
        experts = args.experts if config == "smol" else 1
        model.enable_smol(experts=experts, top_k=min(args.top_k, experts), rank=args.rank, alpha=2.0 * args.rank)
        trainer = AmoebaTrainer(model=model, args=AmoebaTrainingArguments(
            **common, random_shapes=args.random_shapes, shape_widths=args.widths), processing_class=tokenizer)
    trainer.create_optimizer()
    model.train()
    return trainer, model


def step(trainer, model, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Wall and CPU seconds of one training step (every shape's forward and backward) and the optimizer step.

    CPU time of this process is what the step costs; wall time also counts the time other processes held the CPU.
    """
    items = batch["labels"][:, 1:].ne(-100).sum()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.training_step(model, dict(batch), num_items_in_batch=items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def memory_status_mib(field: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since the last reset) of this process, from /proc (Linux)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def measure_memory(config: str, args: argparse.Namespace, work: Path) -> dict:
    """Run in a fresh process: resident memory before training, and its peak over `--memory-steps` steps.

    The peak is reset (Linux `clear_refs`) after loading, so a transient copy made while loading does not count.
    """
    trainer, model = build(config, args, work)
    batches = fixed_batches(trainer.processing_class, args, args.memory_steps)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = memory_status_mib("VmRSS")
    for batch in batches:
        step(trainer, model, batch)
    return {"rss_before_mib": before, "peak_rss_mib": memory_status_mib("VmHWM")}


def time_configs(args: argparse.Namespace, work: Path) -> dict:
    built = {config: build(config, args, work) for config in CONFIGS}
    tokenizer = built["smol"][0].processing_class
    batches = fixed_batches(tokenizer, args, args.rounds)
    for config in CONFIGS:
        step(*built[config], batches[0])
    times = {clock: {config: [] for config in CONFIGS} for clock in CLOCKS}
    for index, batch in enumerate(batches):
        order = CONFIGS[index % len(CONFIGS):] + CONFIGS[: index % len(CONFIGS)]
        for config in order:
            for clock, seconds in step(*built[config], batch).items():
                times[clock][config].append(seconds)
        print(f"round {index + 1}/{len(batches)}: " + ", ".join(
            f"{c} {times['cpu'][c][-1]:.2f} s CPU, {times['wall'][c][-1]:.2f} s wall" for c in CONFIGS), flush=True)
    return {
        "step_seconds": {clock: {c: {"median": statistics.median(t), "all": t} for c, t in per_config.items()}
                         for clock, per_config in times.items()},
        "ratios": {clock: per_round_ratios(per_config) for clock, per_config in times.items()},
        "batches": {"shapes": [tuple(b["input_ids"].shape) for b in batches],
                    "response_tokens": [int(b["labels"][:, 1:].ne(-100).sum()) for b in batches]},
    }


def per_round_ratios(times: dict[str, list[float]]) -> dict[str, dict]:
    """Ratios within each round (same batch, same moment), then their median."""
    ratios = {
        "sandwich_vs_lora": [s / p for s, p in zip(times["smol"], times["lora"])],
        "sandwich_e1_vs_lora": [s / p for s, p in zip(times["smol_e1"], times["lora"])],
        "smol_overhead": [s / e - 1 for s, e in zip(times["smol"], times["smol_e1"])],
    }
    return {name: {"median": statistics.median(values), "all": values} for name, values in ratios.items()}


def table(results: dict) -> str:
    seconds, ratios, memory = results["step_seconds"], results["ratios"], results["memory"]
    header = f"{'configuration':<30} {'CPU s':>6} {'x LoRA':>6} {'wall s':>6} {'x LoRA':>6} {'peak RSS MiB':>12}"
    lines = [f"{header} {'x LoRA':>6}"]
    names = {"lora": "plain LoRA, full model (peft)", "smol": f"sandwich, SMoL E={results['settings']['experts']}",
             "smol_e1": "sandwich, E=1"}
    ratio_names = {"smol": "sandwich_vs_lora", "smol_e1": "sandwich_e1_vs_lora"}
    for config in CONFIGS:
        cells = []
        for clock in CLOCKS:
            ratio = ratios[clock][ratio_names[config]]["median"] if config in ratio_names else 1.0
            cells.append(f"{seconds[clock][config]['median']:>6.2f} {ratio:>6.2f}")
        peak, lora_peak = memory[config]["peak_rss_mib"], memory["lora"]["peak_rss_mib"]
        lines.append(f"{names[config]:<30} {' '.join(cells)} {peak:>12.0f} {peak / lora_peak:>6.2f}")
    lines.append("SMoL overhead vs E=1 (median of per-round ratios): "
                 + ", ".join(f"{ratios[clock]['smol_overhead']['median']:+.1%} {clock}" for clock in CLOCKS))
    for name, verdict in results["targets"].items():
        measure = "peak RSS" if name.startswith("memory") else "CPU time"
        lines.append(f"target {name} ({measure}): {verdict['value']:.3f} <= {verdict['target']} -> "
                     f"{'met' if verdict['met'] else 'MISSED'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="any-shape checkpoint (default: convert the embedded SmolLM2)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "finetune"
                                              / "alpaca_en_demo.json"))
    parser.add_argument("--text-block-size", type=int, default=256, help="tokens per block when --data is text")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--random-shapes", type=int, default=2)
    parser.add_argument("--widths", type=lambda text: [float(w) for w in text.split(",")], default=None)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / ".cache" / "bench_training"))
    parser.add_argument("--memory-only", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_training.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args, work)))
        return

    started = time.time()
    stock_full_model(args, work)
    memory = {}
    for config in CONFIGS:
        command = [sys.executable, __file__, *sys.argv[1:], "--memory-only", config]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        memory[config] = json.loads(output.strip().splitlines()[-1])
        print(f"memory {config}: {memory[config]}", flush=True)
    results = time_configs(args, work)
    results["memory"] = memory
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("memory_only", "out", "work")}
    ratios = results["ratios"]["cpu"]
    values = {
        "sandwich_vs_lora": ratios["sandwich_vs_lora"]["median"],
        "smol_overhead": ratios["smol_overhead"]["median"],
        "memory_vs_lora": memory["smol"]["peak_rss_mib"] / memory["lora"]["peak_rss_mib"],
    }
    results["targets"] = {n: {"value": v, "target": TARGETS[n], "met": v <= TARGETS[n]} for n, v in values.items()}
    results["environment"] = {"torch": torch.__version__, "threads": args.threads, "load_average": os.getloadavg(),
                              "wall_seconds": time.time() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
