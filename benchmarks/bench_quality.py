"""Shape quality: how good are the shapes at ≈80/65/50% of the parameters, per recovery recipe (issue 13).

Every recipe is a sequence of `amoeba` commands, run as a user would run them (each step's folder is kept in
`--work` and reused by the recipes that share it; a step that was interrupted is run again, and `amoeba train`
resumes from its last checkpoint). Its cost is the wall-clock minutes of its calibration and recovery steps on this
machine (conversion of the source model is not counted).

Data roles: recipes calibrate and train only on `calibration/c4_demo.jsonl`, `finetune/alpaca_en_demo.json` or
text the base model generates itself. `calibration/wiki_demo.txt` (30 Wikipedia articles, none in WikiText-2 test)
is the development set: it picks each size class's shape (depth x width split) and screens recipes (`--protocol
dev`), so no choice is ever made on an evaluation set. `--protocol full` then scores the chosen shapes the way the
issue asks: WikiText-2 test perplexity (first 32,768 tokens, 512-token windows) and zero-shot ARC-Easy, HellaSwag
and PIQA acc_norm (200 items each, seed 1234), through `amoeba_hf.evaluation.runner.evaluate_shapes` (the
`amoeba eval` protocol).

    python benchmarks/bench_quality.py --protocol dev --recipes no_recovery,kl_text
    python benchmarks/bench_quality.py --protocol full          # writes benchmarks/results/shape_quality.json

Results are written after every measurement and skipped on a re-run, so an interrupted run resumes.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback

from amoeba_hf import AmoebaForCausalLM
from amoeba_hf.deploy.gguf import write_gguf
from amoeba_hf.evaluation.runner import EvalSettings, evaluate_shapes
from amoeba_hf.evaluation.scoring import perplexity
from amoeba_hf.modeling.checkpoint_files import write_text_atomically
from amoeba_hf.modeling.configuration_amoeba import SMOL_TARGETS
from amoeba_hf.modeling.shape_space import shape_key
from amoeba_hf.plotting import png_figure
from amoeba_hf.training.finetune import FinetuneSettings, build_dataset, last_complete_checkpoint
from amoeba_hf.training.trainer import prediction_mask

ROOT = Path(__file__).resolve().parent
TARGETS = (0.80, 0.65, 0.50)
WIDTHS = "1,0.875,0.75,0.625,0.5"
ZERO_SHOT = ("arc_easy", "hellaswag", "piqa")
CHANCE = {"arc_easy": 0.25, "hellaswag": 0.25, "piqa": 0.5}
C4 = "{data}/calibration/c4_demo.jsonl"
ALPACA = "{data}/finetune/alpaca_en_demo.json"
DEV_TEXT = "calibration/wiki_demo.txt"
PPL_TOKENS, PPL_WINDOW = 32768, 512  # issue 13's WikiText-2 protocol
PROBE_STEPS = 12  # optimizer steps of the per-shape baseline's timed probe run
NORM_STEPS = 100  # optimizer steps of the norm-scale bound per size class
# CPU per step of the whole per-shape run over the probe's: measured on the 80% class (5.1 / 3.8 CPU s)
PROBE_UNDERCOUNT = 1.34
DENSE_ROW = "no_recovery"  # its full shape is the dense model; every recipe but full_weights_* distils from the
# frozen base, whose full shape stays the source model bit for bit, so the dense row is scored once


@dataclass(frozen=True)
class Step:
    """One `amoeba` command that writes the folder `name` from the folder `source` (None: `convert` and `build`,
    which start from the embedded model)."""

    name: str
    args: tuple[str, ...]
    source: str | None = None


CONVERT = Step("base", ("convert",))  # shared by the recipes, not counted in their minutes
CALIBRATION = ("calibrate", "--data", C4, "--widths", WIDTHS, "--depth-method", "block-influence")
# the recipes of issue 13: no bridges, no width compensation
CALIBRATE_BI = Step("cal_bi", (*CALIBRATION, "--no-depth-bridges", "--no-width-compensation"), "base")
CALIBRATE_BI_64 = Step("cal_bi_64", (*CALIBRATE_BI.args, "--samples", "64"), "base")  # 64 x 256 tokens
CALIBRATE_QH = Step("cal_qh", (*CALIBRATE_BI.args, "--attention-unit", "query_heads"), "base")
CALIBRATE_QH_GLOBAL = Step("cal_qh_global", (*CALIBRATE_QH.args, "--width-mode", "global"), "base")
CALIBRATE_BRIDGES = Step("cal_bi_bridges", (*CALIBRATION, "--depth-bridges", "--no-width-compensation"), "base")
# width compensation as first measured (ridge 1e-2; the default is now 0.1, chosen on the development set)
COMPENSATION = ("--width-compensation", "--compensation-ridge", "0.01")
CALIBRATE_COMPENSATION = Step("cal_bi_comp", (*CALIBRATION, "--no-depth-bridges", *COMPENSATION), "base")
CALIBRATE_CLOSED_FORM = Step("cal_bi_closed_form", (*CALIBRATION, "--depth-bridges", *COMPENSATION), "base")
# calibrate's defaults when measured: 16 x 256 tokens (the standard preset), ridge 0.1, rank 32 (the default is now 128)
CLOSED_FORM = (*CALIBRATION, "--depth-bridges", "--width-compensation")
CALIBRATE_STANDARD_CLOSED_FORM = Step("cal_closed_form", (*CLOSED_FORM, "--width-compensation-rank", "32"), "base")
CALIBRATE_RANK_64 = Step("cal_closed_form_rank_64", (*CLOSED_FORM, "--width-compensation-rank", "64"), "base")
CALIBRATE_RANK_128 = Step("cal_closed_form_rank_128", (*CLOSED_FORM, "--width-compensation-rank", "128"), "base")
CALIBRATE_RANK_128_64 = Step("cal_closed_form_rank_128_64", (*CALIBRATE_RANK_128.args, "--samples", "64"), "base")
FINAL = Step("final", ("build", "--preset", "standard", "--data", C4, ALPACA))
# the standard preset's Stage 2 (with --steps 700), as `amoeba train` flags
STANDARD_STAGE_2 = ("--lr", "1e-3", "--lr-schedule", "cosine", "--max-prompt-tokens", "256",
                    "--max-response-tokens", "128")


def train(name: str, source: str, *extra: str) -> Step:
    """Stage 2 distilled from the frozen base model (the full shape stays the source model exactly)."""
    return Step(name, ("train", "--data", C4, ALPACA, "--teacher", "base", "--no-router-noise", "--batch-size", "2",
                       "--grad-accum", "1", "--save-steps", "10", *extra), source)


RECIPES: dict[str, tuple[Step, ...]] = {
    "no_recovery": (CALIBRATE_BI,),
    "bridges": (CALIBRATE_BRIDGES,),
    "compensation": (CALIBRATE_COMPENSATION,),
    "closed_form": (CALIBRATE_CLOSED_FORM,),
    "closed_form_rank_32": (CALIBRATE_STANDARD_CLOSED_FORM,),
    "closed_form_rank_64": (CALIBRATE_RANK_64,),
    "closed_form_rank_128": (CALIBRATE_RANK_128,),
    "closed_form_rank_128_64": (CALIBRATE_RANK_128_64,),
    "query_heads": (CALIBRATE_QH,),
    "query_heads_global": (CALIBRATE_QH_GLOBAL,),
    "reconstruction": (CALIBRATE_BI, Step("recon", ("reconstruct", "--data", C4, "--samples", "8", "--steps", "16",
                                                     "--batch-size", "2"), "cal_bi")),
    "kl_text": (CALIBRATE_BI, train("kl_text", "cal_bi", "--lr", "1e-3", "--steps", "30")),
    "kl_text_200": (CALIBRATE_BI, train("kl_text_200", "cal_bi", "--lr", "1e-3", "--steps", "200")),
    "kl_text_200_rank16": (CALIBRATE_BI, train("kl_text_200_rank16", "cal_bi", "--lr", "1e-3", "--steps", "200",
                                               "--rank", "16")),
    "query_heads_global_kl_200": (CALIBRATE_QH_GLOBAL, train("query_heads_global_kl_200", "cal_qh_global", "--lr", "1e-3",
                                                             "--steps", "200")),
    "final": (FINAL,),
    "final_closed_form": (CALIBRATE_STANDARD_CLOSED_FORM,
                          train("final_closed_form", "cal_closed_form", *STANDARD_STAGE_2, "--steps", "700")),
    "final_closed_form_trainable": (CALIBRATE_STANDARD_CLOSED_FORM,
                                    train("final_closed_form_trainable", "cal_closed_form", *STANDARD_STAGE_2,
                                          "--steps", "700", "--train-recovery")),
    "closed_form_100": (CALIBRATE_STANDARD_CLOSED_FORM,
                        train("closed_form_100", "cal_closed_form", *STANDARD_STAGE_2, "--steps", "100")),
    "closed_form_100_trainable": (CALIBRATE_STANDARD_CLOSED_FORM,
                                  train("closed_form_100_trainable", "cal_closed_form", *STANDARD_STAGE_2, "--steps",
                                        "100", "--train-recovery")),
    "stage_2_200": (CALIBRATE_BI, train("stage_2_200", "cal_bi", *STANDARD_STAGE_2, "--steps", "200")),
    "teacher_assistant_200": (CALIBRATE_BI, train("teacher_assistant_200", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                  "200", "--teacher-assistant")),
    "calibration_64_200": (CALIBRATE_BI_64, train("calibration_64_200", "cal_bi_64", *STANDARD_STAGE_2, "--steps",
                                                  "200")),
    "hardest_shapes_200": (CALIBRATE_BI, train("hardest_shapes_200", "cal_bi", *STANDARD_STAGE_2, "--steps", "200",
                                               "--shape-sampling", "loss")),
    # a later --lr overrides STANDARD_STAGE_2's 1e-3 (argparse keeps the last)
    "learning_rate_3e-3_200": (CALIBRATE_BI, train("learning_rate_3e-3_200", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                   "200", "--lr", "3e-3")),
    "learning_rate_5e-4_200": (CALIBRATE_BI, train("learning_rate_5e-4_200", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                   "200", "--lr", "5e-4")),
    "learning_rate_3e-3_700": (CALIBRATE_BI, train("learning_rate_3e-3_700", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                   "700", "--lr", "3e-3")),
    "stage_2_200_seed_1": (CALIBRATE_BI, train("stage_2_200_seed_1", "cal_bi", *STANDARD_STAGE_2, "--steps", "200",
                                               "--seed", "1")),
    "full_weights_1e-4_200": (CALIBRATE_BI, train("full_weights_1e-4_200", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                  "200", "--train-base", "--lr", "1e-4")),
    "full_weights_3e-4_200": (CALIBRATE_BI, train("full_weights_3e-4_200", "cal_bi", *STANDARD_STAGE_2, "--steps",
                                                  "200", "--train-base", "--lr", "3e-4")),
    # LoRA experts only for the CPU minutes of full_weights_3e-4_200 (64.5 / 0.153 CPU-min per step of stage_2_200)
    "stage_2_420": (CALIBRATE_BI, train("stage_2_420", "cal_bi", *STANDARD_STAGE_2, "--steps", "420")),
}
LABELS = {
    "no_recovery": "no recovery (block-influence depth, FLAP uniform widths, C4)",
    "bridges": "no recovery + depth bridges (a least-squares map per removed span, merged into down_proj; issue 22)",
    "compensation": "no recovery + width compensation (least-squares update of o_proj/down_proj's kept columns per "
                    "grid width, rank 32, ridge 1e-2, merged on export; issue 22)",
    "closed_form": "closed-form recovery, no gradient step: depth bridges + width compensation (issue 22)",
    "closed_form_rank_32": "closed-form recovery: bridges + width compensation at ridge 0.1, corrections of rank 32",
    "closed_form_rank_64": "closed_form_rank_32 with width corrections of rank 64",
    "closed_form_rank_128": "closed_form_rank_32 with width corrections of rank 128 (`amoeba calibrate`'s default)",
    "closed_form_rank_128_64": "closed_form_rank_128 calibrated on 64 x 256 C4 tokens instead of 16 x 256",
    "query_heads": "lever 1: query heads inside KV groups (uniform widths), no recovery",
    "query_heads_global": "lever 1: query heads inside KV groups, global widths (FLAP), no recovery",
    "reconstruction": "lever 2: local reconstruction (`amoeba reconstruct`, 8 C4 blocks, 16 steps per layer)",
    "kl_text": "lever 3: KL from the base on real text (C4 + Alpaca), lr 1e-3, 30 steps",
    "kl_text_200": "lever 3 with 200 steps",
    "kl_text_200_rank16": "lever 4 (capacity): lever 3 with 200 steps and experts of rank 16 instead of 8",
    "query_heads_global_kl_200": "levers 1 + 3: query-head widths (global), then lever 3 with 200 steps",
    "final": "final recipe: `amoeba build --preset standard` (KL from the base on C4 + Alpaca, 700 steps, cosine lr)",
    "final_closed_form": "closed-form recovery (bridges + width compensation, ridge 0.1, frozen), then the standard "
                         "preset's Stage 2 (700 steps)",
    "final_closed_form_trainable": "final_closed_form with the bridges and corrections trained too "
                                   "(--train-recovery)",
    "closed_form_100": "closed-form recovery, then 100 steps of the standard preset's Stage 2 (bridges and "
                       "corrections frozen)",
    "closed_form_100_trainable": "closed_form_100 with the bridges and corrections trained too (--train-recovery)",
    "stage_2_200": "the standard preset's Stage 2 with 200 steps (the reference of the sampling and order levers)",
    "teacher_assistant_200": "stage_2_200 with a teacher-assistant order: each student learns from the next larger "
                             "shape of its sandwich (--teacher-assistant)",
    "calibration_64_200": "stage_2_200 calibrated on 64 x 256 C4 tokens instead of 16 x 256",
    "hardest_shapes_200": "stage_2_200 with the random shapes drawn in proportion to their running KL from the "
                          "teacher (--shape-sampling loss)",
    "learning_rate_3e-3_200": "stage_2_200 with a peak learning rate of 3e-3 instead of 1e-3",
    "learning_rate_5e-4_200": "stage_2_200 with a peak learning rate of 5e-4 instead of 1e-3",
    "learning_rate_3e-3_700": "the standard preset's Stage 2 (700 steps) with a peak learning rate of 3e-3 "
                              "instead of 1e-3",
    "stage_2_200_seed_1": "stage_2_200 with seed 1 instead of 0 (data order, expert initialisation, shapes): the "
                          "seed noise of the 200-step comparisons",
    "full_weights_1e-4_200": "stage_2_200 training every weight (--train-base: the base weights too, distilled from "
                             "a frozen copy of the base; the full shape joins the sandwich), peak lr 1e-4",
    "full_weights_3e-4_200": "full_weights_1e-4_200 with a peak learning rate of 3e-4",
    "stage_2_420": "stage_2_200 with 420 steps: LoRA experts only for about the CPU minutes of "
                   "full_weights_3e-4_200",
}


def _children_cpu_seconds() -> float:
    """CPU time (user + system) of finished child processes: unlike wall time, not inflated by other jobs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(step: Step, work: Path, data_dir: Path, results: dict, save, threads: int) -> None:
    """Run `step` unless its folder holds a finished checkpoint; record its minutes."""
    out = work / step.name
    timings = results.setdefault("steps", {})
    if (out / "config.json").is_file() and step.name in timings:
        return
    args = [arg.format(data=data_dir) for arg in step.args]
    command = [sys.executable, "-m", "amoeba_hf.cli", args[0]]
    if step.source is not None:
        command.append(str(work / step.source))
    command += [*args[1:], "--out", str(out)]
    print("$", " ".join(command[2:]), flush=True)
    start, cpu_start = time.perf_counter(), _children_cpu_seconds()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    timings[step.name] = {"command": "amoeba " + " ".join(command[3:]), "minutes": (time.perf_counter() - start) / 60,
                          "cpu_minutes": (_children_cpu_seconds() - cpu_start) / 60}
    if args[0] == "build":  # count its calibration and fine-tuning, not conversion, data or its own evaluations
        seconds = json.loads((out / "build_report.json").read_text())["step_seconds"]
        timings[step.name].update(build_minutes=timings[step.name]["minutes"],
                                  minutes=(seconds["calibrate"] + seconds["train"]) / 60)
        timings[step.name]["build_cpu_minutes"] = timings[step.name].pop("cpu_minutes")
    save()


def recipe_minutes(recipe: str, results: dict, key: str = "minutes") -> float | None:
    """Wall-clock (or, with key="cpu_minutes", CPU) minutes of the recipe's steps; None if not recorded."""
    steps = [results["steps"][s.name] for s in RECIPES[recipe]]
    return sum(step[key] for step in steps) if all(key in step for step in steps) else None


def dev_perplexity(model, dev_ids: torch.Tensor, depth: int, width: float) -> float:
    with model.shaped(depth, width):
        return perplexity(model, dev_ids, window=512)["ppl"]


def candidate_shapes(model, target: float) -> list[tuple[int, float]]:
    """Per depth, the grid width whose total parameter ratio is nearest `target` (within 2.5 points)."""
    space = model.shape_space
    full = space.parameter_count(space.num_layers, 1.0)
    candidates = []
    for depth in space.depths:
        width = min(space.width_grid, key=lambda w: abs(space.parameter_count(depth, w) / full - target))
        if abs(space.parameter_count(depth, width) / full - target) <= 0.025:
            candidates.append((depth, width))
    return candidates


def pick_shapes(model, dev_ids: torch.Tensor, entry: dict, save) -> dict[str, list]:
    """Each size class's shape with the lowest development-set perplexity (never an evaluation set)."""
    picked = entry.setdefault("picked", {})
    scores = entry.setdefault("dev_candidates", {})
    for target in TARGETS:
        label = f"{target:.0%}"
        if label in picked:
            continue
        for depth, width in candidate_shapes(model, target):
            key = shape_key(depth, width)
            if key not in scores:
                scores[key] = dev_perplexity(model, dev_ids, depth, width)
                save()
        best = min(candidate_shapes(model, target), key=lambda s: scores[shape_key(*s)])
        picked[label] = list(best)
        save()
    return picked


def parameter_entry(model, depth: int, width: float) -> dict:
    """Total and non-embedding (body) parameters of a shape, and their ratios to the full model."""
    space, config = model.shape_space, model.config
    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    total, full = space.parameter_count(depth, width), space.parameter_count(space.num_layers, 1.0)
    return {"depth": depth, "width": width, "parameters": total, "total_ratio": total / full,
            "body_ratio": (total - embedding) / (full - embedding)}


def evaluate_recipe(recipe: str, args, results: dict, save, tokenizer, dev_ids: torch.Tensor) -> None:
    folder = args.work / RECIPES[recipe][-1].name
    entry = results["recipes"].setdefault(recipe, {"label": LABELS[recipe], "checkpoint": str(folder)})
    screened = args.dev_results.get("recipes", {}).get(recipe, {})
    if "picked" not in entry and screened.get("checkpoint") == str(folder):
        entry.update({key: screened[key] for key in ("picked", "dev_candidates", "shapes") if key in screened})
    entry["minutes"], entry["cpu_minutes"] = recipe_minutes(recipe, results), recipe_minutes(recipe, results, "cpu_minutes")
    model = AmoebaForCausalLM.from_pretrained(folder).eval()
    picked = pick_shapes(model, dev_ids, entry, save)
    shapes = [tuple(s) for s in picked.values()]
    if recipe == DENSE_ROW:
        shapes.insert(0, tuple(model.shape_space.full_shape))
    rows = entry.setdefault("shapes", {})
    for depth, width in shapes:
        row = rows.setdefault(shape_key(depth, width), parameter_entry(model, depth, width))
        if "dev_ppl" not in row:
            row["dev_ppl"] = dev_perplexity(model, dev_ids, depth, width)
            save()
    if args.protocol == "full":
        settings = eval_settings(args)
        out = args.work / f"eval_{recipe}.json"
        evaluate_shapes(model, tokenizer, shapes, ["wikitext2"], settings, model_name=str(folder), out=out)
        zero_shot_shapes = [s for s in shapes if s == tuple(model.shape_space.full_shape)]
        zero_shot_shapes += [tuple(picked[c]) for c in args.zero_shot_classes.split(",") if c]
        scores = evaluate_shapes(model, tokenizer, zero_shot_shapes, list(ZERO_SHOT), settings,
                                 model_name=str(folder), out=out)
        for key, scored in scores["shapes"].items():
            record_scores(rows[key], scored["tasks"])
        save()


def eval_settings(args) -> EvalSettings:
    """Issue 13's protocol: WikiText-2 (first 32,768 tokens, 512-token windows), zero-shot 200 items, seed 1234."""
    return EvalSettings(data_dir=str(args.data_dir), limit=200, seed=1234, ppl_window=PPL_WINDOW,
                        ppl_tokens=PPL_TOKENS)


def record_scores(row: dict, tasks: dict) -> None:
    """WikiText-2 perplexity and, when all were scored, the zero-shot accuracies, their mean and mean above chance."""
    row["wikitext2_ppl"] = tasks["wikitext2"]["ppl"]
    if all(t in tasks for t in ZERO_SHOT):
        row.update({task: tasks[task]["acc_norm"] for task in ZERO_SHOT})
        row["zero_shot_mean"] = sum(row[t] for t in ZERO_SHOT) / len(ZERO_SHOT)
        row["above_chance"] = sum(row[t] - CHANCE[t] for t in ZERO_SHOT) / len(ZERO_SHOT)


def masked_logits(model, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits at the positions of `mask` only, as the one-for-all trainer computes them."""
    hidden = model.get_decoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[mask]).float()


class SubnetDistiller(Trainer):
    """A stock `Trainer` distilling one exported subnet (peft LoRA) from the frozen base model: the per-shape
    baseline, with the one-for-all trainer's loss (KL at temperature 1, summed over labelled positions, per token)."""

    def __init__(self, *args, teacher: torch.nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mask = prediction_mask(inputs["labels"])
        with torch.no_grad():
            teacher = F.log_softmax(masked_logits(self.teacher, inputs, mask), dim=-1)
        student = F.log_softmax(masked_logits(model, inputs, mask), dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="sum") / mask.sum().clamp(min=1)


def cpu_seconds_per_step(trainer: SubnetDistiller) -> float:
    """CPU seconds per optimizer step of a short real run (data, teacher, student, optimizer), to size the budget."""
    start = time.process_time()
    trainer.train()
    return (time.process_time() - start) / trainer.args.max_steps


class CpuBudget(TrainerCallback):
    """Stops training once this process has used `seconds` of CPU since `start` (`time.process_time`)."""

    def __init__(self, seconds: float, start: float):
        self.seconds, self.start = seconds, start

    def on_step_end(self, args, state, control, **kwargs):
        if time.process_time() - self.start >= self.seconds:
            control.should_training_stop = True


def distillation_settings(args) -> FinetuneSettings:
    """The subnet baselines' Stage-2 settings: the standard preset's data, batch, learning rate and schedule."""
    return FinetuneSettings(data=[arg.format(data=args.data_dir) for arg in (C4, ALPACA)], batch_size=2, grad_accum=1,
                            learning_rate=1e-3, lr_schedule="cosine", distill_teacher="base", router_noise=False,
                            save_steps=25)


def subnet_distiller(student: torch.nn.Module, teacher: torch.nn.Module, dataset, tokenizer,
                     settings: FinetuneSettings, steps: int, output: Path) -> SubnetDistiller:
    return SubnetDistiller(
        model=student, teacher=teacher, train_dataset=dataset, processing_class=tokenizer,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True),
        args=settings.training_arguments(output, max_steps=steps, use_cpu=True, remove_unused_columns=False))


def frozen_base(args) -> torch.nn.Module:
    """The teacher of the subnet baselines: the source model, plain and frozen."""
    return AmoebaForCausalLM.from_pretrained(args.work / "base").export_subnet().eval().requires_grad_(False)


def score_subnet(folder: Path, label: str, row: dict, args, tokenizer) -> None:
    """Scores the plain model saved in `folder / "model"` like the recipes' shapes (zero-shot for the classes asked)."""
    plain = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    model = AmoebaForCausalLM.from_llama(plain).eval()
    tasks = ["wikitext2", *(ZERO_SHOT if label in args.zero_shot_classes.split(",") else ())]
    scores = evaluate_shapes(model, tokenizer, [tuple(model.shape_space.full_shape)], tasks, eval_settings(args),
                             model_name=str(folder / "model"), out=folder / "eval.json")
    (scored,) = scores["shapes"].values()
    record_scores(row, scored["tasks"])


def distil_subnets(args, results: dict, save, tokenizer, name: str, label: str, recipe: str, source, train) -> dict:
    """The subnet baselines' loop over the size classes of `recipe` (its development-set picks): `train(depth, width,
    folder, row, cpu_start)` writes the class's plain model to `folder / "model"` unless it is there; its minutes are
    recorded and it is scored like the recipes. Returns the results entry `name`."""
    entry = results["recipes"].setdefault(name, {"label": label, "checkpoint": str(args.work / name)})
    entry["picked"] = results["recipes"][recipe]["picked"]
    rows = entry.setdefault("shapes", {})
    for size_class, (depth, width) in entry["picked"].items():
        key = shape_key(depth, width)
        folder = args.work / name / key
        row = rows.setdefault(key, {**parameter_entry(source, depth, width), "class": size_class})
        if "wikitext2_ppl" in row:
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        if not (folder / "model" / "config.json").is_file():
            train(depth, width, folder, row, cpu_start)
            row["train_minutes"] = (time.perf_counter() - start) / 60
            row["train_cpu_minutes"] = (time.process_time() - cpu_start) / 60
            save()
        score_subnet(folder, size_class, row, args, tokenizer)
        save()
    entry["minutes"] = sum(row.get("train_minutes", 0.0) for row in rows.values())
    entry["cpu_minutes"] = sum(row.get("train_cpu_minutes", 0.0) for row in rows.values())
    return entry


def per_shape_distillation(args, results: dict, save, tokenizer) -> None:
    """Issue 22's equal-cost baseline: each size class's shape of `args.per_shape_of` (picked on the development
    set), exported from that recipe's calibrated checkpoint as a plain model and distilled alone from the base with
    LoRA (same data, rank, learning rate and schedule, batch and sequence lengths), for a third of that recipe's
    Stage-2 CPU minutes each: the schedule's length comes from a timed probe, and training stops when the class's
    CPU time (probe included) reaches its third. Scored like the recipes, at its full shape."""
    recipe = args.per_shape_of
    calibrated, stage_2 = RECIPES[recipe][0].name, RECIPES[recipe][-1].name
    budget = results["steps"][stage_2]["cpu_minutes"] * 60 / len(TARGETS)
    settings = distillation_settings(args)
    source = AmoebaForCausalLM.from_pretrained(args.work / calibrated)
    teacher = frozen_base(args)
    dataset = build_dataset(settings.data, tokenizer, settings)
    lora = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=list(SMOL_TARGETS))

    def train(depth: int, width: float, folder: Path, row: dict, cpu_start: float) -> None:
        def distiller(steps: int, output: Path) -> SubnetDistiller:
            torch.manual_seed(settings.seed)
            student = get_peft_model(source.export_subnet(depth, width), lora)
            return subnet_distiller(student, teacher, dataset, tokenizer, settings, steps, output)

        if "steps" not in row:
            row["probe_cpu_seconds_per_step"] = cpu_seconds_per_step(distiller(PROBE_STEPS, folder / "probe"))
            row["steps"] = max(1, round(budget / (row["probe_cpu_seconds_per_step"] * PROBE_UNDERCOUNT)) - PROBE_STEPS)
            save()
        trainer = distiller(row["steps"], folder / "checkpoints")
        trainer.add_callback(CpuBudget(budget, cpu_start))
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder / "checkpoints"))
        row["steps_done"] = trainer.state.global_step
        trainer.model.merge_and_unload().save_pretrained(folder / "model")

    label = (f"per-shape distillation of each class alone (plain LoRA subnet from {calibrated}, KL from the base, "
             f"C4 + Alpaca), a third of {recipe}'s Stage-2 CPU minutes each")
    entry = distil_subnets(args, results, save, tokenizer, "per_shape", label, recipe, source, train)
    entry["budget_cpu_minutes"] = budget * len(TARGETS) / 60
    save()


def norm_scales_bound(args, results: dict, save, tokenizer) -> None:
    """Issue 22's per-shape norm scales, bounded from above: each size class's shape of `args.norm_scales_of`,
    exported from that recipe's trained checkpoint, with only its RMSNorm weights distilled from the base for
    NORM_STEPS more steps (same settings as the per-shape baseline). One-for-all training would keep such scales
    per grid width, shared by every depth and trained only when a shape of that width is drawn: they would get
    less than tuning them for one shape alone."""
    recipe = args.norm_scales_of
    settings = distillation_settings(args)
    source = AmoebaForCausalLM.from_pretrained(args.work / RECIPES[recipe][-1].name)
    teacher = frozen_base(args)
    dataset = build_dataset(settings.data, tokenizer, settings)

    def train(depth: int, width: float, folder: Path, row: dict, cpu_start: float) -> None:
        student = source.export_subnet(depth, width)
        for parameter_name, parameter in student.named_parameters():
            parameter.requires_grad_(parameter_name.endswith("norm.weight"))
        row["trained_parameters"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
        trainer = subnet_distiller(student, teacher, dataset, tokenizer, settings, NORM_STEPS, folder / "checkpoints")
        trainer.train(resume_from_checkpoint=last_complete_checkpoint(folder / "checkpoints"))
        student.save_pretrained(folder / "model")

    label = (f"{recipe}, then per-shape RMSNorm weights only, {NORM_STEPS} steps of KL from the base per class (an "
             "upper bound on per-width norm scales)")
    distil_subnets(args, results, save, tokenizer, f"norm_scales_{recipe}", label, recipe, source, train)
    save()


def quantized_dense(args, results: dict, save, tokenizer) -> None:
    """What a user would deploy instead of a shape: the dense model quantized the llama.cpp way (GGUF q8_0 and f16,
    written by `write_gguf`, read back by transformers' GGUF loader), on the same WikiText-2 tokens."""
    if "quantized_dense" in results:
        return
    model = AmoebaForCausalLM.from_pretrained(args.work / "base").eval()
    dense = model.export_subnet(*model.shape_space.full_shape).eval()
    text = (args.data_dir / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:PPL_TOKENS])
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for dtype in ("f16", "q8_0"):
            path = write_gguf(dense, tokenizer, Path(folder) / f"dense-{dtype}.gguf", dtype=dtype)
            reloaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
            rows[dtype] = {"wikitext2_ppl": perplexity(reloaded, ids, window=PPL_WINDOW)["ppl"],
                           "megabytes": path.stat().st_size / 1e6}
    results["quantized_dense"] = rows
    save()


def format_table(results: dict) -> str:
    lines = ["| recipe | minutes (wall / CPU) | shape | total / body params | dev ppl | WikiText-2 ppl | ARC-E | HellaSwag | PIQA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for recipe, entry in results["recipes"].items():
        for key, row in entry.get("shapes", {}).items():
            cells = [f"{row[m]:.2f}" if m in row else "–" for m in ("dev_ppl", "wikitext2_ppl")]
            cells += [f"{row[t]:.3f}" if t in row else "–" for t in ZERO_SHOT]
            cpu = "–" if entry.get("cpu_minutes") is None else f"{entry['cpu_minutes']:.1f}"
            lines.append(f"| {recipe} | {entry['minutes']:.1f} / {cpu} | {key} | {row['total_ratio']:.1%} / "
                         f"{row['body_ratio']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    metric = "wikitext2_ppl" if results["protocol"] == "full" else "dev_ppl"
    with png_figure(path) as (_, (axis,)):
        for index, (recipe, entry) in enumerate(results["recipes"].items()):
            rows = sorted((r["total_ratio"], r[metric]) for r in entry.get("shapes", {}).values() if metric in r)
            if rows:  # past ten recipes the colours repeat: the line style tells them apart
                axis.plot(*zip(*rows), marker="o", linestyle=("-", "--", ":")[index // 10 % 3], label=recipe)
        axis.set_yscale("log")
        axis.set_xlabel("total parameters kept")
        axis.set_ylabel("WikiText-2 perplexity" if metric == "wikitext2_ppl" else "dev perplexity (Wikipedia)")
        axis.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--protocol", choices=("dev", "full"), default="full")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent.parent / "shared" / "data")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "quality")
    parser.add_argument("--dev-tokens", type=int, default=4096, help="development-set tokens scored per shape")
    parser.add_argument("--zero-shot-classes", default="80%",
                        help="size classes scored zero-shot besides the dense model (comma list of 80%%,65%%,50%%)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of this process and of its steps (1 each when two jobs share 2 cores)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/shape_quality[_dev].json")
    parser.add_argument("--per-shape-of", choices=tuple(RECIPES), default=None,
                        help="full protocol: also run the equal-cost per-shape distillation baseline of this recipe "
                             "(its shapes, calibrated checkpoint and Stage-2 CPU minutes)")
    parser.add_argument("--norm-scales-of", choices=tuple(RECIPES), default=None,
                        help="full protocol: also bound per-shape norm scales from above on this trained recipe's "
                             "shapes (their RMSNorm weights distilled alone)")
    parser.add_argument("--quantized-dense", action="store_true",
                        help="full protocol: also score the dense model as GGUF q8_0 / f16, the alternative to a shape")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    out = args.out or ROOT / "results" / ("shape_quality.json" if args.protocol == "full" else "shape_quality_dev.json")
    args.work.mkdir(parents=True, exist_ok=True)
    dev_out = ROOT / "results" / "shape_quality_dev.json"
    args.dev_results = json.loads(dev_out.read_text()) if args.protocol == "full" and dev_out.is_file() else {}
    results = json.loads(out.read_text()) if out.is_file() else {"protocol": args.protocol, "recipes": {}}
    results["steps"] = {**json.loads((args.work / "steps.json").read_text()), **results.get("steps", {})} \
        if (args.work / "steps.json").is_file() else results.get("steps", {})

    def save() -> None:
        """Write the results, merging the step timings another run of the script recorded meanwhile."""
        steps_file = args.work / "steps.json"
        on_disk = json.loads(steps_file.read_text()) if steps_file.is_file() else {}
        results["steps"] = {**on_disk, **results["steps"]}
        write_text_atomically(out, json.dumps(results, indent=2) + "\n")
        write_text_atomically(args.work / "steps.json", json.dumps(results["steps"], indent=2) + "\n")

    torch.set_num_threads(args.threads)
    for recipe in recipes:
        for step in (CONVERT, *RECIPES[recipe]) if RECIPES[recipe][0].source else RECIPES[recipe]:
            run_step(step, args.work, args.data_dir, results, save, args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.work / "base")
    dev_text = (args.data_dir / DEV_TEXT).read_text(encoding="utf-8")
    dev_ids = torch.tensor(tokenizer(dev_text, add_special_tokens=False)["input_ids"][: args.dev_tokens])
    for recipe in recipes:
        evaluate_recipe(recipe, args, results, save, tokenizer, dev_ids)
    if args.per_shape_of and args.protocol == "full":
        per_shape_distillation(args, results, save, tokenizer)
    if args.norm_scales_of and args.protocol == "full":
        norm_scales_bound(args, results, save, tokenizer)
    if args.quantized_dense and args.protocol == "full":
        quantized_dense(args, results, save, tokenizer)
    plot(results, out.with_suffix(".png"))
    print(format_table(results))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
