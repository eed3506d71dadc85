"""Cross-check amoeba_hf's zero-shot scoring against lm-evaluation-harness on the same ARC-Easy and PIQA items.

Ours: an Amoeba checkpoint at its full shape, scored by `amoeba_hf.evaluation.scoring` (the code behind `amoeba eval`).
Harness: lm-eval's stock `hf` model on a plain reference model that shares the weights (default: the original
SmolLM2-135M-Instruct GGUF, loaded by transformers without any amoeba_hf code), with the harness's own `arc_easy`
and `piqa` task definitions (`include`d) pointed at local JSONL files that hold exactly our seeded subset.

    python benchmarks/crosscheck_lm_eval.py /tmp/sm_eval --data-dir ../shared/data --limit 200 \
        --out runs/eval/crosscheck.json

Prints a table (accuracy from both, difference in points, per-item agreement, largest log-likelihood gap) and
exits with status 1 if an accuracy differs by more than --tolerance points. It also has the harness render MMLU
0-shot and 5-shot prompts (its own template, its `dummy` model) for a few subjects and compares them with ours.
"""

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # set before the imports below: everything here is local

import lm_eval
import torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from amoeba_hf.evaluation.scoring import choice_predictions, continuation_logprobs, encode_task
from amoeba_hf.evaluation.tasks import load_task, seeded_subset
from amoeba_hf.pipeline.sources import split_source

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
MMLU_SUBJECTS = ["abstract_algebra", "high_school_european_history", "moral_scenarios", "world_religions"]
TASKS = {
    "arc_easy": {"include": "arc/arc_easy.yaml", "split": "test", "files": ("arc_easy/test.jsonl",)},
    "piqa": {
        "include": "piqa/piqa.yaml", "split": "validation", "files": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    },
}


def subset_records(task: str, data_dir: Path, limit: int, seed: int) -> list[dict]:
    """The raw records behind `load_task(task, limit=limit, seed=seed)`, PIQA's labels merged in as `label`."""
    lines = (data_dir / TASKS[task]["files"][0]).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    if task == "piqa":
        labels = (data_dir / TASKS[task]["files"][1]).read_text(encoding="utf-8").split()
        records = [{**record, "label": int(label)} for record, label in zip(records, labels, strict=True)]
    return seeded_subset(records, limit, seed)


def harness_task_yaml(task: str, data_file: Path) -> str:
    """The harness's own task definition, with its dataset replaced by a local JSON-lines file."""
    split = TASKS[task]["split"]
    return (
        f"include: {HARNESS_TASKS / TASKS[task]['include']}\n"
        f"task: {task}_local\ntag: []\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data_file}\n"
        f"training_split: null\nvalidation_split: {split if split == 'validation' else 'null'}\n"
        f"test_split: {split if split == 'test' else 'null'}\n"
    )


def mmlu_prompts_identical(data_dir: Path, subjects: list[str], per_subject: int, folder: Path) -> dict[str, list]:
    """(identical, compared) prompt counts per shot count: the harness renders MMLU prompts from its own template."""
    for subject in subjects:
        for split in ("test", "dev"):
            with open(data_dir / "mmlu" / split / f"{subject}_{split}.csv", encoding="utf-8", newline="") as handle:
                rows = [{"question": r["question"], "choices": [r[f"choice{i}"] for i in range(4)],
                         "answer": int(r["answer"])} for r in csv.DictReader(handle)]
            (folder / f"mmlu_{subject}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}."
        (folder / f"mmlu_{subject}_local.yaml").write_text(
            f"include: {HARNESS_TASKS / 'mmlu' / 'default' / '_default_template_yaml'}\n"
            f"task: mmlu_{subject}_local\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    test: {folder / f'mmlu_{subject}_test.jsonl'}\n"
            f"    dev: {folder / f'mmlu_{subject}_dev.jsonl'}\n"
            f"description: {json.dumps(description + chr(10) + chr(10))}\n"
        )
    counts = {}
    for shots in (0, 5):
        output = lm_eval.simple_evaluate(
            model="dummy", tasks=[f"mmlu_{s}_local" for s in subjects], num_fewshot=shots, limit=per_subject,
            log_samples=True, task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        )
        ours = load_task(f"mmlu_{shots}shot", data_dir)
        same = [sample["arguments"][0][0] == ours.subjects[s][sample["doc_id"]].context
                for s in subjects for sample in output["samples"][f"mmlu_{s}_local"]]
        counts[f"{shots}shot"] = [sum(same), len(same)]
    return counts


def score_ours(model, tokenizer, task: str, data_dir: Path, limit: int, seed: int, batch_size: int) -> dict:
    """Per-item log-likelihoods and (acc, acc_norm) predictions from amoeba_hf's evaluator."""
    loaded = load_task(task, data_dir, limit=limit, seed=seed)
    start = time.perf_counter()
    logprobs = continuation_logprobs(model, encode_task(loaded, tokenizer).requests[""], batch_size=batch_size)
    seconds = time.perf_counter() - start
    per_item, offset = [], 0
    for item in loaded.items:
        scores = logprobs[offset : offset + len(item.choices)]
        offset += len(item.choices)
        per_item.append({"loglik": scores, "pred": choice_predictions(item, scores), "label": item.label})
    return {"items": per_item, "seconds": seconds}


def score_harness(reference: str, tasks: list[str], task_dir: Path, batch_size: int) -> tuple[dict, float]:
    location, gguf_file = split_source(reference)
    model_args = {"pretrained": location, "device": "cpu", "dtype": "float32", "batch_size": batch_size}
    if gguf_file is not None:
        model_args["gguf_file"] = gguf_file
    start = time.perf_counter()
    output = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=[f"{t}_local" for t in tasks], log_samples=True,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
    )
    return output, time.perf_counter() - start


def compare(task: str, ours: dict, harness: dict) -> dict:
    samples = sorted(harness["samples"][f"{task}_local"], key=lambda s: s["doc_id"])
    metrics = harness["results"][f"{task}_local"]
    n = len(ours["items"])
    if len(samples) != n:
        raise RuntimeError(f"{task}: the harness scored {len(samples)} items, we scored {n}")
    gaps, agree, agree_norm = [], 0, 0
    for item, sample in zip(ours["items"], samples):
        harness_loglik = [float(r[0][0]) for r in sample["resps"]]
        gaps += [abs(a - b) for a, b in zip(item["loglik"], harness_loglik)]
        agree += sample["acc"] == float(item["pred"][0] == item["label"])
        agree_norm += sample["acc_norm"] == float(item["pred"][1] == item["label"])
    acc = sum(i["pred"][0] == i["label"] for i in ours["items"]) / n
    acc_norm = sum(i["pred"][1] == i["label"] for i in ours["items"]) / n
    return {
        "items": n,
        "ours": {"acc": acc, "acc_norm": acc_norm, "seconds": round(ours["seconds"], 1)},
        "harness": {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]},
        "diff_points": {
            "acc": 100 * (acc - metrics["acc,none"]), "acc_norm": 100 * (acc_norm - metrics["acc_norm,none"]),
        },
        "items_agreeing": {"acc": agree, "acc_norm": agree_norm},
        "max_loglik_gap": max(gaps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="Amoeba checkpoint folder (scored at its full shape by amoeba_hf)")
    parser.add_argument("--reference", default=None,
                        help="plain model with the same weights for the harness: folder, Hub id or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest accepted accuracy gap in points")
    parser.add_argument("--out", type=Path, default=None, help="write the comparison as JSON")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; this cross-check knows {sorted(TASKS)}")

    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32).eval()
    model.set_shape(model.shape_space.num_layers, 1.0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ours = {t: score_ours(model, tokenizer, t, args.data_dir, args.limit, args.seed, args.batch_size) for t in tasks}
    del model
    with tempfile.TemporaryDirectory() as folder:
        task_dir = Path(folder)
        for task in tasks:
            data_file = task_dir / f"{task}.jsonl"
            records = subset_records(task, args.data_dir, args.limit, args.seed)
            data_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            (task_dir / f"{task}_local.yaml").write_text(harness_task_yaml(task, data_file), encoding="utf-8")
        harness, harness_seconds = score_harness(args.reference, tasks, task_dir, args.batch_size)
        mmlu_prompts = mmlu_prompts_identical(args.data_dir, MMLU_SUBJECTS, 3, task_dir)

    report = {
        "model": args.model, "reference": args.reference or "embedded SmolLM2-135M-Instruct GGUF",
        "lm_eval_version": lm_eval.__version__, "limit": args.limit, "seed": args.seed,
        "harness_seconds": round(harness_seconds, 1), "tasks": {t: compare(t, ours[t], harness) for t in tasks},
        "mmlu_prompts_identical": mmlu_prompts,
    }
    print(f"{'task':<9} {'metric':<8} {'ours':>6} {'lm-eval':>8} {'diff':>6} {'agree':>9} {'max |dLL|':>10}")
    for task, row in report["tasks"].items():
        for metric in ("acc", "acc_norm"):
            print(f"{task:<9} {metric:<8} {100 * row['ours'][metric]:>6.1f} {100 * row['harness'][metric]:>8.1f} "
                  f"{row['diff_points'][metric]:>+6.2f} {row['items_agreeing'][metric]:>4}/{row['items']:<4} "
                  f"{row['max_loglik_gap']:>10.2e}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for shots, (same, compared) in mmlu_prompts.items():
        print(f"MMLU {shots} prompts identical to the harness's: {same}/{compared} ({len(MMLU_SUBJECTS)} subjects)")
    worst = max(abs(d) for row in report["tasks"].values() for d in row["diff_points"].values())
    print(f"largest accuracy gap: {worst:.2f} points (tolerance {args.tolerance})")
    prompts_ok = all(same == compared for same, compared in mmlu_prompts.values())
    return 0 if worst <= args.tolerance and prompts_ok else 1


if __name__ == "__main__":
    sys.exit(main())
