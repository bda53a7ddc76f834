"""Intermediate checkpoints as revisions, named as the released model's are.

On the hub each intermediate checkpoint of OLMoE-1B-7B-0924 is a branch named after its step and
the tokens trained on, in whole billions rounded down (`step10000-tokens41B`: 10,000 steps of
4,194,304 tokens, 41.9B), beside `main`, the final model. A training run with
`checkpoint.revisions_every` keeps the same in its directory:

    RUN/                             the final model: revision `main`
    RUN/revisions/step{N}-tokens{M}B the model after step N (hub layout), never rotated away

`resolve_local_revision` picks one of them for `from_pretrained(RUN, revision=...)`;
`list_revisions` lists a run's revisions or a hub repo's branches (`olmoe revisions`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from olmoe.errors import CheckpointError, InputError
from olmoe.hub import looks_local

REVISIONS_DIR = "revisions"
MAIN = "main"
_NAME = re.compile(r"step(\d+)-tokens(\d+)B")


@dataclass(frozen=True)
class Revision:
    name: str
    step: int | None  # read from the name; None for `main` and other names
    tokens_billions: int | None  # likewise: whole billions, rounded down
    size: int | None = None  # bytes of its weights (*.safetensors); None for hub branches


def revision_name(step: int, tokens: int) -> str:
    """The hub's name for the model after `step` steps and `tokens` tokens. The hub rounds the
    tokens down to whole billions, so every revision of a run under a billion tokens is named
    tokens0B; the step keeps the names apart."""
    return f"step{step}-tokens{tokens // 10**9}B"


def parse_revision(name: str) -> Revision:
    match = _NAME.fullmatch(name)
    if match is None:
        return Revision(name, None, None)
    return Revision(name, int(match.group(1)), int(match.group(2)))


def resolve_local_revision(directory: Path, revision: str) -> Path:
    """The directory of `revision` in a run directory: `main` is the run's final model, a
    `step{N}-tokens{M}B` name its subfolder of revisions/."""
    if not (directory / REVISIONS_DIR).is_dir():
        raise InputError(
            f"revision={revision!r} selects a branch of a hub repo or a training run's "
            f"{REVISIONS_DIR}/, but {directory} is a local directory without {REVISIONS_DIR}/: "
            "drop revision, pass the repo id, or train with checkpoint.revisions_every"
        )
    if revision == MAIN:
        return directory
    names = [r.name for r in local_revisions(directory)]
    if revision not in names:  # also refuses names that would leave revisions/ (../x)
        raise CheckpointError(
            f"{directory} has no revision {revision!r}; its revisions are "
            f"{', '.join(names) or 'none yet'}"
        )
    return directory / REVISIONS_DIR / revision


def local_revisions(directory: Path) -> list[Revision]:
    """`main` (when the run has saved its final model) and the complete revisions under
    revisions/, in order of step. Staging directories of an unfinished save are hidden."""
    found = sorted(
        (
            replace(parse_revision(path.name), size=_weights_size(path))
            for path in (directory / REVISIONS_DIR).glob("*")
            if not path.name.startswith(".") and (path / "config.json").is_file()
        ),
        key=_order,
    )
    if (directory / "config.json").is_file():
        found.insert(0, Revision(MAIN, None, None, _weights_size(directory)))
    return found


def hub_revisions(repo_id: str) -> list[Revision]:
    """The branches of a hub repo, in order of step (`main` and other names first)."""
    from huggingface_hub import HfApi

    try:
        # A new HfApi takes huggingface_hub's configured endpoint (HF_ENDPOINT) as it is now;
        # the module-level list_repo_refs fixed it when huggingface_hub was imported.
        refs = HfApi().list_repo_refs(repo_id)
    except Exception as exc:  # network, authentication, unknown repo, malformed id
        raise OSError(
            f"could not list the revisions of {repo_id} on the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Check the repo id and your network, or pass a "
            "run directory"
        ) from exc
    return sorted((parse_revision(branch.name) for branch in refs.branches), key=_order)


def list_revisions(path_or_repo_id: str | os.PathLike) -> list[Revision]:
    """A run directory's revisions, or a hub repo's branches."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return local_revisions(path)
    if path.exists() or looks_local(str(path_or_repo_id)):
        raise FileNotFoundError(
            f"no run directory at {path_or_repo_id}: pass a training run's directory or a hub "
            "repo id such as allenai/OLMoE-1B-7B-0924"
        )
    return hub_revisions(str(path_or_repo_id))


def _order(revision: Revision) -> tuple:
    return (revision.step is not None, revision.step or 0, revision.name)


def _weights_size(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))
