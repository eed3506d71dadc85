"""`amoeba plan`: parameters, memory per device, FLOPs and time of every stage, from a config alone."""

import argparse

from ..pipeline.plan import PlanSettings
from . import add_command, add_settings_arguments, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "plan", _cmd_plan,
        "know the cost before renting GPUs: parameters, memory per device, FLOPs and time of every stage "
        "(reads config.json only)",
        "amoeba plan meta-llama/Llama-2-7b-hf --seq-len 2048 --processes 8 --fsdp --tflops 400\n"
        "  amoeba plan llama2-7b/config.json --dtype float32 --gradient-checkpointing --json plan.json",
    )
    parser.add_argument("model", help="Hub id, model folder or config.json of a Llama/Mistral/Qwen2 or any-shape model")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON to PATH")
    add_settings_arguments(parser, PlanSettings)


def _cmd_plan(args: argparse.Namespace) -> None:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from ..pipeline.plan import format_plan, plan

    settings = settings_from_args(PlanSettings, args)
    result = plan(args.model, **asdict(settings))
    print(format_plan(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"plan written to {args.json}")
