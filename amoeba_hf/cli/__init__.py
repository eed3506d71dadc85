"""The `amoeba` command line: one tool, one subcommand per job, one-line errors for user mistakes.

Each group of commands lives in its own module (pipeline, stages, shapes, evaluate, deploy) with every command's flags
beside its handler; a module's `register(commands)` adds its commands to the parser assembled here.
"""

import argparse
import dataclasses
import sys
import traceback
import types
import typing
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.errors import StrictDataclassFieldValidationError


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


def load_checkpoint(path: str, **kwargs):
    """An any-shape checkpoint from a folder or Hub id; a missing folder, or a model of another type, is a UserError."""
    from transformers import AutoModelForCausalLM

    from ..pipeline.sources import local_model_folder, local_model_type

    if str(path).lower().endswith(".gguf") and Path(path).is_file():
        raise UserError(f"{path} is a GGUF file, not an any-shape checkpoint; convert it with "
                        f"`amoeba convert {path} --out FOLDER` and use that folder")
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


def add_settings_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """One flag per field of a settings dataclass, so that flags, help, choices and defaults have one source.

    A field's metadata may hold `help`, `choices`, `flag` (the flag's name when it is not `--field-name`),
    `required`, `nargs="+"` (a list given as separate words), `aliases` (more flags, e.g. the TrainingArguments name)
    and `cli=False` (a setting only Python sets). Other list and tuple fields are typed as comma-separated text
    (parsed by `settings_from_args`); a bool that is True by default becomes `--no-NAME`, one that is False
    `--NAME` (their help says what the flag does), one that is None (decided at run time) `--NAME/--no-NAME`. The
    default is the field's, shown in the help.
    transformers' HfArgumentParser is not used: it spells lists as space-separated words and lists both the
    underscore and dash spellings of every flag, which would change the documented command line.
    """
    hints = typing.get_type_hints(settings_class)
    for item in dataclasses.fields(settings_class):
        if not item.metadata.get("cli", True):
            continue
        default = _default(item)
        flag = _flag(item, default)
        kind, element = _field_kind(hints[item.name])
        help_text = item.metadata.get("help")
        if kind is bool:
            action = "store_false" if default else "store_true"
            if default is None:
                action = argparse.BooleanOptionalAction
            parser.add_argument(flag, *item.metadata.get("aliases", ()), dest=item.name, action=action, help=help_text)
            continue
        required = item.metadata.get("required", False)
        if help_text is not None and not required and default not in (None, [], ()):
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text = f"{help_text} (default: {shown})"
        metavar = flag.lstrip("-").replace("-", "_").upper()
        options = {"dest": item.name, "default": default, "help": help_text, "metavar": metavar, "required": required}
        if "choices" in item.metadata:
            options.update(choices=item.metadata["choices"], metavar=None)
        if element is not None:
            options["type"] = element if item.metadata.get("nargs") else str
            if item.metadata.get("nargs"):
                options["nargs"] = item.metadata["nargs"]
        else:
            options["type"] = kind
        parser.add_argument(flag, *item.metadata.get("aliases", ()), **options)


def settings_from_args(settings_class: type, args: argparse.Namespace, **values):
    """The settings dataclass from parsed flags (comma-separated lists parsed here), plus `values` for fields that
    are not flags or that the command decides itself."""
    hints = typing.get_type_hints(settings_class)
    for item in dataclasses.fields(settings_class):
        if item.name in values or not item.metadata.get("cli", True) or not hasattr(args, item.name):
            continue
        value = getattr(args, item.name)
        kind, element = _field_kind(hints[item.name])
        if isinstance(value, str) and element is not None:
            value = kind(_parse_list(value, element, _flag(item, _default(item))))
        values[item.name] = value
    return settings_class(**values)


def _default(item: dataclasses.Field):
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None if item.default is dataclasses.MISSING else item.default


def _flag(item: dataclasses.Field, default) -> str:
    """Metadata `flag`, else `--field-name`, or `--no-field-name` for a bool that is True by default."""
    if "flag" in item.metadata:
        return item.metadata["flag"]
    return f"--{'no-' if default is True else ''}{item.name.replace('_', '-')}"


def _field_kind(annotation) -> tuple[type, type | None]:
    """(type, element type) of a field annotation, `X | None` read as X: (int, None), (list, float), (tuple, int)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return origin, typing.get_args(annotation)[0]
    return annotation, None


def _parse_list(text: str, element: type, flag: str) -> list:
    try:
        return [element(value) for value in text.split(",")]
    except ValueError:
        kind = "integers" if element is int else "numbers"
        raise UserError(f"{flag} must be comma-separated {kind}, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from . import deploy, evaluate, pipeline, plan, shapes, stages

    parser = argparse.ArgumentParser(prog="amoeba", description="Any-shape LLMs for Hugging Face Transformers.")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (pipeline, stages, shapes, evaluate, deploy, plan):
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
        if isinstance(error, ValueError) and str(error).startswith("Couldn't instantiate the backend tokenizer"):
            # transformers' advice (install sentencepiece) does not apply: the folder has no tokenizer files at all.
            model = getattr(args, "model_dir", None) or getattr(args, "model", None) or "the model"
            message = (f"found no tokenizer for {model} (no tokenizer.json or other tokenizer files); copy the "
                       "tokenizer files of its source model into the folder")
        print(f"amoeba {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if args.resumable else ""
        print(f"amoeba {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
