"""Publishing a checkpoint folder on the Hugging Face Hub in one commit, with the card filled in and clear errors.

A push only reads the folder: the card's repo-id placeholder is filled in the uploaded copy, never on disk, so a
failed push leaves the folder exactly as it was. Before anything is sent, the folder gets the checks loading would
apply (config, weight hashes, weights against config) and must hold regular files only: a symbolic link could
otherwise publish a file from elsewhere on this machine.
"""

import json
import os
import stat
from pathlib import Path

import torch
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, StrictDataclassError
from huggingface_hub.utils import httpx
from safetensors import SafetensorError, safe_open
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from .modeling.checkpoint_files import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    CorruptWeightsError,
    _require,
    _weight_file_names,
    check_loading_info,
    saved_config_values,
    verify_weight_files,
)
from .modeling.configuration_amoeba import SUPPORTED_SOURCE_TYPES, AmoebaConfig
from .modeling.model_card import CARD_FILE, fill_repo_id
from .modeling.modeling_amoeba import AmoebaForCausalLM

SPECIAL_FILE_KINDS = {
    stat.S_IFIFO: "named pipe (FIFO)",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


class HubPushError(OSError):
    """The Hub refused a push or the connection broke; the message says why and what to do."""


class PushRefusedError(ValueError):
    """The folder holds a link or special file, or is no model a loader would accept; nothing was sent."""


def check_push_folder(folder: str | os.PathLike) -> list[Path]:
    """The files a push of `folder` uploads, once the folder has passed the checks loading applies.

    Refused, before anything reads a file's content: a symbolic link (the Hub stores files, not links, and a link could
    publish a file from outside the folder; a link inside it is refused too, so that the list is exactly the folder's
    own files) and anything that is not a regular file or folder. Then, as at load: config.json must be a valid
    any-shape config (model_type "amoeba") or a plain `SUPPORTED_SOURCE_TYPES` config, the weight files (every shard
    of a sharded checkpoint) must match `weights_sha256.json` (or be whole safetensors files), that record must be the
    one config.json was saved with (its `weights_digest`), and their tensor names and shapes must be those of the model
    the config builds. Hidden files and folders and `__pycache__` are neither checked nor uploaded.
    Raises `PushRefusedError` or `CheckpointMismatchError` (ValueErrors) or `CorruptWeightsError` (an OSError).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (it has no config.json)")
    files = _regular_files(folder)
    config = _checked_config(folder)
    verify_weight_files(folder, {}, saved_config_values(folder, {}))
    _check_weights_match_config(folder, config)
    return files


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    exist_ok: bool = True,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    files: list[Path] | None = None,
) -> CommitInfo:
    """Upload the files `check_push_folder` accepts (hidden files and caches excepted) to `repo_id` as one commit.

    Creates the repo (refused if it exists and `exist_ok` is False) and the branch `revision` if missing, only once
    the folder has passed the checks. `files` is the list `check_push_folder(folder)` returned, for a caller that showed
    it first (the CLI), so the weights are not hashed twice; by default the folder is checked here. A Hub commit is
    all-or-nothing, so after any error the repo holds none of the files.
    """
    folder = Path(folder)
    files = check_push_folder(folder) if files is None else files
    if token is None and get_token() is None:
        raise HubPushError(
            "no Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with write access"
        )
    api = HfApi(token=token)
    step = "create the repo"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=exist_ok).repo_id
        if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
            step = f"create the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "upload the files"
        return api.create_commit(
            repo_id,
            _upload_operations(folder, files, repo_id),
            commit_message=commit_message or f"Upload {folder.name}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
    except HfHubHTTPError as error:
        raise HubPushError(_explain(error, repo_id, api.endpoint, step)) from error
    except httpx.TransportError as error:
        raise HubPushError(
            f"lost the connection to {api.endpoint} while trying to {step} for {repo_id} "
            f"({type(error).__name__}: {error}); a Hub commit is all-or-nothing, so retry the push"
        ) from error


def _stays_local(name: str) -> bool:
    """Hidden files and folders (.git, .amoeba_cache) and Python caches are never uploaded."""
    return name.startswith(".") or name == "__pycache__"


def _raise(error: OSError) -> None:
    raise error


def _regular_files(folder: Path) -> list[Path]:
    """Every file to upload, in path order; a symbolic link or special file among them is refused, never followed."""
    root = folder.resolve()
    files = []
    for directory, subfolders, names in os.walk(folder, onerror=_raise):
        subfolders[:] = [name for name in subfolders if not _stays_local(name)]
        for name in subfolders + [name for name in names if not _stays_local(name)]:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                target = path.resolve()
                inside = root in (target, *target.parents)
                where = ", and the Hub stores no links" if inside else " outside the folder"
                raise PushRefusedError(
                    f"{path} is a symbolic link to {target}{where}; copy the file in or remove the link"
                )
            if stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                kind = SPECIAL_FILE_KINDS.get(stat.S_IFMT(mode), "special file")
                raise PushRefusedError(f"{path} is a {kind}, not a regular file; remove it from the folder")
    return sorted(files, key=lambda path: path.relative_to(folder).as_posix())


def _checked_config(folder: Path) -> PreTrainedConfig:
    """The config a loader would build from config.json: any-shape, or plain of a supported family, and valid."""
    path = folder / "config.json"
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PushRefusedError(f"{path} is not valid JSON ({error}); save the model again") from error
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if model_type != "amoeba" and model_type not in SUPPORTED_SOURCE_TYPES:
        raise PushRefusedError(
            f"{folder} holds no model amoeba can publish (config.json has model_type {model_type!r}); valid: an "
            f"any-shape checkpoint (model_type 'amoeba') or a plain subnet ({', '.join(SUPPORTED_SOURCE_TYPES)})"
        )
    config_class = AmoebaConfig if model_type == "amoeba" else CONFIG_MAPPING[model_type]
    try:
        return config_class.from_dict(fields)
    except (ValueError, TypeError, StrictDataclassError) as error:
        detail = " ".join(str(error).split())
        raise PushRefusedError(f"{path} is not a valid {model_type} config: {detail}") from error


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads: the shards of the index if there is one, else the single file."""

    def locate(name: str) -> str | None:
        return str(folder / name) if (folder / name).is_file() else None

    names = _weight_file_names(folder, locate, None)
    if not names:
        raise PushRefusedError(
            f"{folder} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}: a loader would find no weights (only safetensors "
            "weights are published); save the model with save_pretrained"
        )
    return [Path(_require(locate, name, folder, WEIGHTS_INDEX_FILE)) for name in names]


def _stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every stored tensor, read from the safetensors headers (no tensor is loaded)."""
    shapes = {}
    for path in _weight_files(folder):
        try:
            with safe_open(path, framework="pt") as file:
                shapes.update((key, tuple(file.get_slice(key).get_shape())) for key in file.keys())
        except SafetensorError as error:
            raise CorruptWeightsError(
                f"{path.name} of {folder} is not a valid safetensors file ({error}); save the model again"
            ) from error
    return shapes


def _empty_model(config: PreTrainedConfig) -> PreTrainedModel:
    """The model the config describes, on the meta device: its parameter names and shapes, no memory, no init."""
    with torch.device("meta"), init.no_init_weights():
        if isinstance(config, AmoebaConfig):
            return AmoebaForCausalLM(config)
        return AutoModelForCausalLM.from_config(config)


def _check_weights_match_config(folder: Path, config: PreTrainedConfig) -> None:
    """Refuse weights missing, left over or of another shape than the config's model has, as loading would.

    A tied weight (lm_head with tied embeddings) is not stored, so its absence is fine.
    """
    stored = _stored_shapes(folder)
    model = _empty_model(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    loading_info = {
        "missing_keys": expected.keys() - stored.keys() - set(model.all_tied_weights_keys),
        "unexpected_keys": stored.keys() - expected.keys(),
        "mismatched_keys": [key for key in expected.keys() & stored.keys() if expected[key] != stored[key]],
    }
    check_loading_info(folder, expected, loading_info)


def _upload_operations(folder: Path, files: list[Path], repo_id: str) -> list[CommitOperationAdd]:
    """One addition per checked file; the card names the repo."""
    operations = []
    for path in files:
        relative = path.relative_to(folder).as_posix()
        content = path
        if relative == CARD_FILE:
            content = fill_repo_id(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=content))
    return operations


def _explain(error: HfHubHTTPError, repo_id: str, endpoint: str, step: str) -> str:
    """One line for the HTTP failures users hit, with the server's own words for the rest."""
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return (
            f"the Hub at {endpoint} rejected your token (HTTP 401): run `hf auth login` again or set HF_TOKEN "
            "to a valid token with write access"
        )
    if status == 403:
        return (
            f"your token may not write to {repo_id} (HTTP 403): use a token with write access to the "
            f"'{repo_id.split('/')[0]}' namespace"
        )
    if status == 409 and step == "create the repo":
        return f"{repo_id} already exists on {endpoint}; pass --exist-ok (Python: exist_ok=True) to add a commit to it"
    detail = " ".join((error.server_message or str(error)).split())
    return f"the Hub failed to {step} for {repo_id} (HTTP {status}: {detail}); no files were committed, retry the push"


__all__ = ["HubPushError", "PushRefusedError", "check_push_folder", "push_folder"]
