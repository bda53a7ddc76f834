"""The CPU inference benchmark's limits and probes: the prefill limit is the fastest GEMM rate
any probe of the run saw; the peak RSS leaves out the probes' own buffers."""

from __future__ import annotations

import pytest
import torch

from olmoe.benchmarks import cpu_inference, engines


def test_matmul_probe_counts_two_flops_per_multiply_add(monkeypatch):
    monkeypatch.setattr(engines, "best_seconds", lambda fn, repeats: 0.5)
    m, k, n = engines.MATMUL_SHAPE
    assert engines.matmul_probe(repeats=1)() == pytest.approx(2 * m * k * n / 0.5 / 1e9)


def test_matmul_probe_times_a_product_of_the_benchmark_shape_in_its_dtype(monkeypatch):
    shapes = []
    real_mm = torch.mm

    def mm(a, b):
        shapes.append((tuple(a.shape), tuple(b.shape), a.dtype))
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", mm)
    assert engines.matmul_probe(repeats=2)() > 0
    m, k, n = engines.MATMUL_SHAPE
    assert shapes == [((m, k), (k, n), engines.matmul_dtype())] * 3  # one untimed, two timed


def decode_stamps(engine, ids, n):
    return [float(i) for i in range(n)]


def test_each_worker_keeps_the_faster_gemm_rate_around_its_prefills(monkeypatch):
    rates = iter([40.0, 55.0])
    monkeypatch.setattr(engines, "matmul_probe", lambda repeats: engines.Probe(lambda: next(rates)))
    monkeypatch.setattr(engines, "adjacent_probe", lambda: engines.Probe(lambda: 20.0))
    prefills = []

    result = engines.measure(lambda: "engine", lambda e, ids: prefills.append(ids), decode_stamps)
    assert len(prefills) == engines.PREFILL_PROMPTS
    assert result["prefill_matmul_gflop_s"] == 55.0
    assert next(rates, None) is None  # one probe before the prefills, one after


def test_probes_count_the_bytes_their_buffers_keep_resident(monkeypatch):
    monkeypatch.setattr(engines, "ADJACENT_PROBE_BYTES", 8 << 20)
    m, k, n = engines.MATMUL_SHAPE
    itemsize = torch.empty(0, dtype=engines.matmul_dtype()).element_size()
    assert engines.matmul_probe(repeats=1).resident_bytes == (m * k + k * n) * itemsize
    assert engines.adjacent_probe().resident_bytes == 8 << 20


def test_the_workers_peak_rss_leaves_out_the_probe_buffers(monkeypatch):
    held = torch.ones(1 << 20, dtype=torch.uint8)
    monkeypatch.setattr(engines, "matmul_probe", lambda repeats: engines.Probe(lambda: 1.0))
    monkeypatch.setattr(engines, "adjacent_probe", lambda: engines.Probe(lambda: 1.0, held))
    monkeypatch.setattr(engines, "peak_rss_gb", lambda: 3.0)
    result = engines.measure(lambda: "engine", lambda e, ids: None, decode_stamps)
    assert result["probe_rss_gb"] == pytest.approx(held.nbytes / 1e9)
    assert result["peak_rss_gb"] == pytest.approx(3.0 - held.nbytes / 1e9)


def test_the_prefill_limit_is_the_fastest_rate_of_the_run():
    at_start = {"gflop_s": 38.0, "shape_mkn": [512, 2048, 2048], "dtype": "float32"}
    runs = [{"prefill_matmul_gflop_s": 61.0}, {"error": "failed"}, {"prefill_matmul_gflop_s": 64.5}]
    matmul = cpu_inference.fastest_matmul(at_start, runs)
    assert matmul["gflop_s"] == 64.5 and matmul["at_start_gflop_s"] == 38.0
    assert matmul["beside_prefill_gflop_s"] == [61.0, 64.5]
    assert matmul["dtype"] == "float32"
    assert "fastest of 38 at the start and 61-64" in cpu_inference.matmul_origin(matmul)
    # a faster start stays the limit; without probes beside the prefills, only the start counts
    assert cpu_inference.fastest_matmul({**at_start, "gflop_s": 70.0}, runs)["gflop_s"] == 70.0
    alone = cpu_inference.fastest_matmul(at_start, [{"error": "failed"}])
    assert alone["gflop_s"] == 38.0 and cpu_inference.matmul_origin(alone) == ""


@pytest.mark.parametrize("gflop_s", [30.0, 60.0])
def test_the_prefill_limit_scales_with_the_gemm_rate(gflop_s):
    config = engines.SHAPES["released"]()
    limit = cpu_inference.limits(config, 20.0, gflop_s)
    per_token = limit["prefill_flops_per_token"]
    assert limit["prefill_tok_s"] == pytest.approx(gflop_s * 1e9 / per_token)
