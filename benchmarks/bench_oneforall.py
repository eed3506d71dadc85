"""Quality of one-for-all fine-tuning (Stage 2) on a Stage-1 checkpoint: WikiText-2 test perplexity across shapes.

Methods, all trained on the same data (an instruction file and calibration text, never an evaluation set) with the
same budget (steps x batch, sequence lengths, learning rate, rank):
  no_finetune   the Stage-1 checkpoint as it is
  one_for_all   SMoL (E experts, top-k), sandwich of largest + smallest + R random shapes, distillation, balancing
  e1            ablation: one expert (shared LoRA)
  no_balancing  ablation: no loss-magnitude balancing
  ce_only       ablation: no distillation, every shape on the labels
  no_router_noise  diagnostic: the full method with noise-free routing (training gates = inference gates)
  per_shape     the paper's baseline: for the evaluated shapes nearest 80/65/50% of the parameters, the shape exported
                as a plain model and fine-tuned alone with peft LoRA (stock `Trainer`) for as many steps as one run
Evaluation: perplexity on the first `--eval-tokens` tokens of WikiText-2 *test*, non-overlapping windows of
`--window` (`amoeba_hf.evaluation.scoring.perplexity`). Shapes: for `--shapes` parameter ratios evenly spaced from 1 to
`--min-ratio`, the grid shape (calibrated depths x width grid) nearest to each.

Zero-shot: accuracy on seeded subsets of HellaSwag, ARC-Easy and PIQA (`--zero-shot-limit` items each, lm-eval's
prompts via `amoeba_hf.evaluation.scoring`) at the full shape and the per-shape baselines' shapes, for every method.

Resumable: trainings checkpoint every `--save-steps` and resume; trained adapters are kept; every finished
perplexity is written to the results JSON at once and skipped on a re-run.

    python benchmarks/bench_oneforall.py --model /tmp/sm_cal --data-dir ../shared/data
"""

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.evaluation.scoring import encode_task, perplexity, score_task
from amoeba_hf.evaluation.tasks import load_task
from amoeba_hf.modeling.configuration_amoeba import SMOL_TARGETS
from amoeba_hf.training.finetune import FinetuneSettings, build_dataset, finetune, last_complete_checkpoint

ABLATIONS = {
    "one_for_all": {},
    "e1": {"experts": 1, "top_k": 1},
    "no_balancing": {"loss_balancing": False},
    "ce_only": {"distillation": False},
    "no_router_noise": {"router_noise": False},
}
BASELINE_RATIOS = (0.80, 0.65, 0.50)
ZERO_SHOT_TASKS = ("hellaswag", "arc_easy", "piqa")
LABELS = {
    "no_finetune": "no fine-tuning (Stage 1 only)",
    "one_for_all": "one-for-all (full method)",
    "e1": "ablation: E=1",
    "no_balancing": "ablation: no balancing",
    "ce_only": "ablation: no distillation (CE only)",
    "no_router_noise": "diagnostic: SMoL without router noise",
    "per_shape": "per-shape LoRA baseline",
}


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=2))
    os.replace(staging, path)


def evaluation_shapes(model: AmoebaForCausalLM, count: int, min_ratio: float) -> list[dict]:
    """The grid shapes nearest to `count` evenly spaced parameter ratios (ties: the wider shape)."""
    space = model.shape_space
    full = space.parameter_count(space.num_layers, 1.0)
    grid = {shape: space.parameter_count(*shape) / full for shape in space.grid()}
    chosen = []
    for step in range(count):
        target = 1.0 - (1.0 - min_ratio) * step / (count - 1)
        candidates = [s for s in grid if s not in chosen]
        chosen.append(min(candidates, key=lambda s: (abs(grid[s] - target), -s[1])))
    return [{"depth": d, "width": w, "ratio": grid[(d, w)]} for d, w in sorted(chosen, key=lambda s: -grid[s])]


def shape_key(shape: dict) -> str:
    return f"{shape['depth']}x{shape['width']}"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def one_for_all_model(args, method: str, settings: FinetuneSettings, tokenizer, work: Path, results: dict, out: Path):
    """The Stage-1 model trained by one recipe, or reloaded from its saved adapter."""
    model = AmoebaForCausalLM.from_pretrained(args.model)
    adapter = work / method / "adapter.pt"
    if adapter.exists():
        model.enable_smol(experts=settings.experts, top_k=min(settings.top_k, settings.experts), rank=settings.rank,
                          alpha=settings.alpha)
        state = torch.load(adapter)
        if set(state) != set(trainable_state(model)):
            raise SystemExit(f"{adapter} does not match the {method} recipe; delete it to retrain")
        model.load_state_dict(state, strict=False)
        return model.eval()
    start = time.time()
    trainer = finetune(model, tokenizer, settings, work / method / "checkpoints",
                       include_num_input_tokens_seen="non_padding", disable_tqdm=True, use_cpu=True)
    torch.save(trainable_state(model), adapter)
    results["training"][method] = training_record(trainer, time.time() - start)
    save_json(out, results)
    return model.eval()


def training_record(trainer, seconds: float) -> dict:
    """What a run did: steps, tokens, wall time (of this session, if resumed) and its logged losses."""
    state = trainer.state
    return {"steps": state.global_step, "input_tokens": int(state.num_input_tokens_seen), "seconds": seconds,
            "log": [row for row in state.log_history if "loss" in row]}


def per_shape_model(args, shape: dict, settings: FinetuneSettings, tokenizer, work: Path, results: dict, out: Path):
    """The shape exported as a plain model and fine-tuned alone with peft LoRA; merged for evaluation."""
    source = AmoebaForCausalLM.from_pretrained(args.model)
    base = source.export_subnet(shape["depth"], shape["width"])
    del source
    folder = work / f"per_shape_{shape_key(shape)}"
    if (folder / "adapter" / "adapter_config.json").exists():
        return PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload().eval()
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=list(SMOL_TARGETS))
    model = get_peft_model(base, lora)
    training_args = TrainingArguments(
        output_dir=str(folder / "checkpoints"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum, learning_rate=settings.learning_rate,
        lr_scheduler_type="constant", max_grad_norm=settings.max_grad_norm, save_strategy="steps",
        save_steps=settings.save_steps, save_total_limit=2, logging_steps=max(1, min(10, settings.steps // 10)),
        report_to=[], seed=settings.seed, data_seed=settings.seed, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, use_cpu=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=build_dataset(settings.data, tokenizer, settings),
        processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
    )
    start = time.time()
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder / "checkpoints"))
    model.save_pretrained(folder / "adapter")
    results["training"][f"per_shape@{shape_key(shape)}"] = training_record(trainer, time.time() - start)
    save_json(out, results)
    return model.merge_and_unload().eval()


def evaluate(model, key: str, shape: dict, token_ids: torch.Tensor, args, results: dict, out: Path) -> None:
    if key in results["rows"]:
        return
    start = time.time()
    score = perplexity(model, token_ids, window=args.window, batch_size=args.eval_batch_size)
    results["rows"][key] = {**score, **shape, "seconds": time.time() - start}
    save_json(out, results)
    print(f"{key}: ppl {score['ppl']:.2f} ({time.time() - start:.0f} s)", flush=True)


def zero_shot_shapes(shapes: list[dict]) -> list[dict]:
    """The full shape and the shapes of the per-shape baselines: where every method can be compared."""
    return [shapes[0], *(min(shapes, key=lambda s: abs(s["ratio"] - target)) for target in BASELINE_RATIOS)]


def evaluate_zero_shot(model, key: str, shape: dict, tasks: dict, results: dict, out: Path) -> None:
    """Accuracy on each zero-shot task subset (`acc`, lm-eval's prompts) and their mean, saved at once."""
    zero_shot = results.setdefault("zero_shot", {})
    if key in zero_shot:
        return
    start = time.time()
    scores = {name: score_task(model, encoded, batch_size=8)["acc"] for name, encoded in tasks.items()}
    zero_shot[key] = {**shape, **scores, "average": statistics.mean(scores.values()), "seconds": time.time() - start}
    save_json(out, results)
    print(f"{key}: zero-shot average {zero_shot[key]['average']:.3f} ({time.time() - start:.0f} s)", flush=True)


def summary(results: dict) -> tuple[str, dict]:
    """The table (shapes x methods, then the mean and the geometric mean over shapes) and the goals."""
    rows, shapes = results["rows"], results["shapes"]
    methods = ["no_finetune", *ABLATIONS]
    ppl = {m: {shape_key(s): rows[f"{m}@{shape_key(s)}"]["ppl"] for s in shapes if f"{m}@{shape_key(s)}" in rows}
           for m in methods}
    baselines = {shape_key(s): rows[f"per_shape@{shape_key(s)}"]["ppl"] for s in shapes
                 if f"per_shape@{shape_key(s)}" in rows}
    complete = [m for m in methods if len(ppl[m]) == len(shapes)]
    means = {m: statistics.mean(ppl[m].values()) for m in complete}
    geometric = {m: statistics.geometric_mean(ppl[m].values()) for m in complete}
    lines = [f"{'shape':>8} {'params':>7} " + " ".join(f"{m:>15}" for m in [*methods, "per_shape"])]
    for shape in shapes:
        key = shape_key(shape)
        cells = [f"{ppl[m][key]:>15.2f}" if key in ppl[m] else f"{'-':>15}" for m in methods]
        cells.append(f"{baselines[key]:>15.2f}" if key in baselines else f"{'':>15}")
        lines.append(f"{key:>8} {shape['ratio']:>7.1%} " + " ".join(cells))
    for name, values in (("mean", means), ("geo-mean", geometric)):
        lines.append(f"{name:>8} {'':>7} " + " ".join(f"{values[m]:>15.2f}" if m in values else f"{'-':>15}"
                                                      for m in methods))
    goals = {}
    if {"no_finetune", "one_for_all"} <= set(complete):
        ofa = ppl["one_for_all"]
        goals["beats no fine-tuning at every shape"] = all(ofa[k] < ppl["no_finetune"][k] for k in ofa)
        for ablation in ("e1", "no_balancing", "ce_only"):
            if ablation in complete:
                goals[f"mean below {ablation} ({means['one_for_all']:.1f} vs {means[ablation]:.1f})"] = (
                    means["one_for_all"] < means[ablation])
        full = shape_key(shapes[0])
        degradation = ofa[full] / ppl["no_finetune"][full] - 1
        goals[f"full shape within 3% of the original ({degradation:+.1%})"] = degradation <= 0.03
        for key, value in baselines.items():
            gap = ofa[key] / value - 1
            goals[f"within 5% of the per-shape baseline at {key} ({gap:+.1%})"] = gap <= 0.05
    zero_shot = results.get("zero_shot", {})
    if zero_shot:
        columns = [*methods, "per_shape"]
        lines.append("zero-shot average accuracy (HellaSwag, ARC-Easy, PIQA subsets)")
        lines.append(f"{'shape':>8} {'params':>7} " + " ".join(f"{m:>15}" for m in columns))
        for shape in zero_shot_shapes(shapes):
            key = shape_key(shape)
            cells = [f"{zero_shot[f'{m}@{key}']['average']:>15.3f}" if f"{m}@{key}" in zero_shot else f"{'-':>15}"
                     for m in columns]
            lines.append(f"{key:>8} {shape['ratio']:>7.1%} " + " ".join(cells))
    lines += [f"goal: {name}: {'met' if met else 'MISSED'}" for name, met in goals.items()]
    return "\n".join(lines), goals


def plot(results: dict, path: Path) -> None:
    rows, shapes = results["rows"], results["shapes"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in ["no_finetune", *ABLATIONS, "per_shape"]:
        points = [(s["ratio"] * 100, rows[f"{method}@{shape_key(s)}"]["ppl"]) for s in shapes
                  if f"{method}@{shape_key(s)}" in rows]
        if points:
            style = "s" if method == "per_shape" else "o-"
            axis.plot(*zip(*points), style, label=LABELS[method], markersize=5)
    axis.set_xlabel("parameters kept (% of the full model, embeddings included)")
    axis.set_ylabel("WikiText-2 test perplexity")
    axis.set_yscale("log")
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(f"One-for-all fine-tuning, {results['settings']['steps']} steps x batch "
                   f"{results['settings']['batch_size']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Stage-1 (calibrated) any-shape checkpoint")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--train-files", default="finetune/alpaca_en_demo.json,calibration/c4_demo.jsonl",
                        help="comma-separated, relative to --data-dir: fine-tuning and calibration data only")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-response-tokens", type=int, default=128)
    parser.add_argument("--text-block-size", type=int, default=256)
    parser.add_argument("--experts", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--random-shapes", type=int, default=2)
    parser.add_argument("--shapes", type=int, default=8, help="evaluated shapes, from the full model to --min-ratio")
    parser.add_argument("--min-ratio", type=float, default=0.5)
    parser.add_argument("--methods", default=",".join(["no_finetune", *ABLATIONS, "per_shape"]))
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--zero-shot-limit", type=int, default=50,
                        help="items per zero-shot task (HellaSwag, ARC-Easy, PIQA; seeded subsets); 0 skips them")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / ".cache" / "oneforall"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_oneforall.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    settings = FinetuneSettings(
        data=[str(data_dir / f) for f in args.train_files.split(",")], steps=args.steps, batch_size=args.batch_size,
        grad_accum=1, learning_rate=args.lr, max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens, text_block_size=args.text_block_size, experts=args.experts,
        top_k=args.top_k, rank=args.rank, alpha=2.0 * args.rank, random_shapes=args.random_shapes,
        save_steps=args.save_steps, seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    stage1 = AmoebaForCausalLM.from_pretrained(args.model).eval()
    shapes = evaluation_shapes(stage1, args.shapes, args.min_ratio)
    run_settings = {**asdict(settings), "eval_tokens": args.eval_tokens, "window": args.window, "model": args.model,
                    "zero_shot_limit": args.zero_shot_limit}
    results = json.loads(out.read_text()) if out.exists() else {"rows": {}, "training": {}}
    saved = results.get("settings", run_settings)
    if any(saved.get(key, value) != value for key, value in run_settings.items()):
        raise SystemExit(f"{out} holds results of other settings; choose another --out")
    results.update(settings=run_settings, shapes=shapes)
    save_json(out, results)
    token_ids = encode_task(load_task("wikitext2", data_dir), tokenizer, ppl_window=args.window,
                            ppl_tokens=args.eval_tokens).token_ids
    methods = args.methods.split(",")
    tasks = {name: encode_task(load_task(name, data_dir, limit=args.zero_shot_limit), tokenizer)
             for name in ZERO_SHOT_TASKS} if args.zero_shot_limit else {}
    scored = zero_shot_shapes(shapes) if tasks else []
    started = time.time()

    def done(method: str) -> bool:
        return (all(f"{method}@{shape_key(s)}" in results["rows"] for s in shapes)
                and all(f"{method}@{shape_key(s)}" in results.get("zero_shot", {}) for s in scored))

    def evaluate_all(model, method: str) -> None:
        for shape in shapes:
            model.set_shape(shape["depth"], shape["width"])
            evaluate(model, f"{method}@{shape_key(shape)}", shape, token_ids, args, results, out)
        for shape in scored:
            model.set_shape(shape["depth"], shape["width"])
            evaluate_zero_shot(model, f"{method}@{shape_key(shape)}", shape, tasks, results, out)

    if "no_finetune" in methods:
        evaluate_all(stage1, "no_finetune")
    del stage1
    for method, recipe in ABLATIONS.items():
        if method not in methods or done(method):
            continue
        model = one_for_all_model(args, method, replace(settings, **recipe), tokenizer, work, results, out)
        evaluate_all(model, method)
        del model
    if "per_shape" in methods:
        for target in BASELINE_RATIOS:
            shape = min(shapes, key=lambda s: abs(s["ratio"] - target))
            key = f"per_shape@{shape_key(shape)}"
            if key in results["rows"] and (not tasks or key in results.get("zero_shot", {})):
                continue
            model = per_shape_model(args, shape, replace(settings, experts=1), tokenizer, work, results, out)
            evaluate(model, key, shape, token_ids, args, results, out)
            if tasks:
                evaluate_zero_shot(model, key, shape, tasks, results, out)
            del model

    text, goals = summary(results)
    results["goals"] = goals
    results.setdefault("wall_seconds", {})[time.strftime("%Y-%m-%dT%H:%M:%S")] = time.time() - started
    save_json(out, results)
    plot(results, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
