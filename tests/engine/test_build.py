"""The kernels must build where they can run: a failed build only warns at run time (the engine
then leaves everything to PyTorch), so without this test a broken cpu.cpp would just skip the
kernel tests. And a build or load killed half-way must never stop later processes."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from olmoe.engine import native

needs_kernels = pytest.mark.skipif(
    native.back_end() is None or shutil.which("c++") is None,
    reason="neither AVX-512 BF16/VNNI nor AVX2/FMA/F16C, or no C++ compiler: no kernels expected",
)
LOADS = "from olmoe.engine import native; print(native.compiled() is not None)"


@needs_kernels
def test_kernels_build_on_a_cpu_that_has_what_they_need(monkeypatch):
    monkeypatch.delenv("OLMOE_KERNELS", raising=False)
    assert native.compiled() is not None


def _load_in_a_new_process(environment, timeout=120) -> str:
    result = subprocess.run(
        [sys.executable, "-c", LOADS], env=environment, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@needs_kernels
def test_a_lock_left_by_a_killed_process_does_not_stop_the_next_ones(monkeypatch):
    """torch's build lock is a plain file, which a process killed while holding it leaves
    behind: a built library loads without it, and a new build never waits on one."""
    monkeypatch.delenv("OLMOE_KERNELS", raising=False)
    assert native.compiled() is not None  # built
    library = native.library_path(native.back_end())
    (library.parent / "lock").touch()
    (library.parent / "staging").mkdir(exist_ok=True)
    (library.parent / "staging" / "lock").touch()
    assert _load_in_a_new_process({**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60) == "True"


@needs_kernels
@pytest.mark.slow
def test_a_build_killed_half_way_leaves_nothing_that_stops_the_next(tmp_path):
    """Kill a first build (in a fresh cache) during compilation; the next process builds."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "OLMOE_CACHE": str(tmp_path)}
    environment.pop("OLMOE_KERNELS", None)
    first = subprocess.Popen(
        [sys.executable, "-c", LOADS], env=environment, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("kernels/*/staging/lock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp_path.glob("kernels/*/staging/lock")), "the build never started"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not list(tmp_path.glob("kernels/*/*.so"))  # nothing half-written in place
    assert _load_in_a_new_process(environment, timeout=600) == "True"
