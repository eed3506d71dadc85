"""Writes that either complete or leave nothing behind: a half-written checkpoint must never look valid.

One process writes an output at a time (`output_lock`), so the staging folders of an output that its writer finds
are leftovers of a killed run, and are removed, as are other outputs' staging in that folder whose lock is free.
"""

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.hub import convert_file_size_to_int

from .modeling.checkpoint_files import write_text_atomically


DEFAULT_MAX_SHARD_SIZE = "5GB"


@dataclass
class SaveSettings:
    """How a command writes its checkpoint: the `--max-shard-size` of every command that saves one."""

    max_shard_size: str = field(
        default=DEFAULT_MAX_SHARD_SIZE,
        metadata={"help": "largest weight file; a bigger model is saved as model-0000X-of-0000N.safetensors shards "
                          "with model.safetensors.index.json (transformers' max_shard_size), e.g. 5GB, 500MB"},
    )

    def validate(self) -> None:
        """Refuse a size transformers cannot read (or not above zero) before any work, not after it."""
        try:
            size = convert_file_size_to_int(self.max_shard_size)
        except ValueError:
            size = None
        if not isinstance(size, int) or size <= 0:
            raise ValueError(
                f"--max-shard-size must be a positive size such as 5GB, 500MB or 2000000 (bytes), got "
                f"{self.max_shard_size!r}"
            )


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
    locked = {}
    lock = FileLock(path, timeout=0, on_acquired=lambda fd: locked.update(stat=os.fstat(fd)))
    busy = OutputLockedError(
        f"another amoeba process is writing {out} (lock {lock_file(out)}); wait for it or choose another --out"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout:
        raise busy from None
    except PermissionError:
        raise _not_writable(Path(out)) from None
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


def _not_writable(out: Path) -> PermissionError:
    """A permission error that names the output and its folder, not the hidden lock or staging path that hit it."""
    return PermissionError(f"cannot write {out}: permission denied in {out.parent}; choose a folder you can write to")


def disk_full(error: BaseException, out: str | os.PathLike) -> OSError | None:
    """A one-line error for a write that ran out of disk space (safetensors reports it in its own exception type,
    numpy's tofile as 'N requested and M written'); None for any other error."""
    text = str(error)
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in text
    if not full and not (isinstance(error, OSError) and "requested and" in text and "written" in text):
        return None
    out = Path(out)
    return OSError(f"no space left on the device holding {out.parent} while writing {out.name}; free space or "
                   "choose another location")


def _staging_prefix(out: Path) -> str:
    """Staging folders of `out` are `.NAME.staging-XXXX`, unlike the resumable work folders beside it
    (`.NAME.train-work`, `.NAME.build`), which must survive a killed run."""
    return f".{out.name}.staging-"


def _remove_stale_staging(out: Path) -> None:
    """Staging folders (or files) that killed writers left: those of `out` (the caller holds its lock, so no live run
    owns one), and those of other outputs in the same folder whose lock is free, so that any run in a folder cleans
    up after earlier ones."""
    _remove_staging_of(out)
    others = {path.name[1:].rsplit(".staging-", 1)[0] for path in out.parent.iterdir()
              if path.name.startswith(".") and ".staging-" in path.name and not path.is_symlink()}
    for name in sorted(others - {out.name}):
        try:
            with output_lock(out.parent / name):
                _remove_staging_of(out.parent / name)
        except (OutputLockedError, PermissionError):
            continue


def _remove_staging_of(out: Path) -> None:
    prefix = _staging_prefix(out)
    for path in out.parent.iterdir():
        if not path.name.startswith(prefix) or path.is_symlink():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file():  # the temporary file of a single-file output (a GGUF file)
            path.unlink(missing_ok=True)


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
        try:
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=out.parent))
        except PermissionError:
            raise _not_writable(out) from None
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        try:
            yield staging
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            full = disk_full(error, out)
            if full is not None:
                raise full from None
            raise


@contextmanager
def staged_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
    files: Mapping[str, str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Iterator[Path]:
    """A staging folder with `files`, the model and its tokenizer, yielded for more files, then renamed to `out`.

    `files` (name -> text) are written before the model, so that the model card sees e.g. `amoeba_eval.json`.
    Weights larger than `max_shard_size` are split into shards with an index (`save_pretrained`'s own mechanism), in
    the model's own dtype.
    """
    with atomic_directory(out) as staging:
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        yield staging


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | os.PathLike,
    files: Mapping[str, str] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save a model, its tokenizer and `files` (name -> text) into the new folder `out`, all or nothing; weights
    larger than `max_shard_size` are sharded."""
    with staged_checkpoint(model, tokenizer, out, files, max_shard_size):
        pass
    return Path(out)


__all__ = [
    "DEFAULT_MAX_SHARD_SIZE",
    "OutputLockedError",
    "SaveSettings",
    "atomic_directory",
    "ensure_free_output_dir",
    "lock_file",
    "output_lock",
    "save_checkpoint",
    "staged_checkpoint",
    "write_text_atomically",
]
