"""`amoeba eval`: score many shapes of one checkpoint."""

import argparse

from . import UserError, add_command, load_checkpoint


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
    parser.add_argument("--data-dir", required=True,
                        help="folder holding the evaluation sets (layout in docs/results.md)")
    parser.add_argument("--out", required=True,
                        help="results JSON (resumed if it exists); .csv and .png are written beside it")
    parser.add_argument("--limit", type=int, default=None, help="seeded subset of N items per multiple-choice task")
    parser.add_argument("--mmlu-limit", type=int, default=None, help="seeded subset of N questions per MMLU subject")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the subsets (default: 1234)")
    parser.add_argument("--ppl-window", type=int, default=2048, help="perplexity window in tokens (default: 2048)")
    parser.add_argument("--ppl-stride", type=int, default=None, help="window stride (default: the window, no overlap)")
    parser.add_argument("--ppl-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")


def _cmd_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..evaluation.report import format_table, plot_frontier, write_csv
    from ..evaluation.runner import EvalSettings, evaluate_shapes
    from ..modeling.shape_space import parse_shapes

    if not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    settings = EvalSettings(args.data_dir, args.limit, args.mmlu_limit, args.seed, args.ppl_window, args.ppl_stride,
                            args.ppl_tokens)
    model = load_checkpoint(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    shapes = parse_shapes(args.shapes, model.shape_space)
    results = evaluate_shapes(model, tokenizer, shapes, args.tasks.split(","), settings, model_name=args.model_dir,
                              out=out, batch_size=args.batch_size)
    write_csv(results, out.with_suffix(".csv"))
    plot_frontier(results, out.with_suffix(".png"))
    print(format_table(results))
    print(f"wrote {out}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
