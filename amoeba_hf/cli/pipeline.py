"""`amoeba build` (the whole pipeline) and `amoeba convert` (a source model into an any-shape checkpoint)."""

import argparse
import contextlib
import os

from ..io import SaveSettings, ensure_free_output_dir, output_lock, save_checkpoint
from ..pipeline.build import BuildSettings
from ..placement import LoadSettings
from ..training.finetune import TrainerSettings
from . import add_command, add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    _register_build(commands)
    _register_convert(commands)


def _register_build(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "build", _cmd_build,
        "the whole pipeline: convert, calibrate, fine-tune one-for-all, evaluate, save",
        "amoeba build --preset quick --out smollm2-any-shape          # embedded SmolLM2, offline\n"
        "  amoeba build --model HuggingFaceTB/SmolLM2-360M-Instruct --data alpaca.json --preset standard --out smol360",
        resumable=True,
    )
    parser.add_argument("--out", required=True, help="new folder for the checkpoint; re-run to resume")
    add_settings_arguments(parser, BuildSettings)
    add_settings_arguments(parser, TrainerSettings)
    add_settings_arguments(parser, LoadSettings)
    add_settings_arguments(parser, SaveSettings)


def _cmd_build(args: argparse.Namespace) -> None:
    from ..pipeline.build import build, format_report

    # The lock covers the whole run (its work folder included), not only the final write: a second build of the same
    # --out is refused at once instead of resuming the same work folder. Under `accelerate launch` every process runs
    # this command and the main one (RANK 0) alone writes `out`, so it alone holds the lock.
    with output_lock(args.out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        report = build(settings_from_args(BuildSettings, args), args.out, load=settings_from_args(LoadSettings, args),
                       trainer_settings=settings_from_args(TrainerSettings, args),
                       save=settings_from_args(SaveSettings, args))
    if report is None:
        return
    print(format_report(report))
    print(f"checkpoint: {args.out} (frontier plot: {args.out}/frontier.png, log: {args.out}/build.log); "
          f"total {report['seconds'] / 60:.1f} min")


def _register_convert(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "convert", _cmd_convert, "convert a Llama/Mistral/Qwen2 model into an any-shape checkpoint",
        "amoeba convert --out smollm2-amoeba            # embedded SmolLM2-135M-Instruct\n"
        "  amoeba convert TinyLlama/TinyLlama-1.1B-Chat-v1.0 --out tinyllama-amoeba --min-depth 14",
    )
    parser.add_argument("model", nargs="?", default=None,
                        help="folder, Hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", required=True, help="new folder for the checkpoint")
    parser.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: half the layers)")
    parser.add_argument("--min-width", type=float, default=0.5, help="smallest width (default: 0.5)")
    add_settings_arguments(parser, LoadSettings)
    add_settings_arguments(parser, SaveSettings)


def _cmd_convert(args: argparse.Namespace) -> None:
    from ..pipeline.sources import convert_source, load_tokenizer

    save = settings_from_args(SaveSettings, args)
    save.validate()
    ensure_free_output_dir(args.out)
    with output_lock(args.out):
        model = convert_source(args.model, settings_from_args(LoadSettings, args), min_depth=args.min_depth,
                               min_width=args.min_width)
        tokenizer = load_tokenizer(args.model)
        save_checkpoint(model, tokenizer, args.out, max_shard_size=save.max_shard_size)
    print(f"saved any-shape checkpoint to {args.out} ({model.num_parameters():,} parameters, "
          f"depths {model.shape_space.min_depth}..{model.shape_space.num_layers}, widths "
          f"[{model.shape_space.min_width}, 1])")
