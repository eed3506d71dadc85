"""The `amoeba` command line: one tool, one subcommand per job, one-line errors for user mistakes.

Each group of commands lives in its own module (pipeline, stages, shapes, evaluate, deploy) with every command's flags
beside its handler; a module's `register(commands)` adds its commands to the parser assembled here.
"""

import argparse
import sys
import traceback
from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassFieldValidationError


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


def load_checkpoint(path: str, **kwargs):
    """An any-shape checkpoint from a folder or Hub id; a missing folder, or a model of another type, is a UserError."""
    from transformers import AutoModelForCausalLM

    from ..pipeline.sources import local_model_folder, local_model_type

    folder = local_model_folder(path)
    if folder is not None:
        _check_any_shape(path, local_model_type(folder))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kwargs)
    _check_any_shape(path, model.config.model_type)
    return model


def _check_any_shape(path: str, model_type: str | None) -> None:
    if model_type != "amoeba":
        raise UserError(
            f"{path} is not an any-shape checkpoint (model_type {model_type}); convert it with `amoeba convert`"
        )


def add_command(
    commands: argparse._SubParsersAction, name: str, handler: Callable, help_text: str, example: str,
    resumable: bool = False,
) -> argparse.ArgumentParser:
    """A subcommand whose help repeats its one-line description and ends with an example.

    `resumable`: re-running an interrupted command continues where it stopped (Ctrl-C then says so).
    """
    parser = commands.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler, resumable=resumable)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from . import deploy, evaluate, pipeline, shapes, stages

    parser = argparse.ArgumentParser(prog="amoeba", description="Any-shape LLMs for Hugging Face Transformers.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (pipeline, stages, shapes, evaluate, deploy):
        module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        from transformers.utils import logging

        logging.set_verbosity_error()
    try:
        args.handler(args)
    except (UserError, ValueError, OSError, StrictDataclassFieldValidationError) as error:
        # ValueError and OSError are what the package raises for bad input (AmoebaConfigError, CorruptWeightsError and
        # HubPushError among them); a field of the wrong type in a config.json is reported by huggingface_hub.
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(error).split()) if isinstance(error, StrictDataclassFieldValidationError) else error
        print(f"amoeba {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.resumable else ""
        print(f"amoeba {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
