"""`amoeba calibrate` (Stage 1) and `amoeba train` (Stage 2)."""

import argparse

from ..io import ensure_free_output_dir, save_checkpoint
from . import UserError, add_command


def register(commands: argparse._SubParsersAction) -> None:
    _register_calibrate(commands)
    _register_train(commands)


def _parse_widths(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"--widths must be comma-separated numbers in (0, 1], got {text!r}") from None


def _register_calibrate(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "calibrate", _cmd_calibrate,
        "Stage 1: choose each depth's layers (DP) and order widths by importance",
        "amoeba calibrate smollm2-amoeba --data ../shared/data/calibration/c4_demo.jsonl --min-depth 18 "
        "--widths 1,0.875,0.75,0.625,0.5 --score ppl --out smollm2-calibrated\n"
        "  amoeba calibrate --data wiki.txt --score mmlu --mc-data mmlu/zero_shot_val.jsonl --out smollm2-mmlu-dp",
        resumable=True,
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="any-shape checkpoint, or a source model to convert (default: embedded SmolLM2)")
    parser.add_argument("--data", required=True,
                        help="calibration text: .txt (a document per line) or JSON/JSONL `text`")
    parser.add_argument("--out", required=True, help="new folder for the calibrated checkpoint")
    parser.add_argument("--score", default="ppl", choices=["ppl", "kl", "mmlu"], help="DP score (default ppl)")
    parser.add_argument("--mc-data", default=None, help="MMLU-style JSONL {input, output} for --score mmlu")
    parser.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: the model's)")
    parser.add_argument("--widths", default=None, help="width grid, e.g. 1,0.875,0.75,0.625,0.5")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples (blocks or prompts)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration block")
    parser.add_argument("--keep-last", type=int, default=1, help="never remove the last K layers (default 1)")
    parser.add_argument("--keep-first", action="store_true", help="never remove the first layer")
    parser.add_argument("--depth-method", default="dp", choices=["dp", "block-influence", "drop-last"])
    parser.add_argument("--width-method", default="flap", choices=["flap", "magnitude", "wanda-sp", "random"])
    parser.add_argument("--width-mode", default="uniform", choices=["global", "uniform"],
                        help="uniform (default): same fraction per layer, exports to plain Llama; global: one "
                        "importance threshold over all layers (worse at 3 of 4 widths on SmolLM2-135M)")
    parser.add_argument("--no-bias-compensation", action="store_true", help="do not add pruned channels' mean")
    parser.add_argument("--seed", type=int, default=0)


def _cmd_calibrate(args: argparse.Namespace) -> None:
    import json
    import shutil
    from dataclasses import asdict

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
    calibration = json.dumps({"settings": asdict(settings), **asdict(report)}, indent=2)
    save_checkpoint(model, tokenizer, out, files={"calibration.json": calibration})
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"calibrated checkpoint written to {out}: {report.evaluations} DP evaluations, "
          f"{report.layer_forwards} layer-forwards, depth {report.depth_seconds:.0f} s, "
          f"width {report.width_seconds:.0f} s")


def _register_train(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "train", _cmd_train,
        "Stage 2: one-for-all fine-tuning (SMoL experts, sandwich sampling, distillation)",
        "amoeba train smollm2-calibrated --data ../shared/data/finetune/alpaca_en_demo.json --steps 200 "
        "--out smollm2-oneforall\n"
        "  amoeba train smollm2-calibrated --data alpaca.json wiki.txt --experts 1 --no-balancing --out ablation",
        resumable=True,
    )
    parser.add_argument("model_dir", nargs="?", default=None,
                        help="(calibrated) any-shape checkpoint or a source model (default: embedded SmolLM2)")
    parser.add_argument("--data", nargs="+", required=True,
                        help="Alpaca JSON/JSONL (instruction, input, output) and/or text (.txt, JSONL `text`)")
    parser.add_argument("--out", required=True, help="new folder for the trained checkpoint")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--max-response-tokens", type=int, default=128)
    parser.add_argument("--experts", type=int, default=5, help="LoRA experts per linear; 1 = plain LoRA (default 5)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--random-shapes", type=int, default=2,
                        help="random shapes per step besides the smallest and (unless --teacher base) the largest")
    parser.add_argument("--widths", default=None, help="widths to sample, e.g. 1,0.875,0.75 (default: uniform range)")
    parser.add_argument("--no-distillation", action="store_true", help="train every shape on labels (ablation)")
    parser.add_argument("--teacher", choices=("largest", "base"), default="largest",
                        help="distillation teacher: the largest shape, trained on labels (paper), or the frozen base "
                             "model, which then stays the full shape exactly (for data the base model generated "
                             "itself)")
    parser.add_argument("--no-balancing", action="store_true", help="disable loss-magnitude balancing (ablation)")
    parser.add_argument("--no-router-noise", action="store_true",
                        help="route without training noise (learns faster on short budgets, see docs/training.md)")
    parser.add_argument("--train-base", action="store_true", help="also train the base weights (default: frozen)")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint interval; re-run resumes from the last")
    parser.add_argument("--seed", type=int, default=0)


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
    settings.validate()
    check_data(settings.data)
    model, tokenizer = load_or_convert(args.model_dir)
    work_dir = out.parent / f".{out.name}.train-work"
    trainer = finetune(model, tokenizer, settings, work_dir)
    if not trainer.is_world_process_zero():
        return
    save_checkpoint(model, tokenizer, out)
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"one-for-all checkpoint written to {out} ({settings.steps} steps, {model.config.smol_experts} experts)")
