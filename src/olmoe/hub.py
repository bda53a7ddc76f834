"""Where a checkpoint's files are: a local directory (or one of a training run's revisions), or
the local snapshot of a hub repo, downloaded if needed. Importable without torch, so that the
tokenizer, and the `olmoe data` commands that use it, load without it."""

from __future__ import annotations

import os
from pathlib import Path

HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def resolve_checkpoint_dir(
    path_or_repo_id: str | os.PathLike, revision: str | None = None, weights: bool = True
) -> Path:
    """A local checkpoint directory, or the local snapshot of a hub repo (downloaded if needed).
    In a training run's directory `revision` picks one of its revisions (olmoe.revisions)."""
    from olmoe.revisions import resolve_local_revision

    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path if revision is None else resolve_local_revision(path, revision)
    text = str(path_or_repo_id)
    if path.exists() or looks_local(text):
        raise FileNotFoundError(
            f"no checkpoint directory at {text}: pass a directory holding config.json and "
            "*.safetensors, or a hub repo id such as allenai/OLMoE-1B-7B-0924"
        )
    return download(text, revision, HUB_FILE_PATTERNS if weights else ["*.json"])


def looks_local(text: str) -> bool:
    """Whether a MODEL argument names a path rather than a hub repo id (`owner/name`)."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1


def download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """The local snapshot of the files of hub repo `repo_id` that match `patterns`."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except HFValidationError as exc:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local directory nor a valid hub repo id ({exc})"
        ) from exc
    except Exception as exc:  # network, authentication, unknown repo or revision
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise OSError(
            f"could not get {where} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Check the repo id and revision and your network, or pass a local directory"
        ) from exc
