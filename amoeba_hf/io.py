"""Writes that either complete or leave nothing behind: a half-written checkpoint must never look valid.

One process writes an output at a time (`output_lock`), so the staging folders of an output that its writer finds
are leftovers of a killed run, and are removed.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .modeling.checkpoint_files import write_text_atomically


class OutputLockedError(OSError):
    """Another process holds the lock of the output being written."""


_held_locks: set[Path] = set()


def lock_file(out: str | os.PathLike) -> Path:
    """`.NAME.lock` beside the output `NAME`: outside it, so the finished folder holds only its own files."""
    out = Path(out)
    return out.parent / f".{out.name}.lock"


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the output's lock, or refuse at once: two processes resuming or staging the same output would corrupt
    each other's work. Re-entrant within a process, so a command's lock also covers its own staged writes.

    The lock file is removed on exit while still held; a process that opened it just before then finds, once it
    holds the lock, that the path no longer names its file, and is refused like any other second writer.
    """
    path = lock_file(Path(out).resolve())
    if path in _held_locks:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    locked = {}
    lock = FileLock(path, timeout=0, on_acquired=lambda fd: locked.update(stat=os.fstat(fd)))
    busy = OutputLockedError(
        f"another amoeba process is writing {out} (lock {lock_file(out)}); wait for it or choose another --out"
    )
    try:
        lock.acquire()
    except Timeout:
        raise busy from None
    try:
        if not path.exists() or not os.path.samestat(path.stat(), locked["stat"]):
            raise busy
        _held_locks.add(path)
        try:
            yield
        finally:
            _held_locks.discard(path)
            path.unlink(missing_ok=True)
    finally:
        lock.release()


def _staging_prefix(out: Path) -> str:
    """Staging folders of `out` are `.NAME.staging-XXXX`, unlike the resumable work folders beside it
    (`.NAME.train-work`, `.NAME.build`), which must survive a killed run."""
    return f".{out.name}.staging-"


def _remove_stale_staging(out: Path) -> None:
    """Staging folders that a killed writer of `out` left (the caller holds the lock, so no live run owns one)."""
    prefix = _staging_prefix(out)
    for path in out.parent.iterdir():
        if path.name.startswith(prefix) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def ensure_free_output_dir(out: str | os.PathLike) -> Path:
    """Refuse to write into a folder that already holds files (a user's other model must not be overwritten)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new output folder")
    return out


@contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out` (which must be absent or empty).

    Holds `out`'s lock throughout, and first removes the staging folders that a killed run left for `out`.
    """
    out = ensure_free_output_dir(out)
    with output_lock(out):
        _remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
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
    "OutputLockedError",
    "atomic_directory",
    "ensure_free_output_dir",
    "lock_file",
    "output_lock",
    "save_checkpoint",
    "staged_checkpoint",
    "write_text_atomically",
]
