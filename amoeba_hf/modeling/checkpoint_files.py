"""What a checkpoint carries beside its weights, and the checks that make a broken checkpoint fail at load.

`save_pretrained` records the sha256 of every weight file in `weights_sha256.json` (each shard and the shards' index
of a sharded save); `from_pretrained` verifies it, so a file with flipped bytes is refused instead of loading silently
wrong weights, and a missing shard is refused by name. config.json records the digest of that
record and of its own weight-layout fields (`weight_layout`), so weight files of another stage (an uncalibrated model's
weights copied into a calibrated folder, whose config.json says how the weights are permuted, with or without their
record) and a hand-edited `attention_unit` are refused too. A checkpoint without the record still gets a structural
check of each safetensors file, which catches truncation, and, if its config.json has a digest, a check of the files
against it. After loading,
weights the config expects but the checkpoint lacks, or holds but the config does not describe (a config.json claiming
7 layers over 6-layer weights), are refused too, instead of being filled with random values or dropped.

This file travels with every checkpoint (trust_remote_code), so it imports only the standard library and transformers.
"""

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from pathlib import Path

from transformers.utils import cached_file

from .configuration_amoeba import weight_layout

CONFIG_FILE = "config.json"
WEIGHT_HASHES_FILE = "weights_sha256.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
CALIBRATION_BUFFERS = ("input_mean", "neuron_importance", "group_importance", "slot_importance")
SHOWN_KEYS = 6
DOWNLOAD_OPTIONS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class CorruptWeightsError(OSError):
    """A weight file differs from what was saved (flipped bytes, truncation): re-download it or save again."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's weights do not match its config.json: weights are missing or left over."""


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary sibling and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(hashes: dict[str, str], layout: Mapping[str, Any] | None = None) -> str:
    """One sha256 for a set of weight files, from their names and digests, and for the config's `layout` (its
    `weight_layout`, which says what the weights mean): what config.json records as `weights_digest`."""
    payload = hashes if layout is None else {"files": hashes, "layout": dict(layout)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def record_weight_hashes(folder: str | os.PathLike) -> Path:
    """Write `weights_sha256.json`: the sha256 of every safetensors file in `folder` (each shard of a sharded save)
    and of the shards' index, which says where each tensor lives, and their `weights_digest` (with config.json's
    `weight_layout`) into the folder's config.json. config.json is written before the weights, so the digest is added
    to it afterwards."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if (folder / WEIGHTS_INDEX_FILE).is_file():
        files.append(folder / WEIGHTS_INDEX_FILE)
    hashes = {path.name: file_sha256(path) for path in files}
    path = folder / WEIGHT_HASHES_FILE
    write_text_atomically(path, json.dumps(hashes, indent=2, sort_keys=True) + "\n")
    config_path = folder / CONFIG_FILE
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["weights_digest"] = weights_digest(hashes, weight_layout(config))
        write_text_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def verify_weight_files(source: str | os.PathLike, load_kwargs: dict, saved: Mapping[str, Any] | None = None) -> None:
    """Refuse weight files of `source` (a folder or a Hub id) that differ from the hashes recorded at save, or that
    are not whole safetensors files, or (given the values `saved` of config.json, which name the weights it was saved
    with in `weights_digest`) that are not the ones config.json was saved with, or whose config.json's weight layout
    was edited since. Without the record the files themselves are hashed for that comparison. Files are fetched with
    the download options of `from_pretrained`'s `load_kwargs`, so loading then finds them in the cache.
    """
    download = {key: load_kwargs[key] for key in DOWNLOAD_OPTIONS if key in load_kwargs}

    def locate(name: str) -> str | None:
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False, **download)

    record = locate(WEIGHT_HASHES_FILE)
    if record is not None:
        try:
            hashes = json.loads(Path(record).read_text(encoding="utf-8"))
        except ValueError:
            hashes = None
        if not isinstance(hashes, dict):
            raise CorruptWeightsError(
                f"{WEIGHT_HASHES_FILE} of {source} is not a JSON object of file names and sha256 digests; re-download "
                "the checkpoint or save it again"
            )
        for name, expected in hashes.items():
            if file_sha256(_require(locate, name, source, WEIGHT_HASHES_FILE)) != expected:
                raise CorruptWeightsError(
                    f"{name} of {source} is corrupt or truncated: its sha256 differs from the one recorded in "
                    f"{WEIGHT_HASHES_FILE} when it was saved; re-download the checkpoint or save it again"
                )
        origin = WEIGHT_HASHES_FILE
    else:
        index_name = _variant_names(load_kwargs.get("variant"))[1]
        names = _weight_file_names(source, locate, load_kwargs.get("variant"))
        paths = {name: _require(locate, name, source, "its weight index") for name in names}
        for name, path in paths.items():
            _check_safetensors_layout(path, name, source)
        index = locate(index_name)
        if index is not None:
            paths[index_name] = index
        hashes = {name: file_sha256(path) for name, path in paths.items()}
        origin = f"its weight files (it has no {WEIGHT_HASHES_FILE})"
    expected_digest = (saved or {}).get("weights_digest")
    if expected_digest is not None and weights_digest(hashes, weight_layout(saved)) != expected_digest:
        layout = ", ".join(f"{key}={value!r}" for key, value in weight_layout(saved).items()) or "all defaults"
        raise CheckpointMismatchError(
            f"the weights of {source} are not the ones this config.json was saved with: its weights_digest "
            f"{expected_digest[:12]} names the weight files saved with it and its weight layout ({layout}), which "
            f"{origin} do not match (weights of another stage or model copied in, or config.json's layout edited, "
            "which only calibration changes); put back the weights and config.json saved together"
        )


def saved_config_values(source: str | os.PathLike, load_kwargs: dict) -> dict[str, Any] | None:
    """The values in `source`'s config.json: None when it has none or it is not a JSON object."""
    download = {key: load_kwargs[key] for key in DOWNLOAD_OPTIONS if key in load_kwargs}
    path = cached_file(source, CONFIG_FILE, _raise_exceptions_for_missing_entries=False, **download)
    if path is None:
        return None
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def check_loading_info(source: str | os.PathLike, expected_keys: Iterable[str], loading_info: dict) -> None:
    """Refuse a load whose checkpoint lacks weights the config expects or holds weights the config does not describe.

    A plain Llama checkpoint has no calibration buffers and no LoRA experts: a group of these that is missing as a whole
    is legitimately filled by `_init_weights` (zeros; LoRA A random, B zero), so the function is the source model's.
    """
    missing = set(loading_info.get("missing_keys", ()))
    expected = set(expected_keys)
    for group in (_is_calibration_buffer, _is_expert):
        members = {key for key in expected if group(key)}
        if members and members <= missing:
            missing -= members
    mismatched = {_key_name(key) for key in loading_info.get("mismatched_keys", ())}
    problems = [
        (missing, "weights the config expects are missing from the checkpoint"),
        (set(loading_info.get("unexpected_keys", ())), "weights in the checkpoint are not part of the config's model"),
        (mismatched, "weights have another shape in the checkpoint than in the config"),
    ]
    described = [f"{len(keys)} {what} ({_summary(keys)})" for keys, what in problems if keys]
    if described:
        raise CheckpointMismatchError(
            f"the weights of {source} do not match its config.json: {'; '.join(described)}. The checkpoint is "
            "incomplete or its config.json was edited: re-download it or save the model again"
        )


def _key_name(entry: str | tuple) -> str:
    """Mismatched keys come as (name, checkpoint shape, model shape)."""
    return entry[0] if isinstance(entry, tuple) else entry


def _is_calibration_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in CALIBRATION_BUFFERS


def _is_expert(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or ".shape_router." in f".{key}"


def _summary(keys: set[str]) -> str:
    """The first few names in natural order (layer 10 after layer 9), then how many more."""
    ordered = sorted(keys, key=lambda key: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)])
    shown = ", ".join(ordered[:SHOWN_KEYS])
    return shown if len(ordered) <= SHOWN_KEYS else f"{shown} and {len(ordered) - SHOWN_KEYS} more"


def _require(locate: Callable[[str], str | None], name: str, source: str | os.PathLike, listed_in: str) -> str:
    path = locate(name)
    if path is None:
        raise CorruptWeightsError(f"{source} has no {name}, which {listed_in} lists; re-download the checkpoint")
    return path


def _variant_names(variant: str | None) -> tuple[str, str]:
    """The single weight file's and the shard index's names for a `variant` ("fp16": model.fp16.safetensors)."""
    if not variant:
        return WEIGHTS_FILE, WEIGHTS_INDEX_FILE
    infix = f".{variant}.safetensors"
    return WEIGHTS_FILE.replace(".safetensors", infix), WEIGHTS_INDEX_FILE.replace(".safetensors", infix)


def _weight_file_names(
    source: str | os.PathLike, locate: Callable[[str], str | None], variant: str | None
) -> list[str]:
    """The safetensors files transformers will load: the shards of the index if there is one, else the single file."""
    single, index_name = _variant_names(variant)
    index = locate(index_name)
    if index is None:
        return [single] if locate(single) is not None else []
    try:
        return sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CorruptWeightsError(
            f"{index_name} of {source} is not a valid weight index ({error}); re-download the checkpoint"
        ) from error


def _check_safetensors_layout(path: str, name: str, source: str | os.PathLike) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the tensors' bytes it declares."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as file:
            header_length = int.from_bytes(file.read(8), "little")
            if size < 8 + header_length:
                raise ValueError("the header is cut short")
            header = json.loads(file.read(header_length))
        data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if size != 8 + header_length + data_end:
            raise ValueError(f"{size:,} bytes where the header declares {8 + header_length + data_end:,}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise CorruptWeightsError(
            f"{name} of {source} is corrupt or truncated ({error}); re-download the checkpoint or save it again"
        ) from error
