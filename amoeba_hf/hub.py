"""Publishing a checkpoint folder on the Hugging Face Hub in one commit, with the card filled in and clear errors.

A push only reads the folder: the card's repo-id placeholder is filled in the uploaded copy, never on disk, so a
failed push leaves the folder exactly as it was.
"""

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import httpx

from .modeling.model_card import CARD_FILE, fill_repo_id


class HubPushError(OSError):
    """The Hub refused a push or the connection broke; the message says why and what to do."""


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
) -> CommitInfo:
    """Upload every file of a checkpoint folder (hidden files and caches excepted) to `repo_id` as one commit.

    Creates the repo (refused if it exists and `exist_ok` is False) and the branch `revision` if missing. A Hub
    commit is all-or-nothing, so after any error the repo holds none of the files.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (it has no config.json)")
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
            _upload_operations(folder, repo_id),
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


def _upload_operations(folder: Path, repo_id: str) -> list[CommitOperationAdd]:
    """One addition per file; hidden files, caches and staging folders stay local; the card names the repo."""
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") or part == "__pycache__" for part in relative.parts):
            continue
        content = path
        if relative.as_posix() == CARD_FILE:
            content = fill_repo_id(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
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


__all__ = ["HubPushError", "push_folder"]
