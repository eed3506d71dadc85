"""`amoeba shapes`, `generate`, `export` and `push`: look at, run, cut out and publish shapes of a checkpoint."""

import argparse
import contextlib
import tempfile
from pathlib import Path

from ..deploy.gguf import GGUF_DTYPES, write_gguf
from ..io import DEFAULT_MAX_SHARD_SIZE, SaveSettings, ensure_free_output_dir, output_lock, save_checkpoint
from ..placement import LoadSettings, input_device
from . import UserError, add_command, add_settings_arguments, load_checkpoint, settings_from_args


def register(commands: argparse._SubParsersAction) -> None:
    _register_shapes(commands)
    _register_generate(commands)
    _register_export(commands)
    _register_push(commands)


def _add_shape_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depth", type=int, required=True, help="number of layers to keep")
    parser.add_argument("--width", type=float, default=1.0, help="fraction of attention+MLP parameters to keep")


def _add_hub_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", help="create the repo as private (ignored if it exists)")
    parser.add_argument("--revision", default=None, help="branch to push to, created from main if missing")
    parser.add_argument("--exist-ok", action="store_true", help="allow a new commit to a repo that already exists")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the folder and list the files a push would upload, then stop: nothing is sent")


def _register_shapes(commands: argparse._SubParsersAction) -> None:
    parser = add_command(commands, "shapes", _cmd_shapes, "list a checkpoint's shape space with parameter counts",
                         "amoeba shapes smollm2-amoeba")
    parser.add_argument("model_dir")


def _cmd_shapes(args: argparse.Namespace) -> None:
    model = load_checkpoint(args.model_dir)
    space = model.shape_space
    full = space.parameter_count(*space.full_shape)
    print(f"{'depth':>5} {'width':>6} {'parameters':>12} {'ratio':>6}  layers")
    for depth, width in space.grid():
        count = space.parameter_count(depth, width)
        layers = ",".join(map(str, space.kept_layers(depth)))
        print(f"{depth:>5} {width:>6.3f} {count:>12,} {count / full:>6.1%}  {layers}")
    print(f"width is continuous in [{space.min_width}, 1] ({space.width_mode} mode); grid shown")


def _register_generate(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "generate", _cmd_generate, "prompt one shape of a checkpoint (greedy)",
        'amoeba generate smollm2-amoeba --depth 24 --width 0.75 --prompt "The capital of France is"',
    )
    parser.add_argument("model_dir")
    _add_shape_args(parser)
    parser.add_argument("--prompt", required=True,
                        help="the user message (sent through the tokenizer's chat template, if it has one)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as it is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    add_settings_arguments(parser, LoadSettings)


def _cmd_generate(args: argparse.Namespace) -> None:
    import sys
    import time

    from transformers import AutoTokenizer

    if not args.prompt.strip():
        raise UserError("--prompt is empty; give the text to answer or continue")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        # The shell passed bytes that are not UTF-8: Python keeps them as lone surrogates, which no tokenizer takes.
        raise UserError(f"--prompt is not valid UTF-8 text (byte 0x{ord(error.object[error.start]) & 0xFF:02x} at "
                        f"character {error.start}); give the prompt as UTF-8") from None
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model = load_checkpoint(args.model_dir, **settings_from_args(LoadSettings, args).from_pretrained_kwargs()).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    model.set_shape(args.depth, args.width)
    if tokenizer.chat_template and not args.raw:
        # An instruction-tuned model fed a bare prompt often answers its end-of-turn token at once (and prints nothing).
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    largest = int(inputs["input_ids"].max())
    if largest >= model.config.vocab_size:
        raise UserError(
            f"the tokenizer of {args.model_dir} produced token id {largest}, outside the model's vocabulary "
            f"(vocab_size {model.config.vocab_size}); the tokenizer does not belong to the model"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and inputs["input_ids"].shape[1] + args.max_new_tokens > limit:
        if args.max_new_tokens >= limit:
            raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt within the "
                            f"model's max_position_embeddings ({limit})")
        # Positions past the limit give garbage without an error; the end of the prompt matters most for a reply.
        keep = limit - args.max_new_tokens
        print(f"amoeba generate: warning: prompt of {inputs['input_ids'].shape[1]} tokens + --max-new-tokens "
              f"{args.max_new_tokens} exceeds the model's max_position_embeddings ({limit}); keeping the last "
              f"{keep} prompt tokens", file=sys.stderr)
        for name in inputs:
            inputs[name] = inputs[name][:, -keep:]
    inputs = inputs.to(input_device(model))
    started = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    new_tokens = output[0][inputs["input_ids"].shape[1]:]
    print(tokenizer.decode(new_tokens, skip_special_tokens=True))
    parameters = model.shape_space.parameter_count(args.depth, args.width)
    print(f"[shape {args.depth}x{args.width:g}: {parameters:,} parameters, {len(new_tokens)} tokens at "
          f"{len(new_tokens) / seconds:.1f} tokens/s]")


def _register_export(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "export", _cmd_export, "export one shape as a physically smaller, plain checkpoint",
        "amoeba export smollm2-amoeba --depth 24 --width 0.75 --out smollm2-d24-w075\n"
        "  amoeba export your-name/smollm2-amoeba --depth 24 --width 0.75 --push your-name/smollm2-d24-w075",
    )
    parser.add_argument("model_dir")
    _add_shape_args(parser)
    destination = parser.add_mutually_exclusive_group(required=True)
    destination.add_argument("--out", help="new folder for the subnet")
    destination.add_argument("--push", metavar="REPO_ID", help="Hub repo to publish the subnet to (your-name/model)")
    destination.add_argument("--gguf", metavar="FILE", help="new llama.cpp GGUF file of the subnet (Llama family, "
                             "uniform widths; tokenizer and chat template included)")
    destination.add_argument("--adapter", metavar="DIR", help="new folder: the plain subnet without the shape's LoRA, "
                             "plus that LoRA as a peft adapter in DIR/adapter")
    parser.add_argument("--gguf-dtype", default="f32", choices=GGUF_DTYPES, help="GGUF tensor type (default: f32)")
    add_settings_arguments(parser, SaveSettings)
    _add_hub_args(parser)


def _cmd_export(args: argparse.Namespace) -> None:
    if args.push is None and (args.private or args.revision or args.exist_ok or args.dry_run):
        raise UserError("--private, --revision, --exist-ok and --dry-run apply only with --push REPO_ID")
    if args.push is not None:
        _check_repo_id(args.push)
    if args.gguf is None and args.gguf_dtype != "f32":
        raise UserError("--gguf-dtype applies only with --gguf FILE")
    if args.gguf is not None and args.max_shard_size != DEFAULT_MAX_SHARD_SIZE:
        raise UserError("--max-shard-size applies only with --out, --push or --adapter (a GGUF file is one file)")
    save = settings_from_args(SaveSettings, args)
    save.validate()
    for folder in (args.out, args.adapter):
        if folder is not None:
            ensure_free_output_dir(folder)
    if args.gguf is not None and Path(args.gguf).exists():
        raise UserError(f"--gguf {args.gguf} already exists; choose a new file name")
    # The lock covers the whole run, not only the final write: a second export to the same output is refused before
    # it loads anything, and the stale staging files of a killed export are swept while no other writer can own them.
    target = args.out or args.adapter or args.gguf
    with output_lock(target) if target is not None else contextlib.nullcontext():
        _export(args, save)


def _export(args: argparse.Namespace, save: SaveSettings) -> None:
    from transformers import AutoTokenizer

    model = load_checkpoint(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    if args.adapter is not None:
        from ..deploy.peft_adapter import export_adapter

        folder = export_adapter(model, args.depth, args.width, args.adapter, tokenizer=tokenizer,
                                max_shard_size=save.max_shard_size)
        print(f"exported shape {args.depth}x{args.width:g} to {folder} (plain subnet) and {folder / 'adapter'} "
              "(peft LoRA)")
        return
    subnet = model.export_subnet(args.depth, args.width)
    if args.gguf is not None:
        path = write_gguf(subnet, tokenizer, args.gguf, dtype=args.gguf_dtype)
        print(f"exported shape {args.depth}x{args.width:g} to {path} ({args.gguf_dtype}, "
              f"{path.stat().st_size / 1e6:.1f} MB)")
        return
    description = f"{type(subnet).__name__} ({subnet.num_parameters():,} parameters)"
    if args.out is not None:
        save_checkpoint(subnet, tokenizer, args.out, max_shard_size=save.max_shard_size)
        print(f"exported {description} to {args.out}")
        return
    with tempfile.TemporaryDirectory() as staging:
        folder = save_checkpoint(subnet, tokenizer, Path(staging) / "subnet", max_shard_size=save.max_shard_size)
        commit = _push(folder, args, f"Upload subnet depth={args.depth} width={args.width:g} of {args.model_dir}")
    if commit is not None:
        print(f"exported {description} to {_pushed_to(commit, args)}")


def _register_push(commands: argparse._SubParsersAction) -> None:
    parser = add_command(
        commands, "push", _cmd_push, "publish a checkpoint folder (weights, code, tokenizer, model card) on the Hub",
        "amoeba push smollm2-amoeba your-name/smollm2-amoeba --private\n"
        "  amoeba push smollm2-amoeba your-name/smollm2-amoeba --revision stage2 --exist-ok",
    )
    parser.add_argument("model_dir", help="checkpoint folder, uploaded as it is (hidden files excepted) once it passes "
                        "the checks loading applies; symbolic links and special files are refused")
    parser.add_argument("push", metavar="REPO_ID", help="Hub repo, e.g. your-name/smollm2-amoeba")
    _add_hub_args(parser)


def _check_repo_id(repo_id: str) -> None:
    """A malformed repo id is the first thing to report, before the token, the folder checks or any work."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        reason = str(error).replace(" Use `repo_type` argument if needed.", "")
        raise UserError(f"{repo_id!r} is not a valid Hub repo id (your-name/model-name): {reason}") from None


def _cmd_push(args: argparse.Namespace) -> None:
    _check_repo_id(args.push)
    commit = _push(args.model_dir, args)
    if commit is not None:
        print(f"pushed {args.model_dir} to {_pushed_to(commit, args)}")


def _push(folder: str | Path, args: argparse.Namespace, commit_message: str | None = None):
    """Check the folder and list the files it uploads, then push exactly those; None with --dry-run (nothing sent)."""
    from ..hub import check_push_folder, push_folder

    folder = Path(folder)
    files = check_push_folder(folder)
    sizes = {path.relative_to(folder).as_posix(): path.stat().st_size for path in files}
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files ({sum(sizes.values()):,} bytes) "
          f"to {args.push}:")
    for name, size in sizes.items():
        print(f"  {name} ({size:,} bytes)")
    if args.dry_run:
        print("dry run: the folder passed the checks (regular files only, valid config.json, weight files intact and "
              "matching the config); no repo was created and nothing was uploaded")
        return None
    return push_folder(
        folder,
        args.push,
        private=True if args.private else None,
        revision=args.revision,
        exist_ok=args.exist_ok,
        commit_message=commit_message,
        files=files,
    )


def _pushed_to(commit, args: argparse.Namespace) -> str:
    return f"{commit.repo_url} (revision {args.revision or 'main'}, commit {commit.oid[:10]})"
