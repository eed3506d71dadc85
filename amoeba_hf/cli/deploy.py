"""`amoeba profile` (speed and memory of shapes on this device) and `amoeba search` (the best shape in a budget)."""

import argparse
import re
import sys

from transformers import PretrainedConfig

from ..deploy.profile import ProfileSettings
from ..io import SaveSettings, ensure_free_output_dir, save_checkpoint
from . import UserError, add_command, add_settings_arguments, load_checkpoint, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    _register_profile(commands)
    _register_search(commands)


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    """What is measured (`ProfileSettings`), then where and how precisely (the runtime, not part of the settings)."""
    add_settings_arguments(parser, ProfileSettings)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, medians kept (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available, else cpu)")


def _report_progress(message: str) -> None:
    print(f"amoeba: {message}", file=sys.stderr)


def _parse_count(text: str) -> int:
    """A parameter count such as 90000000, 90M or 1.5B."""
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise UserError(f"--max-params must be a count like 90000000, 90M or 1.5B, got {text!r}") from None


def _check_context(settings: ProfileSettings, config: PretrainedConfig) -> None:
    """The longest prompt and its decode steps must fit the model's positions, or the timings are of garbage."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = max(settings.prompt_lengths)
    if limit is not None and longest + settings.new_tokens > limit:
        raise UserError(f"--prompt-lengths {longest} + --new-tokens {settings.new_tokens} exceeds the model's "
                        f"max_position_embeddings ({limit})")


def _profile_settings(args: argparse.Namespace) -> ProfileSettings:
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    return settings_from_args(ProfileSettings, args)


def _load_for_profiling(args: argparse.Namespace):
    """The checkpoint in the dtype, on the device and with the CPU threads that its measurements are keyed by."""
    import torch

    from ..placement import check_device

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device name (e.g. cpu, cuda, cuda:1)") from None
    model = load_checkpoint(args.model_dir, dtype=getattr(torch, args.dtype))
    return model.to(device).eval()


def _register_profile(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "profile", _cmd_profile,
        "measure speed and memory of shapes on this device (cached in the folder)",
        "amoeba profile smollm2-amoeba --shapes 30x1,24x1,30x0.75 --batch-sizes 1,8 --threads 2",
    )
    parser.add_argument("model_dir")
    parser.add_argument("--shapes", default="grid", help="DEPTHxWIDTH list, e.g. 30x1,24x0.75, or 'grid' (default)")
    parser.add_argument("--modes", default="elastic,exported", help="elastic, exported or both (default: both)")
    _add_profile_args(parser)


def _cmd_profile(args: argparse.Namespace) -> None:
    from ..deploy.profile import format_profile, profile_checkpoint
    from ..modeling.shape_space import parse_shapes

    settings = _profile_settings(args)
    model = _load_for_profiling(args)
    _check_context(settings, model.config)
    shapes = parse_shapes(args.shapes, model.shape_space)
    modes = args.modes.split(",")
    profile = profile_checkpoint(model, args.model_dir, shapes, settings, modes=modes, repeats=args.repeats,
                                 progress=_report_progress)
    print(format_profile(profile, model.shape_space, shapes, modes))


def _register_search(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "search", _cmd_search, "the best shape within a latency, throughput, memory or size budget",
        "amoeba search smollm2-amoeba --results results.json --max-latency-ms 30 --export smollm2-30ms\n"
        "  amoeba search smollm2-amoeba --data-dir ../shared/data --shapes 30x1,24x1,30x0.75 --max-memory-gb 0.4 "
        "--min-tokens-per-s 40",
    )
    parser.add_argument("model_dir")
    parser.add_argument("--max-latency-ms", type=float, default=None, help="decode time per token at --batch-size")
    parser.add_argument("--min-tokens-per-s", type=float, default=None,
                        help="decode throughput at --batch-size (tokens/s of all sequences)")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="weights + activations + KV cache at --batch-size (the runtime not included)")
    parser.add_argument("--max-params", default=None, help="parameter count, e.g. 90M or 1.5B")
    # argparse takes '-5M' for an option (only plain numbers may start with '-'), so a negative count would be
    # reported as a missing value; let it reach the budget check, which says what is valid.
    parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d*\.?\d+[KMBkmb]$")
    quality = parser.add_mutually_exclusive_group()
    quality.add_argument("--results", default=None, help="amoeba eval --out results: their shapes are the candidates")
    quality.add_argument("--data-dir", default=None,
                         help="evaluation data for a quick evaluation of --shapes instead (cached in the folder)")
    parser.add_argument("--metric", default=None, help="task or task/metric, e.g. wikitext2, arc_easy/acc_norm "
                        "(default: wikitext2)")
    parser.add_argument("--shapes", default="grid", help="candidates of a quick evaluation (default: grid)")
    parser.add_argument("--mode", default="exported", choices=["exported", "elastic"],
                        help="what you will deploy: exported subnets (default) or the elastic model")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size the budget refers to (default: 1)")
    parser.add_argument("--plot", default=None, help="frontier PNG (default: MODEL_DIR/amoeba_frontier.png)")
    parser.add_argument("--export", default=None, metavar="OUT", help="export the chosen shape to this new folder")
    add_settings_arguments(parser, SaveSettings)
    _add_profile_args(parser)


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
    from ..modeling.shape_space import parse_shapes

    max_params = None if args.max_params is None else _parse_count(args.max_params)
    budget = Budget(args.max_latency_ms, args.min_tokens_per_s, args.max_memory_gb, max_params)
    budget.validate()
    settings = _profile_settings(args)
    if args.batch_size not in settings.batch_sizes:
        profiled = ",".join(map(str, settings.batch_sizes))
        raise UserError(f"--batch-size {args.batch_size} must be one of the profiled --batch-sizes {profiled}")
    if args.results is None and args.data_dir is None:
        raise UserError("no quality source: pass --results FILE (from amoeba eval --out) or --data-dir DIR for a "
                        "quick evaluation")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UserError(f"--data-dir {args.data_dir} is not a folder")
    save = settings_from_args(SaveSettings, args)
    save.validate()
    if args.export is not None:
        ensure_free_output_dir(args.export)
    quality = stored_quality(args.results, args.metric) if args.results is not None else None
    model = _load_for_profiling(args)
    _check_context(settings, model.config)
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
        save_checkpoint(subnet, tokenizer, args.export, max_shard_size=save.max_shard_size)
        print(f"exported {type(subnet).__name__} ({subnet.num_parameters():,} parameters) to {args.export}")
