"""Resume only the same run: what determines a resumable command's result, recorded beside its saved progress.

A fingerprint holds a command's result-affecting settings (by flag), the identity of its model (config and weights
digests) and the sha256 of every data file. The first run writes it into its state or work folder before any
progress; a re-run whose fingerprint differs stops with one line naming every change, before it reads or changes the
saved progress, instead of silently starting over or mixing two runs' work.

Settings that only change how a result is computed, not what it is (checkpoint interval, chunk sizes, dataloader
workers, devices, gradient checkpointing, logging), are left out by each command, so they may differ on resume.
Hub datasets (`name[:config][@split]`) are recorded by their spec only: their content is not hashed.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from transformers.utils import cached_file

from .modeling.checkpoint_files import (
    CONFIG_FILE,
    file_sha256,
    saved_config_values,
    weights_digest,
    write_text_atomically,
)
from .pipeline.sources import split_source
from .training.data import is_file_source

FINGERPRINT_FILE = "fingerprint.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


class ResumeMismatchError(ValueError):
    """Saved progress belongs to a run with other settings, model or data (a ValueError: the CLI's one-line error)."""


def settings_record(*settings) -> dict:
    """Flag -> value of every field of the settings dataclasses but those their class lists as `OPERATIONAL`; a
    field that is no flag is named as it is in Python, and a `--no-NAME` flag's value is whether it is given."""
    record = {}
    for instance in settings:
        operational = getattr(instance, "OPERATIONAL", ())
        for item in dataclasses.fields(instance):
            if item.name not in operational:
                label, value = _label(item), getattr(instance, item.name)
                record[label] = not value if label.startswith("--no-") and isinstance(value, bool) else value
    return record


def model_dtype(model) -> dict[str, str]:
    """The loaded weights' dtype as a setting (`--dtype auto` loads whatever the source holds)."""
    return {"--dtype": str(model.dtype).removeprefix("torch.")}


def processes() -> int:
    """Processes training together (`WORLD_SIZE` under accelerate/torchrun): the global batch depends on it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _label(item: dataclasses.Field) -> str:
    """The field's flag as `add_settings_arguments` spells it (`--no-NAME` for a bool that is True by default)."""
    if not item.metadata.get("cli", True):
        return item.name
    if "flag" in item.metadata:
        return item.metadata["flag"]
    return f"--{'no-' if item.default is True else ''}{item.name.replace('_', '-')}"


def source_identity(source: str | None) -> dict[str, str]:
    """Config and weights digests of a model argument's files: a folder, a .gguf file, None (the embedded GGUF), or
    a Hub id (its cached snapshot's config and commit, which names every file's content).

    A checkpoint saved by this package records its weights' digest in config.json (verified at load), so only its
    config.json is read; other folders' weight files are hashed.
    """
    location, gguf_file = split_source(source)
    if gguf_file is not None:
        return {"weights": file_sha256(Path(location) / gguf_file)}
    config = Path(cached_file(location, CONFIG_FILE))
    identity = {"config": file_sha256(config)}
    if not Path(location).is_dir():
        return {**identity, "revision": config.parent.name}
    digest = (saved_config_values(location, {}) or {}).get("weights_digest")
    if digest is None:
        files = sorted(path for pattern in WEIGHT_PATTERNS for path in Path(location).glob(pattern))
        digest = weights_digest({path.name: file_sha256(path) for path in files})
    return {**identity, "weights": digest}


def loaded_model_identity(model) -> dict[str, str]:
    """Config and weights digests of a model given in memory (Python callers that name no source)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    return {"config": config, "weights": digest.hexdigest()}


def data_digests(sources: list[str | None]) -> dict[str, str]:
    """sha256 of each data file's content (Hub datasets and None are skipped: their spec is a setting)."""
    return {str(source): file_sha256(source) for source in sources if source is not None and is_file_source(source)}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What determines a run's result: `settings` (flag -> value), `model` (identity digests), `data` (file ->
    sha256). Settings are normalised through JSON, so a fingerprint equals its own saved copy."""

    settings: dict
    model: dict[str, str]
    data: dict[str, str]

    def __post_init__(self):
        object.__setattr__(self, "settings", json.loads(json.dumps(self.settings, default=str)))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def changes(self, saved: dict) -> list[str]:
        """What differs from a saved fingerprint, one phrase per change."""
        before = saved.get("settings", {})
        found = [_setting_change(name, before.get(name), value)
                 for name, value in self.settings.items() if before.get(name) != value]
        found += [f"{name} is no longer set" for name in before if name not in self.settings]
        if saved.get("model") != self.model:
            found.append("the model changed since the interrupted run")
        saved_data = saved.get("data", {})
        found += [f"data file {path} changed since the interrupted run" for path, digest in self.data.items()
                  if path in saved_data and saved_data[path] != digest]
        return found

    def check(self, saved: dict | None, where: str | os.PathLike) -> None:
        """Raise ResumeMismatchError when `saved` (the fingerprint recorded with the progress in `where`, None if
        it has none) is another run's."""
        if saved is None:
            found = ["it has no fingerprint, so it was written by an older version"]
        else:
            found = self.changes(saved)
        if found:
            raise ResumeMismatchError(
                f"{where} holds an interrupted run with different settings, model or data ({'; '.join(found)}); to "
                f"start over, remove {where} or choose another --out"
            )

    def guard(self, folder: str | os.PathLike) -> None:
        """Refuse a state or work folder holding another run's progress, or progress without a fingerprint (an older
        version's). Hidden files are not progress (a fingerprint being written is one)."""
        folder = Path(folder)
        path = folder / FINGERPRINT_FILE
        if path.is_file():
            self.check(json.loads(path.read_text(encoding="utf-8")), folder)
        elif folder.is_dir() and any(not entry.name.startswith(".") for entry in folder.iterdir()):
            self.check(None, folder)

    def record(self, folder: str | os.PathLike) -> None:
        """Write this fingerprint into `folder` unless it holds one: before its first progress, so that a refused
        command leaves no folder behind (only the main one of several processes records)."""
        path = Path(folder) / FINGERPRINT_FILE
        if not path.is_file():
            write_text_atomically(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")


def _setting_change(name: str, before, now) -> str:
    if isinstance(before, bool) and isinstance(now, bool) and name.startswith("--"):
        return f"{name} is {'given now but was not' if now else 'not given now but was'} in the interrupted run"
    return f"{name} changed from {_shown(before)} to {_shown(now)}"


def _shown(value) -> str:
    """A value as it is typed on the command line: lists comma-separated, None as 'unset'."""
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(_shown(item) for item in value)
    return str(value)
