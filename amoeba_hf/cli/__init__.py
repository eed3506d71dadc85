"""The `amoeba` command line: one tool, one subcommand per job, one-line errors for user mistakes.

Each group of commands lives in its own module (pipeline, stages, shapes, evaluate, deploy) with every command's flags
beside its handler; a module's `register(commands)` adds its commands to the parser assembled here.
"""

import argparse
import sys
import traceback
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


def load_checkpoint(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def add_command(
    commands: argparse._SubParsersAction, name: str, handler: Callable, help_text: str, example: str
) -> argparse.ArgumentParser:
    """A subcommand whose help repeats its one-line description and ends with an example."""
    parser = commands.add_parser(
        name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
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
