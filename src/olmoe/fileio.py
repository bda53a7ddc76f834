"""Writing files and directories so that a reader never sees a half-written one.

Everything olmoe writes for users to keep (checkpoints, training state, configs, tokenizers,
token files, results, plots, counts) is written under a temporary name beside its final one and
renamed into place: an interrupted run leaves either the old version or the new one, never a
truncated file or a half-filled directory under the final name.

Every write is also durable: the new data is flushed to disk (fsync) before the rename, and the
rename after it. Without that a crash or power cut soon after a write can leave the final name
pointing at empty or partial data, which for training is the worst case: once `latest` names a
new checkpoint the older ones are deleted. The flushes cost milliseconds a file, little next to
the work that produced any of these files, so all writes follow the one rule.

A write that fails for want of space or permission (a full disk or quota, a read-only mount)
raises an OSError that names the output, not its hidden temporary, and says when an earlier
version of it is still there, unchanged: one line a user can act on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path

from safetensors import SafetensorError

# Failures only a write raises (a full disk or quota, a file too large, a read-only mount): in
# a block that also reads, other errors may be the input's, and keep their own message.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it becomes `path`, when it
    fails it is removed. The file gets a plain file's permissions, not mkstemp's private ones."""
    path = Path(path)
    with _naming_failures(path, every_error=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f"{path.suffix}.partial", dir=path.parent
        )
    os.close(handle)
    temporary = Path(name)
    try:
        with _naming_failures(path):
            yield temporary
            default_permissions(temporary)
            _sync(temporary)
            os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _sync(path.parent)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    with atomic_path(path) as temporary:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging directory beside `final`; when the block succeeds it replaces
    `final` (see replace_directory), when it fails it is removed and `final` is left as it was."""
    with staging_directory(final) as staging:
        yield staging
        replace_directory(staging, final)


@contextlib.contextmanager
def staging_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a new, empty, hidden directory beside `final` (on its file system, so that it can
    be renamed into place), with a plain directory's permissions. Whatever is still in it when
    the block ends is removed."""
    final = Path(final)
    with _naming_failures(final, every_error=True):
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        )
    try:
        with _naming_failures(final):
            default_permissions(staging)
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_directory(staging: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished directory `staging` to `final`. An existing `final` is moved aside
    and deleted only once the new one is in place, or put back if the rename fails; between the
    two renames it waits in a hidden `.old` directory beside `final`."""
    staging, final = Path(staging), Path(final)
    _sync_tree(staging)
    with _set_aside(final):
        os.replace(staging, final)
    _sync(final.parent)


def move_into_directory(
    staging: str | os.PathLike, final: str | os.PathLike, last: Collection[str] = ()
) -> None:
    """Move each entry of the finished directory `staging` into `final`, replacing those of the
    same name and keeping the others (a model saved into a directory that also holds a
    tokenizer or a training run). Each entry is replaced atomically, the set of them is not, so
    the entries named in `last` go in after all the others: those that make `final` look
    complete (a model's weights) never arrive before what they need (its config). A missing
    `final` is `staging` renamed."""
    staging, final = Path(staging), Path(final)
    if not final.exists():
        replace_directory(staging, final)
        return
    _sync_tree(staging)
    for entry in sorted(staging.iterdir(), key=lambda entry: entry.name in last):
        os.replace(entry, final / entry.name)
    _sync(final)


def check_writable(path: str | os.PathLike) -> None:
    """Fail at once, with the error the write itself would give, if `path` cannot be written (a
    read-only mount, a folder without write permission): before the work, not after it."""
    path = Path(path)
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    with _naming_failures(path, every_error=True):
        tempfile.TemporaryFile(dir=folder).close()


def default_permissions(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain mkdir (directory) or open (file) would have: mkdtemp,
    mkstemp and safetensors make theirs private to their writer."""
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def safetensors_os_errors() -> Iterator[None]:
    """Raise safetensors' failed writes (a full disk: SafetensorError "... (os error 28)") as
    the OSError they stand for, so that cleanups and the command line's one-line errors treat
    them as any other failed write."""
    try:
        yield
    except SafetensorError as exc:
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from exc


@contextlib.contextmanager
def _naming_failures(final: Path, every_error: bool = False) -> Iterator[None]:
    """Raise a write error in the block as one about `final` (see the module docstring).
    `every_error`: the block only creates the temporary, so any OSError is the output's."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or not (every_error or exc.errno in _WRITE_ERRNOS):
            raise
        kept = f"; the earlier {final.name} is unchanged" if final.exists() else ""
        message = f"cannot write {final} ({os.strerror(exc.errno)}){kept}"
        raise OSError(exc.errno, message) from exc


@contextlib.contextmanager
def _set_aside(final: Path) -> Iterator[None]:
    """Keep an existing `final` in a hidden directory beside it while the block runs: deleted if
    the block succeeds, put back if it fails."""
    if not final.exists():
        yield
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.replace(final, aside / final.name)
    try:
        yield
    except BaseException:
        os.replace(aside / final.name, final)
        aside.rmdir()  # not in a finally: if putting it back fails, the old one stays here
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _sync_tree(root: Path) -> None:
    """Flush every file and directory in `root`, and `root` itself, to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            _sync(Path(directory, name))
        _sync(Path(directory))


def _sync(path: Path) -> None:
    """Flush `path` (a file's data, or a directory's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _umask() -> int:
    # Reading the umask means setting it: set it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return umask
