"""Shared helpers: tiny random OLMoE models, an offline hub; transformers' side is in parity.py."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from olmoe import OlmoeConfig, OlmoeForCausalLM


def modules_imported_by(code: str, names: Iterable[str]) -> list[str]:
    """Which of the modules `names` a fresh interpreter has imported after running `code`."""
    report = f"print(json.dumps([n for n in {sorted(names)!r} if n in sys.modules]))"
    probe = f"{code}\nimport json, sys\n{report}"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (norms and biases too) random values, so that no feature of the
    model can hide behind an initial value of one or zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * std
        param.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def tiny_model(seed: int = 0, **overrides) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    return randomize(OlmoeForCausalLM(OlmoeConfig.tiny(**overrides)), seed).eval()


def use_offline_hub(monkeypatch, home, cache) -> None:
    """Make huggingface_hub read only the local cache `cache` (with `home` as HF_HOME)."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread: their matrices gain nothing from threads, and
    on a busy machine OpenMP's waiting threads cost more than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


class _FillingFile:
    """A file being written on a disk that fills up: a write beyond the room left writes the
    part that fits and raises ENOSPC, as a real one does."""

    def __init__(self, file, disk: dict):
        self._file, self._disk = file, disk

    def write(self, data):
        room = self._disk["room"]
        self._disk["room"] = max(0, room - len(data))
        if len(data) > room:
            self._file.write(data[:room])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()


def _writes_under(folder: Path, file, mode: str) -> bool:
    named = isinstance(file, (str, os.PathLike))  # not a descriptor (os.fdopen)
    return named and bool(set(mode) & set("wax+")) and Path(file).absolute().is_relative_to(folder)


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(folder, room)`: from now on, files written under `folder` share `room` bytes
    and a write beyond them fails with ENOSPC; safetensors' save_file (which writes from Rust,
    past Python's open) fails there with safetensors' own error for it."""

    def fill(folder: Path, room: int = 0) -> None:
        disk, real_open = {"room": room}, io.open

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return _FillingFile(handle, disk) if _writes_under(folder, file, mode) else handle

        def save_file(tensors, filename, metadata=None):
            data = safetensors.torch.save(tensors, metadata=metadata)
            try:
                with open_(filename, "wb") as file:
                    file.write(data)
            except OSError as exc:  # as safetensors: remove the file, raise its error
                os.unlink(filename)
                raise SafetensorError(
                    f"Error while serializing: I/O error: {exc.strerror} (os error {exc.errno})"
                ) from None

        import olmoe.checkpoint
        import olmoe.train.state

        monkeypatch.setattr(io, "open", open_)
        monkeypatch.setattr(builtins, "open", open_)
        for module in (olmoe.checkpoint, olmoe.train.state):
            monkeypatch.setattr(module, "save_file", save_file)

    return fill


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty directory that refuses writes: mode 0o555, or, for root (whom modes do not
    stop), a read-only tmpfs mounted on it; skipped where root may not mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    command = ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]
    mounted = shutil.which("mount") and subprocess.run(command, capture_output=True, check=False)
    if not mounted or mounted.returncode:
        pytest.skip("a read-only directory: root cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)
