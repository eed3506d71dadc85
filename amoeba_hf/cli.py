"""The `amoeba` command line: one tool, one subcommand per job, one-line errors for user mistakes."""

import argparse
import sys
import tempfile
import traceback
from collections.abc import Callable

from .atomic_io import atomic_directory, ensure_free_output_dir

EXAMPLES = {
    "convert": "amoeba convert --out smollm2-amoeba            # embedded SmolLM2-135M-Instruct\n"
    "  amoeba convert TinyLlama/TinyLlama-1.1B-Chat-v1.0 --out tinyllama-amoeba --min-depth 14",
    "shapes": "amoeba shapes smollm2-amoeba",
    "generate": 'amoeba generate smollm2-amoeba --depth 24 --width 0.75 --prompt "The capital of France is"',
    "export": "amoeba export smollm2-amoeba --depth 24 --width 0.75 --out smollm2-d24-w075\n"
    "  amoeba export your-name/smollm2-amoeba --depth 24 --width 0.75 --push your-name/smollm2-d24-w075",
    "push": "amoeba push smollm2-amoeba your-name/smollm2-amoeba --private\n"
    "  amoeba push smollm2-amoeba your-name/smollm2-amoeba --revision stage2 --exist-ok",
}


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""


def _load_checkpoint(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def _cmd_convert(args: argparse.Namespace) -> None:
    from .defaults import convert_source, load_tokenizer

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
    from .hub import push_folder

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

    convert = add("convert", _cmd_convert, "convert a Llama/Mistral/Qwen2 model into an any-shape checkpoint")
    convert.add_argument("model", nargs="?", default=None,
                         help="folder, Hub id or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    convert.add_argument("--out", required=True, help="new folder for the checkpoint")
    convert.add_argument("--min-depth", type=int, default=None, help="smallest depth (default: half the layers)")
    convert.add_argument("--min-width", type=float, default=0.5, help="smallest width (default: 0.5)")

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
