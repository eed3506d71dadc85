"""`amoeba eval`: score many shapes of one checkpoint."""

import argparse

from ..evaluation.runner import EvalSettings
from ..placement import LoadSettings
from . import UserError, add_command, add_settings_arguments, load_checkpoint, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "eval", _cmd_eval,
        "score many shapes of one checkpoint: perplexity, zero-shot and MMLU accuracy",
        "amoeba eval smollm2-amoeba --shapes 30x1,24x0.75 --tasks wikitext2,arc_easy,piqa --data-dir ../shared/data "
        "--limit 200 --out results.json\n"
        "  amoeba eval smollm2-amoeba --shapes grid --tasks hellaswag,mmlu --data-dir data --limit 100 --mmlu-limit 5 "
        "--out grid.json",
        resumable=True,
    )
    parser.add_argument("model_dir")
    parser.add_argument("--shapes", default="grid", help="DEPTHxWIDTH list, e.g. 30x1,24x0.75, or 'grid' (default)")
    parser.add_argument("--tasks", default="wikitext2,hellaswag,arc_easy,piqa,mmlu",
                        help="comma-separated: wikitext2, hellaswag, arc_easy, piqa, mmlu (5-shot), mmlu_0shot, "
                             "or a .jsonl file of {context, choices, label} lines")
    parser.add_argument("--out", required=True,
                        help="results JSON (resumed if it exists); .csv and .png are written beside it")
    add_settings_arguments(parser, EvalSettings)
    add_settings_arguments(parser, LoadSettings)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..evaluation.report import format_table, plot_frontier, write_csv
    from ..evaluation.runner import evaluate_shapes
    from ..fingerprint import source_identity
    from ..modeling.shape_space import parse_shapes

    settings = settings_from_args(EvalSettings, args)
    settings.validate()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    model = load_checkpoint(args.model_dir, **settings_from_args(LoadSettings, args).from_pretrained_kwargs()).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    shapes = parse_shapes(args.shapes, model.shape_space)
    tasks = args.tasks.split(",")
    settings = settings.for_model(getattr(model.config, "max_position_embeddings", None))
    if any(_is_perplexity_task(name) for name in tasks):
        settings.validate(getattr(model.config, "max_position_embeddings", None))
    results = evaluate_shapes(model, tokenizer, shapes, tasks, settings, model_name=args.model_dir,
                              out=out, batch_size=args.batch_size, model_identity=source_identity(args.model_dir))
    write_csv(results, out.with_suffix(".csv"))
    plot_frontier(results, out.with_suffix(".png"))
    print(format_table(results))
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


def _is_perplexity_task(name: str) -> bool:
    """wikitext2 and Hub datasets (`name@split`) are scored in `--ppl-window` windows (see `load_task`)."""
    return name == "wikitext2" or "@" in name
