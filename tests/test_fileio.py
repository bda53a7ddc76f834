"""olmoe.fileio: atomic, durable writes of files and directories."""

import os
from pathlib import Path

import pytest

from olmoe.fileio import (
    atomic_directory,
    atomic_path,
    move_into_directory,
    replace_directory,
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


def test_move_into_a_missing_directory_renames_it(tmp_path):
    staging = make_dir(tmp_path / ".run.partial", {"config.json": "new"})
    move_into_directory(staging, tmp_path / "run")
    assert contents(tmp_path / "run") == {"config.json": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
