"""Writes that either complete or leave nothing behind: a half-written checkpoint must never look valid."""

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .modeling.checkpoint_files import write_text_atomically


def ensure_free_output_dir(out: str | os.PathLike) -> Path:
    """Refuse to write into a folder that already holds files (a user's other model must not be overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder")
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` (which must be absent or empty)."""
    out = ensure_free_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
    files: Mapping[str, str] | None = None,
) -> Iterator[Path]:
    """A staging folder with `files`, the model and its tokenizer, yielded for more files, then renamed to `out`.

    `files` (name -> text) are written before the model, so that the model card sees e.g. `amoeba_eval.json`.
    """
    with atomic_directory(out) as staging:
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        yield staging


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Save a model, its tokenizer and `files` (name -> text) into the new folder `out`, all or nothing."""
    with staged_checkpoint(model, tokenizer, out, files):
        pass
    return Path(out)


__all__ = [
    "atomic_directory",
    "ensure_free_output_dir",
    "save_checkpoint",
    "staged_checkpoint",
    "write_text_atomically",
]
