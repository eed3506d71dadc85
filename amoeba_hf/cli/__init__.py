"""The `amoeba` command line: one tool, one subcommand per job, one-line errors for user mistakes."""

import argparse
import sys
import tempfile
import traceback
from collections.abc import Callable

from ..modeling.atomic_io import atomic_directory, ensure_free_output_dir

EXAMPLES = {
    "convert": "amoeba convert --out smollm2-amoeba            # embedded SmolLM2-135M-Instruct\n"
    "  amoeba convert TinyLlama/TinyLlama-1.1B-Chat-v1.0 --out tinyllama-amoeba --min-depth 14",
    "build": "amoeba build --preset quick --out smollm2-any-shape          # embedded SmolLM2, offline\n"
    "  amoeba build --model HuggingFaceTB/SmolLM2-360M-Instruct --data alpaca.json --preset standard --out smol360",
    "shapes": "amoeba shapes smollm2-amoeba",
    "train": "amoeba train smollm2-calibrated --data ../shared/data/finetune/alpaca_en_demo.json --steps 200 "
    "--out smollm2-oneforall\n"
    "  amoeba train smollm2-calibrated --data alpaca.json wiki.txt --experts 1 --no-balancing --out ablation",
    "calibrate": "amoeba calibrate smollm2-amoeba --data ../shared/data/calibration/c4_demo.jsonl --min-depth 18 "
    "--widths 1,0.875,0.75,0.625,0.5 --score ppl --out smollm2-calibrated\n"
    "  amoeba calibrate --data wiki.txt --score mmlu --mc-data mmlu/zero_shot_val.jsonl --out smollm2-mmlu-dp",
    "generate": 'amoeba generate smollm2-amoeba --depth 24 --width 0.75 --prompt "The capital of France is"',
    "export": "amoeba export smollm2-amoeba --depth 24 --width 0.75 --out smollm2-d24-w075\n"
    "  amoeba export your-name/smollm2-amoeba --depth 24 --width 0.75 --push your-name/smollm2-d24-w075",
    "push": "amoeba push smollm2-amoeba your-name/smollm2-amoeba --private\n"
    "  amoeba push smollm2-amoeba your-name/smollm2-amoeba --revision stage2 --exist-ok",
    "eval": "amoeba eval smollm2-amoeba --shapes 30x1,24x0.75 --tasks wikitext2,arc_easy,piqa --data-dir ../shared/data "
    "--limit 200 --out results.json\n"
    "  amoeba eval smollm2-amoeba --shapes grid --tasks hellaswag,mmlu --data-dir data --limit 100 --mmlu-limit 5 --out grid.json",
    "profile": "amoeba profile smollm2-amoeba --shapes 30x1,24x1,30x0.75 --batch-sizes 1,8 --threads 2",
    "search": "amoeba search smollm2-amoeba --results results.json --max-latency-ms 30 --export smollm2-30ms\n"
    "  amoeba search smollm2-amoeba --data-dir ../shared/data --shapes 30x1,24x1,30x0.75 --max-memory-gb 0.4 "
    "--min-tokens-per-s 40",
}


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


def _load_checkpoint(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def _cmd_convert(args: argparse.Namespace) -> None:
    from ..pipeline.sources import convert_source, load_tokenizer

    ensure_free_output_dir(args.out)
    model = convert_source(args.model, min_depth=args.min_depth, min_width=args.min_width)
    tokenizer = load_tokenizer(args.model)
    with atomic_directory(args.out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    print(f"saved any-shape checkpoint to {args.out} ({model.num_parameters():,} parameters, "
          f"depths {model.shape_space.min_depth}..{model.shape_space.num_layers}, widths "
          f"[{model.shape_space.min_width}, 1])")


def _cmd_shapes(args: argparse.Namespace) -> None:
    model = _load_checkpoint(args.model_dir)
    space = model.shape_space
    full = space.parameter_count(space.num_layers, 1.0)
    print(f"{'depth':>5} {'width':>6} {'parameters':>12} {'ratio':>6}  layers")
    for depth, width in space.grid():
        count = space.parameter_count(depth, width)
        layers = ",".join(map(str, space.kept_layers(depth)))
        print(f"{depth:>5} {width:>6.3f} {count:>12,} {count / full:>6.1%}  {layers}")
    print(f"width is continuous in [{space.min_width}, 1] ({space.width_mode} mode); grid shown")


def _cmd_generate(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    model = _load_checkpoint(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    model.set_shape(args.depth, args.width)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))


def _cmd_export(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    if args.push is None and (args.private or args.revision or args.exist_ok):
        raise UserError("--private, --revision and --exist-ok apply only with --push REPO_ID")
    if args.out is not None:
        ensure_free_output_dir(args.out)
    model = _load_checkpoint(args.model_dir)
    subnet = model.export_subnet(args.depth, args.width)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    description = f"{type(subnet).__name__} ({subnet.num_parameters():,} parameters)"
    if args.out is not None:
        with atomic_directory(args.out) as staging:
            subnet.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        print(f"exported {description} to {args.out}")
        return
    with tempfile.TemporaryDirectory() as staging:
        subnet.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        commit = _push(staging, args, f"Upload subnet depth={args.depth} width={args.width:g} of {args.model_dir}")
    print(f"exported {description} to {_pushed_to(commit, args)}")


def _push(folder: str, args: argparse.Namespace, commit_message: str | None = None):
    from ..modeling.hub import push_folder

    return push_folder(
        folder,
        args.push,
        private=True if args.private else None,
        revision=args.revision,
        exist_ok=args.exist_ok,
        commit_message=commit_message,
    )


def _pushed_to(commit, args: argparse.Namespace) -> str:
    return f"{commit.repo_url} (revision {args.revision or 'main'}, commit {commit.oid[:10]})"


def _cmd_push(args: argparse.Namespace) -> None:
    commit = _push(args.model_dir, args)
    print(f"pushed {args.model_dir} to {_pushed_to(commit, args)}")


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private (ignored if it exists)")
    parser.add_argument("--revision", default=None, help="branch to push to, created from main if missing")
    parser.add_argument("--exist-ok", action="store_true", help="allow a new commit to a repo that already exists")


def _cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..evaluation.report import format_table, plot_frontier, write_csv
    from ..evaluation.runner import EvalSettings, evaluate_shapes, parse_shapes

    if not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    out = Path(args.out)
    settings = EvalSettings(args.data_dir, args.limit, args.mmlu_limit, args.seed, args.ppl_window, args.ppl_stride,
                            args.ppl_tokens)
    model = _load_checkpoint(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    shapes = parse_shapes(args.shapes, model.shape_space)
    results = evaluate_shapes(model, tokenizer, shapes, args.tasks.split(","), settings, model_name=args.model_dir,
                              out=out, batch_size=args.batch_size)
    write_csv(results, out.with_suffix(".csv"))
    plot_frontier(results, out.with_suffix(".png"))
    print(format_table(results))
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


def _parse_widths(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--widths must be comma-separated numbers in (0, 1], got {text!r}") from None


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import json
    import shutil
    from dataclasses import asdict
    from pathlib import Path

    from ..pipeline.sources import load_or_convert
    from ..selection.calibrate import CalibrationSettings, calibrate

    out = ensure_free_output_dir(args.out)
    settings = CalibrationSettings(
        data=args.data, samples=args.samples, seq_len=args.seq_len, score=args.score, mc_data=args.mc_data,
        min_depth=args.min_depth, keep_last=args.keep_last, keep_first=args.keep_first,
        depth_method=args.depth_method, width_method=args.width_method, width_mode=args.width_mode,
        bias_compensation=not args.no_bias_compensation, widths=_parse_widths(args.widths) if args.widths else None,
        seed=args.seed,
    )
    settings.validate()
    model, tokenizer = load_or_convert(args.model, min_depth=args.min_depth)
    settings.validate(model.config.num_hidden_layers)
    state_dir = out.parent / f".{out.name}.calibrate-state"
    report = calibrate(model, tokenizer, settings, state_dir=state_dir)
    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (Path(staging) / "calibration.json").write_text(json.dumps({"settings": asdict(settings), **asdict(report)}, indent=2))
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"calibrated checkpoint written to {out}: {report.evaluations} DP evaluations, "
          f"{report.layer_forwards} layer-forwards, depth {report.depth_seconds:.0f} s, width {report.width_seconds:.0f} s")


def _cmd_train(args: argparse.Namespace) -> None:
    import shutil

    from ..pipeline.sources import load_or_convert
    from ..training.finetune import FinetuneSettings, check_data, finetune

    if args.teacher == "base" and (args.no_distillation or args.train_base):
        raise UserError("--teacher base distils from the frozen base model; it cannot be combined with "
                        "--no-distillation or --train-base")
    out = ensure_free_output_dir(args.out)
    settings = FinetuneSettings(
        data=args.data, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.lr, max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens,
        experts=args.experts, top_k=args.top_k, rank=args.rank, random_shapes=args.random_shapes,
        widths=_parse_widths(args.widths) if args.widths else None, distillation=not args.no_distillation,
        distill_teacher=args.teacher,
        loss_balancing=not args.no_balancing, router_noise=not args.no_router_noise, train_base=args.train_base,
        save_steps=args.save_steps, seed=args.seed,
    )
    check_data(settings.data)
    model, tokenizer = load_or_convert(args.model_dir)
    work_dir = out.parent / f".{out.name}.train-work"
    trainer = finetune(model, tokenizer, settings, work_dir)
    if not trainer.is_world_process_zero():
        return
    with atomic_directory(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"one-for-all checkpoint written to {out} ({settings.steps} steps, {model.config.smol_experts} experts)")


def _cmd_build(args: argparse.Namespace) -> None:
    from ..pipeline.build import build, format_report

    overrides = {key: value for key, value in (("steps", args.steps), ("generated_tokens", args.generated_tokens))
                 if value is not None}
    report = build(args.model, args.out, preset=args.preset, data=args.data, eval_data=args.eval_data,
                   min_depth=args.min_depth, seed=args.seed, overrides=overrides)
    print(format_report(report))
    print(f"checkpoint: {args.out} (frontier plot: {args.out}/frontier.png, log: {args.out}/build.log); "
          f"total {report['seconds'] / 60:.1f} min")


def _report_progress(message: str) -> None:
    print(f"amoeba: {message}", file=sys.stderr)


def _parse_ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} must be comma-separated integers, got {text!r}") from None


def _parse_count(text: str) -> int:
    """A parameter count such as 90000000, 90M or 1.5B."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise UserError(f"--max-params must be a count like 90000000, 90M or 1.5B, got {text!r}") from None


def _profile_settings(args: argparse.Namespace):
    from ..deploy.profile import ProfileSettings

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    return ProfileSettings(_parse_ints(args.prompt_lengths, "--prompt-lengths"),
                           _parse_ints(args.batch_sizes, "--batch-sizes"), args.new_tokens)


def _load_for_profiling(args: argparse.Namespace):
    """The checkpoint in the dtype, on the device and with the CPU threads that its measurements are keyed by."""
    import torch
    from transformers import AutoModelForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True, dtype=dtype)
    return model.to(device).eval()


def _cmd_profile(args: argparse.Namespace) -> None:
    from ..deploy.profile import format_profile, profile_checkpoint
    from ..evaluation.runner import parse_shapes

    settings = _profile_settings(args)
    model = _load_for_profiling(args)
    shapes = parse_shapes(args.shapes, model.shape_space)
    modes = args.modes.split(",")
    profile = profile_checkpoint(model, args.model_dir, shapes, settings, modes=modes, repeats=args.repeats,
                                 progress=_report_progress)
    print(format_profile(profile, model.shape_space, shapes, modes))


def _cmd_search(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..deploy.search import (
        FRONTIER_FILE,
        Budget,
        format_search,
        plot_search,
        quick_quality,
        search_checkpoint,
        stored_quality,
    )
    from ..evaluation.runner import parse_shapes

    max_params = None if args.max_params is None else _parse_count(args.max_params)
    budget = Budget(args.max_latency_ms, args.min_tokens_per_s, args.max_memory_gb, max_params)
    budget.validate()
    settings = _profile_settings(args)
    if args.batch_size not in settings.batch_sizes:
        raise UserError(f"--batch-size {args.batch_size} must be one of the profiled --batch-sizes {args.batch_sizes}")
    if args.results is None and args.data_dir is None:
        raise UserError("no quality source: pass --results FILE (from amoeba eval --out) or --data-dir DIR for a "
                        "quick evaluation")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    if args.export is not None:
        ensure_free_output_dir(args.export)
    quality = stored_quality(args.results, args.metric) if args.results is not None else None
    model = _load_for_profiling(args)
    tokenizer = None
    if quality is None or args.export is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    if quality is None:
        shapes = parse_shapes(args.shapes, model.shape_space)
        quality = quick_quality(model, tokenizer, args.model_dir, shapes, args.metric or "wikitext2", args.data_dir)
    result = search_checkpoint(model, args.model_dir, budget, quality, settings=settings, mode=args.mode,
                               batch_size=args.batch_size, repeats=args.repeats, progress=_report_progress)
    print(format_search(result))
    plot = Path(args.plot) if args.plot is not None else Path(args.model_dir) / FRONTIER_FILE
    plot_search(result, plot)
    print(f"frontier plot: {plot}")
    if args.export is not None:
        subnet = model.export_subnet(result.best.depth, result.best.width)
        with atomic_directory(args.export) as staging:
            subnet.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        print(f"exported {type(subnet).__name__} ({subnet.num_parameters():,} parameters) to {args.export}")


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-lengths", default="128", help="prefill lengths in tokens (default: 128)")
    parser.add_argument("--batch-sizes", default="1,4", help="batch sizes to measure (default: 1,4)")
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="decode steps measured after the longest prompt (default: 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, medians kept (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")


def _add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, required=True, help="number of layers to keep")
    parser.add_argument("--width", type=float, default=1.0, help="fraction of attention+MLP parameters to keep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amoeba", description="Any-shape LLMs for Hugging Face Transformers.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    build_cmd = add("build", _cmd_build, "the whole pipeline: convert, calibrate, fine-tune one-for-all, evaluate, save")
    build_cmd.add_argument("--model", default=None, help="Hub id, folder or .gguf (default: embedded SmolLM2-135M)")
    build_cmd.add_argument("--data", nargs="+", default=None,
                           help="calibration/fine-tuning files (default: the base model answers bundled prompts)")
    build_cmd.add_argument("--eval-data", default=None, help="text file for the final perplexity table")
    build_cmd.add_argument("--preset", default="quick", choices=["quick", "standard"])
    build_cmd.add_argument("--out", required=True, help="new folder for the checkpoint; re-run to resume")
    build_cmd.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: half the layers)")
    build_cmd.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    build_cmd.add_argument("--generated-tokens", type=int, default=None,
                           help="override the preset's length of each self-generated answer")
    build_cmd.add_argument("--seed", type=int, default=0)

    convert = add("convert", _cmd_convert, "convert a Llama/Mistral/Qwen2 model into an any-shape checkpoint")
    convert.add_argument("model", nargs="?", default=None,
                         help="folder, Hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    convert.add_argument("--out", required=True, help="new folder for the checkpoint")
    convert.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: half the layers)")
    convert.add_argument("--min-width", type=float, default=0.5, help="smallest width (default: 0.5)")

    calibrate = add("calibrate", _cmd_calibrate, "Stage 1: choose each depth's layers (DP) and order widths by importance")
    calibrate.add_argument("model", nargs="?", default=None,
                           help="any-shape checkpoint, or a source model to convert (default: embedded SmolLM2)")
    calibrate.add_argument("--data", required=True, help="calibration text: .txt (a document per line) or JSON/JSONL `text`")
    calibrate.add_argument("--out", required=True, help="new folder for the calibrated checkpoint")
    calibrate.add_argument("--score", default="ppl", choices=["ppl", "kl", "mmlu"], help="DP score (default ppl)")
    calibrate.add_argument("--mc-data", default=None, help="MMLU-style JSONL {input, output} for --score mmlu")
    calibrate.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: the model's)")
    calibrate.add_argument("--widths", default=None, help="width grid, e.g. 1,0.875,0.75,0.625,0.5")
    calibrate.add_argument("--samples", type=int, default=16, help="calibration samples (blocks or prompts)")
    calibrate.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block")
    calibrate.add_argument("--keep-last", type=int, default=1, help="never remove the last K layers (default 1)")
    calibrate.add_argument("--keep-first", action="store_true", help="never remove the first layer")
    calibrate.add_argument("--depth-method", default="dp", choices=["dp", "block-influence", "drop-last"])
    calibrate.add_argument("--width-method", default="flap", choices=["flap", "magnitude", "wanda-sp", "random"])
    calibrate.add_argument("--width-mode", default="uniform", choices=["global", "uniform"],
                           help="uniform (default): same fraction per layer, exports to plain Llama; global: one "
                           "importance threshold over all layers (worse at 3 of 4 widths on SmolLM2-135M)")
    calibrate.add_argument("--no-bias-compensation", action="store_true", help="do not add pruned channels' mean")
    calibrate.add_argument("--seed", type=int, default=0)

    train = add("train", _cmd_train, "Stage 2: one-for-all fine-tuning (SMoL experts, sandwich sampling, distillation)")
    train.add_argument("model_dir", nargs="?", default=None,
                       help="(calibrated) any-shape checkpoint or a source model (default: embedded SmolLM2)")
    train.add_argument("--data", nargs="+", required=True,
                       help="Alpaca JSON/JSONL (instruction, input, output) and/or text (.txt, JSONL `text`)")
    train.add_argument("--out", required=True, help="new folder for the trained checkpoint")
    train.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    train.add_argument("--batch-size", type=int, default=2)
    train.add_argument("--grad-accum", type=int, default=4)
    train.add_argument("--lr", type=float, default=2e-4)
    train.add_argument("--max-prompt-tokens", type=int, default=256)
    train.add_argument("--max-response-tokens", type=int, default=128)
    train.add_argument("--experts", type=int, default=5, help="LoRA experts per linear; 1 = plain LoRA (default 5)")
    train.add_argument("--top-k", type=int, default=2)
    train.add_argument("--rank", type=int, default=8)
    train.add_argument("--random-shapes", type=int, default=2,
                       help="random shapes per step besides the smallest and (unless --teacher base) the largest")
    train.add_argument("--widths", default=None, help="widths to sample, e.g. 1,0.875,0.75 (default: uniform range)")
    train.add_argument("--no-distillation", action="store_true", help="train every shape on labels (ablation)")
    train.add_argument("--teacher", choices=("largest", "base"), default="largest",
                       help="distillation teacher: the largest shape, trained on labels (paper), or the frozen base "
                            "model, which then stays the full shape exactly (for data the base model generated itself)")
    train.add_argument("--no-balancing", action="store_true", help="disable loss-magnitude balancing (ablation)")
    train.add_argument("--no-router-noise", action="store_true",
                       help="route without training noise (learns faster on short budgets, see docs/training.md)")
    train.add_argument("--train-base", action="store_true", help="also train the base weights (default: frozen)")
    train.add_argument("--save-steps", type=int, default=50, help="checkpoint interval; re-run resumes from the last")
    train.add_argument("--seed", type=int, default=0)

    shapes = add("shapes", _cmd_shapes, "list a checkpoint's shape space with parameter counts")
    shapes.add_argument("model_dir")

    generate = add("generate", _cmd_generate, "prompt one shape of a checkpoint (greedy)")
    generate.add_argument("model_dir")
    _add_shape_args(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)

    export = add("export", _cmd_export, "export one shape as a physically smaller, plain checkpoint")
    export.add_argument("model_dir")
    _add_shape_args(export)
    destination = export.add_mutually_exclusive_group(required=True)
    destination.add_argument("--out", help="new folder for the subnet")
    destination.add_argument("--push", metavar="REPO_ID", help="Hub repo to publish the subnet to (your-name/model)")
    _add_hub_args(export)

    push = add("push", _cmd_push, "publish a checkpoint folder (weights, code, tokenizer, model card) on the Hub")
    push.add_argument("model_dir", help="checkpoint folder, uploaded as it is (hidden files excepted)")
    push.add_argument("push", metavar="REPO_ID", help="Hub repo, e.g. your-name/smollm2-amoeba")
    _add_hub_args(push)
    evaluate = add("eval", _cmd_eval, "score many shapes of one checkpoint: perplexity, zero-shot and MMLU accuracy")
    evaluate.add_argument("model_dir")
    evaluate.add_argument("--shapes", default="grid", help="DEPTHxWIDTH list, e.g. 30x1,24x0.75, or 'grid' (default)")
    evaluate.add_argument("--tasks", default="wikitext2,hellaswag,arc_easy,piqa,mmlu",
                          help="comma-separated: wikitext2, hellaswag, arc_easy, piqa, mmlu (5-shot), mmlu_0shot, "
                               "or a .jsonl file of {context, choices, label} lines")
    evaluate.add_argument("--data-dir", required=True, help="folder holding the evaluation sets (layout in docs/results.md)")
    evaluate.add_argument("--out", required=True, help="results JSON (resumed if it exists); .csv and .png are written beside it")
    evaluate.add_argument("--limit", type=int, default=None, help="seeded subset of N items per multiple-choice task")
    evaluate.add_argument("--mmlu-limit", type=int, default=None, help="seeded subset of N questions per MMLU subject")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the subsets (default: 1234)")
    evaluate.add_argument("--ppl-window", type=int, default=2048, help="perplexity window in tokens (default: 2048)")
    evaluate.add_argument("--ppl-stride", type=int, default=None, help="window stride (default: the window, no overlap)")
    evaluate.add_argument("--ppl-tokens", type=int, default=None, help="score only the first N tokens of the text")
    evaluate.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")

    profile = add("profile", _cmd_profile, "measure speed and memory of shapes on this device (cached in the folder)")
    profile.add_argument("model_dir")
    profile.add_argument("--shapes", default="grid", help="DEPTHxWIDTH list, e.g. 30x1,24x0.75, or 'grid' (default)")
    profile.add_argument("--modes", default="elastic,exported", help="elastic, exported or both (default: both)")
    _add_profile_args(profile)

    search = add("search", _cmd_search, "the best shape within a latency, throughput, memory or size budget")
    search.add_argument("model_dir")
    search.add_argument("--max-latency-ms", type=float, default=None, help="decode time per token at --batch-size")
    search.add_argument("--min-tokens-per-s", type=float, default=None,
                        help="decode throughput at --batch-size (tokens/s of all sequences)")
    search.add_argument("--max-memory-gb", type=float, default=None,
                        help="weights + activations + KV cache at --batch-size (the runtime not included)")
    search.add_argument("--max-params", default=None, help="parameter count, e.g. 90M or 1.5B")
    quality = search.add_mutually_exclusive_group()
    quality.add_argument("--results", default=None, help="amoeba eval --out results: their shapes are the candidates")
    quality.add_argument("--data-dir", default=None,
                         help="evaluation data for a quick evaluation of --shapes instead (cached in the folder)")
    search.add_argument("--metric", default=None, help="task or task/metric, e.g. wikitext2, arc_easy/acc_norm "
                        "(default: wikitext2)")
    search.add_argument("--shapes", default="grid", help="candidates of a quick evaluation (default: grid)")
    search.add_argument("--mode", default="exported", choices=["exported", "elastic"],
                        help="what you will deploy: exported subnets (default) or the elastic model")
    search.add_argument("--batch-size", type=int, default=1, help="batch size the budget refers to (default: 1)")
    search.add_argument("--plot", default=None, help="frontier PNG (default: MODEL_DIR/amoeba_frontier.png)")
    search.add_argument("--export", default=None, metavar="OUT", help="export the chosen shape to this new folder")
    _add_profile_args(search)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging

        logging.set_verbosity_error()
    try:
        args.handler(args)
    except (UserError, ValueError, FileNotFoundError, FileExistsError, OSError) as error:
        if args.verbose:
            traceback.print_exc()
        print(f"amoeba {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amoeba {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
