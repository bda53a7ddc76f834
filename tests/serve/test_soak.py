"""A short soak of `olmoe serve` (bench/serve_soak.py for SOAK_S seconds): concurrent clients
mixing streamed and plain completions and chat with random sampling, dropped streams, cancelled
requests, requests over every limit, malformed bodies and bursts beyond the queue; then SIGTERM
under load. No 5xx but load shedding, no busy row left, flat memory, a clean drain."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_scripts import bench_script
from tests.serve.servers import QUICK_START_ENV, save_checkpoint

SOAK_S = 25
CLIENTS = 8


@pytest.fixture(scope="module")
def soak_module():
    with bench_script("serve_soak") as module:
        yield module


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_soak_then_sigterm_drains(soak_module, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "model", 256)
    with open(tmp_path / "server.log", "w") as log:
        process, url = soak_module.start_server(checkpoint, "fp32", log, QUICK_START_ENV)
    try:
        result = soak_module.soak(process, url, SOAK_S, CLIENTS, seed=0)
    finally:
        process.kill()
    print(soak_module.summary(result))  # the figures, with pytest -s
    assert result["failures"] == [], soak_module.summary(result)
    kinds = result["by_kind"]
    for kind in soak_module.MIX:  # the mix reached every kind of request
        assert kinds.get(kind, 0) > 0, kind
    assert result["served_200"] > 100
