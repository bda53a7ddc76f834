"""olmoe.fileio: atomic, durable writes of files and directories."""

import errno
import os
from pathlib import Path

import pytest
from safetensors import SafetensorError

from olmoe.fileio import (
    _naming_failures,
    atomic_directory,
    atomic_path,
    check_writable,
    move_into_directory,
    replace_directory,
    safetensors_os_errors,
    write_atomic,
)


def contents(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): p.read_text() for p in directory.rglob("*") if p.is_file()
    }


def make_dir(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@pytest.fixture
def fsyncs(monkeypatch):
    """The paths os.fsync is called on, in order."""
    calls = []
    real_fsync = os.fsync

    def fsync(descriptor):
        calls.append(Path(os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_write_atomic_replaces_the_file(tmp_path):
    path = tmp_path / "sub" / "result.json"
    write_atomic(path, "old")
    assert write_atomic(path, b"new") == path
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_written_file_has_plain_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "text")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_failure_in_the_block_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_a_file_is_flushed_before_the_rename_and_the_rename_after(tmp_path, fsyncs):
    path = tmp_path / "latest"
    write_atomic(path, "step-00000010\n")
    file, directory = fsyncs
    assert file.parent == tmp_path and file.name.endswith(".partial")
    assert directory == tmp_path


def test_atomic_directory_replaces_the_directory(tmp_path):
    final = make_dir(tmp_path / "out", {"old.npy": "old", "metadata.json": "old"})
    with atomic_directory(final) as staging:
        make_dir(staging, {"train.npy": "new", "metadata.json": "new"})
    assert contents(final) == {"train.npy": "new", "metadata.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # neither staging nor the old one


def test_atomic_directory_has_plain_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "a").write_text("a")
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_failure_in_the_block_keeps_the_old_directory(tmp_path):
    final = make_dir(tmp_path / "out", {"a": "old"})
    with pytest.raises(KeyboardInterrupt), atomic_directory(final) as staging:
        (staging / "a").write_text("new")
        raise KeyboardInterrupt
    assert contents(final) == {"a": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(OSError), atomic_directory(tmp_path / "out") as staging:
        (staging / "a").write_text("new")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_the_old_directory_is_kept_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "ckpt", {"a": "old"})
    staging = make_dir(tmp_path / ".ckpt.partial", {"a": "new"})
    real_replace = os.replace
    seen = []

    def failing_replace(source, destination):
        if Path(source) == staging:  # the moment the new one would go in: where is the old?
            seen.extend(contents(p) for p in tmp_path.glob(".ckpt.*.old/ckpt"))
            raise OSError("rename failed")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        replace_directory(staging, final)
    assert seen == [{"a": "old"}]
    assert contents(final) == {"a": "old"}  # put back
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.partial", "ckpt"]

    monkeypatch.undo()
    replace_directory(staging, final)
    assert contents(final) == {"a": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_directory_is_flushed_before_the_rename_and_the_rename_after(tmp_path, fsyncs):
    staging = make_dir(tmp_path / ".step.partial", {"config.json": "{}", "trainer/state": "{}"})
    replace_directory(staging, tmp_path / "step")
    *before, after = fsyncs
    flushed = {p.relative_to(staging) for p in before}
    assert flushed == {Path("config.json"), Path("trainer/state"), Path("trainer"), Path(".")}
    assert after == tmp_path


def test_move_into_directory_keeps_the_other_entries(tmp_path, fsyncs):
    final = make_dir(tmp_path / "run", {"config.json": "old", "log.jsonl": "log"})
    staging = make_dir(tmp_path / ".run.partial", {"config.json": "new", "model": "weights"})
    move_into_directory(staging, final)
    assert contents(final) == {"config.json": "new", "log.jsonl": "log", "model": "weights"}
    assert fsyncs[-1] == final


def test_move_into_directory_moves_the_last_names_last(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "run", {"log.jsonl": "log"})
    staging = make_dir(tmp_path / ".run.partial", {"model": "w", "config.json": "{}", "t": "t"})
    moved, real_replace = [], os.replace

    def replace(source, destination):
        moved.append(Path(source).name)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    move_into_directory(staging, final, last=("model",))
    assert moved[-1] == "model" and sorted(moved) == ["config.json", "model", "t"]


def test_move_into_a_missing_directory_renames_it(tmp_path):
    staging = make_dir(tmp_path / ".run.partial", {"config.json": "new"})
    move_into_directory(staging, tmp_path / "run")
    assert contents(tmp_path / "run") == {"config.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


# ---------------------------------------------------------------------------- failed writes
def test_a_write_error_names_the_output_and_what_is_kept(tmp_path):
    final = tmp_path / "results.json"
    with pytest.raises(OSError) as caught, _naming_failures(final):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".results.x.partial"))
    assert caught.value.errno == errno.ENOSPC
    assert str(caught.value) == f"[Errno 28] cannot write {final} (No space left on device)"
    final.write_text("old")
    with pytest.raises(OSError, match=r"\(Read-only file system\); the earlier results.json is "
                       "unchanged$"), _naming_failures(final):  # fmt: skip
        raise OSError(errno.EROFS, "Read-only file system")


def test_other_errors_keep_their_own_message_unless_every_error_is_the_outputs(tmp_path):
    final = tmp_path / "out"
    for error in (OSError(errno.ENOENT, "No such file", "input.txt"), OSError("no errno")):
        with pytest.raises(OSError) as caught, _naming_failures(final):
            raise error
        assert caught.value is error  # an input's error, say: not the output's to explain
    with pytest.raises(OSError, match=r"cannot write .*out \(Permission denied\)"), \
            _naming_failures(final, every_error=True):  # fmt: skip
        raise OSError(errno.EACCES, "Permission denied")


def test_a_full_disk_keeps_the_old_file_and_no_temporary(tmp_path, full_disk):
    path = tmp_path / "results.json"
    write_atomic(path, "old")
    full_disk(tmp_path, room=3)
    with pytest.raises(OSError, match="the earlier results.json is unchanged") as caught:
        write_atomic(path, "new results")
    assert caught.value.errno == errno.ENOSPC
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_full_disk_keeps_the_old_directory_and_no_staging(tmp_path, full_disk):
    final = make_dir(tmp_path / "tokens", {"train.npy": "old"})
    full_disk(tmp_path, room=10)
    with (
        pytest.raises(OSError, match=r"tokens \(No space left on device\); the earlier"),
        atomic_directory(final) as staging,
        open(staging / "train.npy", "w") as file,
    ):
        file.write("more than ten bytes")
    assert contents(final) == {"train.npy": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["tokens"]


def test_safetensors_write_errors_become_os_errors():
    with pytest.raises(OSError) as caught, safetensors_os_errors():
        raise SafetensorError("Error while serializing: I/O error: No space left (os error 28)")
    assert caught.value.errno == errno.ENOSPC
    assert isinstance(caught.value.__cause__, SafetensorError)
    with pytest.raises(SafetensorError), safetensors_os_errors():  # not a write's: kept
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")


def test_check_writable_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "results.json")  # from the nearest folder
    check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_check_writable_refuses_a_read_only_folder(read_only_dir):
    with pytest.raises(OSError, match=r"cannot write .*/read-only/out/a.json \(") as caught:
        check_writable(read_only_dir / "out" / "a.json")
    assert caught.value.errno in (errno.EROFS, errno.EACCES)
