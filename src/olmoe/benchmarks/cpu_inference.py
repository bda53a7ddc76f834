"""CPU inference: olmoe against its peers and against the machine's limits, in one run.

    olmoe bench --shape small                         # about a minute or two
    olmoe bench --json released.json                  # released shape, ~14 GB/engine

(the same as `python -m olmoe.benchmarks.cpu_inference ...` or `.venv/bin/python
bench/cpu_inference.py ...` in a source checkout).

Writes (once, cached in --dir) a seeded random bf16 checkpoint of the chosen shape in the hub
layout with the OLMo tokenizer beside it; measures the machine's memory read bandwidth and bf16
matmul throughput; then runs each engine in its own fresh process, interleaved A B A B over
--repeats, and reports load time, peak RSS, prefill-512 tok/s (the median over three prompts)
and decode tok/s at batch 1 and 8 (16-token prompt, 128 new tokens, eos ignored): medians,
olmoe's ratio to each peer, and each rate as a fraction of its hardware limit. --json writes
every raw number and the machine info.

Engines: olmoe, olmoe-int8 and olmoe-int4 (when `from_pretrained` accepts quantize=), transformers
(its default experts implementation grouped_mm, else its eager loop, named in the output; the
non-default transformers-eager and transformers-batched_mm check that choice), llamacpp (bf16
GGUF), llamacpp-q8 (Q8_0), llamacpp-q4_0 and llamacpp-q4_k_m (made from the bf16 GGUF by
llama.cpp's own quantiser) when llama-cpp-python is installed. llama.cpp decodes batch 8 as eight
sequences of one context (its batched API). llama.cpp is a benchmark-only peer, built from source
by its package (several minutes on 2 cores):

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install -e '.[bench]'
    # or only the peer: CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install llama-cpp-python==0.3.36

and its converter, convert_hf_to_gguf.py, comes from the same source archive (never committed
here): `--llama-cpp-src DIR` or LLAMA_CPP_SRC=DIR, where DIR is the unpacked archive. Without it
the script prints the two commands that fetch and unpack it into ~/.cache/olmoe/bench/.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from olmoe import OlmoeConfig
from olmoe.benchmarks import engines
from olmoe.benchmarks.engines import MATMUL_SHAPE
from olmoe.hardware import matrix_units

METRICS = ("load_s", "peak_rss_gb", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s")
HEADERS = ("load s", "peak RSS GB", "prefill-512 tok/s", "decode b1 tok/s", "decode b8 tok/s")
# Bytes per weight of each storage format, as (attention; experts; lm_head): the router and the
# norms are read in bf16 everywhere (llama.cpp keeps them in float32: a rounding error here). int4
# and Q4_0 store 32 4-bit weights and a float16 scale per group, Q8_0 32 int8 weights and one.
# olmoe's int8 keeps attention in bf16; its int4 keeps the LM head in int8 (a float32 scale per
# row of 2,048). llama.cpp's Q4 types store the LM head as Q6_K (210 bytes per 256 weights);
# Q4_K_M also stores the value projections and the experts' down projections of about half the
# layers as Q6_K, the rest as Q4_K (144 bytes per 256): its means below are approximate.
_Q6_K = 210 / 256
BYTES_PER_WEIGHT = {
    "bf16": (2.0, 2.0, 2.0),
    "int8": (2.0, 1.0, 1.0),
    "int4": (18 / 32, 18 / 32, 1.0),
    "q8_0": (34 / 32, 34 / 32, 34 / 32),
    "q4_0": (18 / 32, 18 / 32, _Q6_K),
    "q4_k_m": (0.6, 0.6, _Q6_K),
}
NOISY_SPREAD = 1.25
BANDWIDTH_BUFFER_BYTES = 2 << 30  # far beyond the 32 MB L3: every read comes from DRAM


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def machine_info(threads: int) -> dict:
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mem_available_gb": round(mem_available_gb(), 1),
        "matrix_units": matrix_units(),  # amx, avx512_bf16 or none: what oneDNN's GEMMs run on
        # on 2 cores any other busy process halves an engine's rate: say so next to the numbers
        "load_average_1min": os.getloadavg()[0],
    }


def read_bandwidth_gb_s(repeats: int = 5) -> dict:
    """Best-of-`repeats` DRAM read bandwidth, before the engines run, by every reader of
    engines.readers on a buffer of 4 KB pages and one of 2 MB pages (as olmoe's loader puts the
    weights): which reads faster has varied from run to run here, so the fastest is the limit."""
    found = {}
    for pages in ("4k", "2m"):
        buffer = engines.probe_buffer(BANDWIDTH_BUFFER_BYTES, huge_pages=pages == "2m")
        for name, read in engines.readers().items():
            found[f"{name}_{pages}"] = engines.read_gb_s(buffer, read, repeats)
        del buffer
    return {"gb_s": max(found.values()), "buffer_gb": BANDWIDTH_BUFFER_BYTES / 1e9, **found}


def matmul_gflop_s(repeats: int = 10) -> dict:
    """Best GEMM rate of torch (oneDNN) at prefill size, the compute limit for prefill
    (engines.matmul_probe: bf16 where the CPU multiplies bf16 natively, else float32)."""
    return {
        "gflop_s": engines.matmul_probe(repeats)(),
        "shape_mkn": list(MATMUL_SHAPE),
        "dtype": str(engines.matmul_dtype()).removeprefix("torch."),
    }


def fastest_matmul(at_start: dict, runs: list[dict]) -> dict:
    """The prefill limit's GEMM rate: the fastest of the run's first probe and the probes each
    worker took beside its prefills (the machine's compute rate moves in phases)."""
    beside = [r["prefill_matmul_gflop_s"] for r in runs if r.get("prefill_matmul_gflop_s")]
    return {
        **at_start,
        "gflop_s": max([at_start["gflop_s"], *beside]),
        "at_start_gflop_s": at_start["gflop_s"],
        "beside_prefill_gflop_s": beside,
    }


# ---------------------------------------------------------------------------- limits
def weight_counts(config: OlmoeConfig) -> dict[str, int]:
    """Weights by role, from the config alone. The embedding table is left out everywhere: a
    token reads one row of it, which is neither a matmul nor a measurable read."""
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    kv_width = kv * config.head_dim
    bias = (2 * h + 2 * kv_width) if config.attention_bias else 0
    return {
        "attention": 2 * h * h + 2 * h * kv_width + bias,  # q, k, v, o per layer
        "router": h * config.num_experts,  # per layer
        "expert": 3 * h * i,  # gate, up, down of one expert
        "norms": 2 * h + h + kv_width,  # block norms and q/k norms per layer
        "lm_head": config.vocab_size * h,
        "final_norm": h,
    }


def expected_distinct_experts(config: OlmoeConfig, batch: int) -> float:
    """Experts hit per layer by `batch` tokens under uniform routing: each token picks k distinct
    experts of E, so an expert escapes one token with probability (E - k) / E."""
    e, k = config.num_experts, config.num_experts_per_tok
    return e * (1 - ((e - k) / e) ** batch)


def decode_bytes_per_token(
    config: OlmoeConfig, batch: int, bytes_per_weight: tuple[float, float, float]
) -> float:
    """Weight bytes one decode step reads (each weight once, however many tokens use it),
    shared by its `batch` tokens. KV-cache reads (under 1% at these lengths) are not counted."""
    attention, expert, head = bytes_per_weight
    w = weight_counts(config)
    experts = expected_distinct_experts(config, batch)
    layers = config.num_hidden_layers
    step = 2.0 * (layers * (w["router"] + w["norms"]) + w["final_norm"])
    step += layers * (attention * w["attention"] + expert * experts * w["expert"])
    step += head * w["lm_head"]
    return step / batch


def prefill_flops_per_token(config: OlmoeConfig, tokens: int) -> float:
    """2 FLOPs per active matrix weight per token, plus the lm_head once for the last token."""
    w = weight_counts(config)
    layer = w["attention"] + w["router"] + config.num_experts_per_tok * w["expert"]
    return 2 * config.num_hidden_layers * layer + 2 * w["lm_head"] / tokens


def limits(config: OlmoeConfig, bandwidth_gb_s: float, gflop_s: float) -> dict:
    """Hardware-limit tok/s: prefill by compute, decode by weight bytes over read bandwidth."""
    out = {
        "prefill_tok_s": gflop_s * 1e9 / prefill_flops_per_token(config, engines.PREFILL_TOKENS),
        "prefill_flops_per_token": prefill_flops_per_token(config, engines.PREFILL_TOKENS),
    }
    for fmt, bpw in BYTES_PER_WEIGHT.items():
        for batch in engines.DECODE_BATCHES:
            per_token = decode_bytes_per_token(config, batch, bpw)
            out[f"decode_b{batch}_bytes_per_token_{fmt}"] = per_token
            out[f"decode_b{batch}_tok_s_{fmt}"] = bandwidth_gb_s * 1e9 / per_token
    return out


FORMULAS = (
    (
        "prefill limit = matmul FLOP/s / (2 x L x (attention + router + k x expert weights)"
        " + 2 x lm_head / 512) FLOP per token; attention scores and the embedding not counted"
    ),
    (
        "decode limit = read bandwidth / weight bytes per token: L x (attention + router + norms"
        " + n x expert) + lm_head, embedding excluded; n = k at batch 1, E x (1 - (1 - k/E)^B)"
        " distinct experts at batch B, the step's bytes shared by its B tokens"
    ),
)


# ---------------------------------------------------------------------------- workers
def worker(engine: str, directory: Path, threads: int) -> int:
    """Child-process side: measure one engine, print one `RESULT {json}` line."""
    torch.set_num_threads(threads)
    runner, kwargs = engines.ENGINES[engine]
    try:
        result = runner(directory, threads=threads, **kwargs)
        status = 0
    except Exception as error:  # noqa: BLE001 -- reported in the engine's table row
        result = {"error": f"{type(error).__name__}: {error}"}
        status = 1
    print("RESULT " + json.dumps({"engine": engine, **result}), flush=True)
    return status


def needed_gb(config: OlmoeConfig, engine: str) -> float:
    """Free memory a worker needs: its weights once (never a float32 copy) plus some slack."""
    fmt = engines.ENGINES[engine][1].get("quantize") or engines.GGUF_TYPES.get(engine, "bf16")
    need = config.num_parameters() * max(BYTES_PER_WEIGHT[fmt]) * 1.05 + 0.5e9
    if engine == "transformers-batched_mm":
        # one bf16 copy of an expert's weights per (token, expert) pair of the prefill
        pairs = engines.PREFILL_TOKENS * config.num_experts_per_tok
        need += pairs * weight_counts(config)["expert"] * 2
    return need / 1e9


def spawn(engine: str, args, timeout: float) -> dict:
    """Parent side: run one worker in a fresh interpreter and read its RESULT line."""
    command = [
        sys.executable,
        "-m",
        "olmoe.benchmarks.cpu_inference",
        "--worker",
        engine,
        "--dir",
        str(args.dir),
        "--threads",
        str(args.threads),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT ") :]), "wall_s": time.perf_counter() - start}
    if done.returncode == -9:  # SIGKILL: on this machine, the kernel's out-of-memory killer
        return {"engine": engine, "error": "worker killed (out of memory?)"}
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"engine": engine, "error": f"worker exited {done.returncode}: {tail[0]}"}


def prepare_gguf(names: list[str], args) -> dict[str, str]:
    """Convert the checkpoint for each llama.cpp engine once; errors by engine name."""
    errors = {}
    for name in names:
        outtype = engines.GGUF_TYPES.get(name)
        if outtype is None or engines.gguf_path(args.dir, outtype).is_file():
            continue
        print(f"converting the checkpoint to a {outtype} GGUF (once) ...", flush=True)
        try:
            engines.ensure_gguf(args.dir, outtype, args.llama_cpp_src)
        except FileNotFoundError as error:
            print(error, file=sys.stderr)
            errors[name] = "convert_hf_to_gguf.py not found (see the message above the table)"
        except Exception as error:  # noqa: BLE001 -- reported in the engine's table row
            print(error, file=sys.stderr)
            errors[name] = f"GGUF conversion failed: {str(error).splitlines()[-1]}"
    return errors


# ---------------------------------------------------------------------------- report
def medians(runs: list[dict], names: list[str], errors: dict[str, str]) -> dict[str, dict]:
    table = {}
    for name in names:
        good = [r for r in runs if r["engine"] == name and "error" not in r]
        if not good:
            failed = [r["error"] for r in runs if r["engine"] == name] or [errors.get(name, "?")]
            table[name] = {"error": failed[-1]}
            continue
        row = {"label": good[-1]["label"], "weights": good[-1]["weights"], "runs": len(good)}
        row["spread"] = {}
        for metric in METRICS:
            values = [r[metric] for r in good if r.get(metric) is not None]
            row[metric] = statistics.median(values) if values else None
            if values:
                row["spread"][metric] = max(values) / min(values)
        for batch in engines.DECODE_BATCHES:
            rate, read = f"decode_b{batch}_tok_s", f"decode_b{batch}_read_gb_s"
            paired = [(r[rate], r[read]) for r in good if r.get(rate) and r.get(read)]
            if paired:  # tok/s per GB/s of the bandwidth read beside it, run by run
                row[read] = statistics.median(b for _, b in paired)
                row[f"decode_b{batch}_tok_per_gb"] = statistics.median(a / b for a, b in paired)
        table[name] = row
    return table


def noisy_cells(table: dict[str, dict]) -> str:
    """The medians whose repeats disagree by more than NOISY_SPREAD, e.g. `llamacpp decode b1
    4.1x`: on a 2-core machine any other busy process halves an engine's rate."""
    names = dict(zip(METRICS, HEADERS))
    return ", ".join(
        f"{engine} {names[metric].replace(' tok/s', '')} {spread:.1f}x"
        for engine, row in table.items()
        for metric, spread in row.get("spread", {}).items()
        # rates only: a sub-second load time varies by 2x with the page cache alone
        if metric.endswith("tok_s") and spread > NOISY_SPREAD
    )


def fractions(row: dict, limit: dict) -> dict[str, float]:
    """Each rate as a fraction of its limit (decode against the engine's own weight format)."""
    out = {}
    if row.get("prefill_tok_s"):
        out["prefill_tok_s"] = row["prefill_tok_s"] / limit["prefill_tok_s"]
    for batch in engines.DECODE_BATCHES:
        key = f"decode_b{batch}_tok_s"
        if row.get(key):
            out[key] = row[key] / limit[f"{key}_{row['weights']}"]
    return out


def ratios(table: dict[str, dict]) -> dict[str, dict]:
    """olmoe's value over each peer's, metric by metric (>1: olmoe's number is larger)."""
    ok = {name: row for name, row in table.items() if "error" not in row}
    ours = [name for name in ok if name in engines.OURS]
    peers = [name for name in ok if name not in engines.OURS]
    return {
        f"{a} / {b}": {m: ok[a][m] / ok[b][m] for m in METRICS if ok[a].get(m) and ok[b].get(m)}
        for a in ours
        for b in peers
    }


def adjacent(table: dict[str, dict], limit: dict) -> dict[str, dict]:
    """Decode against the read bandwidth each worker measured just before and after it: per
    engine and batch, that bandwidth and the share of the limit it sets; per pair, olmoe's
    ratio to the peer at equal bandwidth. This machine's bandwidth moves in phases (see
    engines.ADJACENT_PROBE_BYTES), which the separate processes of the main table straddle."""
    ok = {n: r for n, r in table.items() if "error" not in r}
    shares, pairs = {}, {}
    for name, row in ok.items():
        for batch in engines.DECODE_BATCHES:
            per_gb = row.get(f"decode_b{batch}_tok_per_gb")
            if per_gb:
                per_token = limit[f"decode_b{batch}_bytes_per_token_{row['weights']}"]
                shares.setdefault(name, {})[f"decode_b{batch}"] = {
                    "read_gb_s": row[f"decode_b{batch}_read_gb_s"],
                    "share_of_limit": per_gb * per_token / 1e9,
                }
    for a in (n for n in ok if n in engines.OURS):
        for b in (n for n in ok if n not in engines.OURS):
            pairs[f"{a} / {b}"] = {
                f"decode_b{batch}": ok[a][key] / ok[b][key]
                for batch in engines.DECODE_BATCHES
                if ok[a].get(key := f"decode_b{batch}_tok_per_gb") and ok[b].get(key)
            }
    return {"engines": shares, "ratios": pairs}


def format_adjacent(table: dict[str, dict], found: dict) -> str:
    lines = ["decode against the read bandwidth measured beside it (same worker, just before "
             "and after; median over repeats):"]  # fmt: skip
    for name, by_batch in found["engines"].items():
        cells = [
            f"b{key.removeprefix('decode_b')} {v['share_of_limit']:.0%} of {v['read_gb_s']:.1f} "
            "GB/s"
            for key, v in by_batch.items()
        ]
        lines.append(f"  {table[name]['label']}: " + ", ".join(cells))
    for pair, values in found["ratios"].items():
        if values:
            cells = [f"b{k.removeprefix('decode_b')} {v:.2f}x" for k, v in values.items()]
            lines.append(f"  {pair} at equal bandwidth: " + ", ".join(cells))
    return "\n".join(lines)


def format_table(table: dict, limit: dict, ratio: dict) -> str:
    rows = [("engine",) + HEADERS]
    for name, row in table.items():
        if "error" in row:
            rows.append((name, f"FAILED: {row['error']}"))
            continue
        share = fractions(row, limit)
        cells = [row["label"]]
        for metric in METRICS:
            value = row.get(metric)
            if value is None:
                cells.append("—")
            elif metric in share:
                cells.append(f"{value:.1f} ({share[metric]:.0%})")
            else:
                cells.append(f"{value:.2f}")
        rows.append(tuple(cells))
    rows.append(
        (
            "limit (bf16)",
            "",
            "",
            f"{limit['prefill_tok_s']:.0f}",
            f"{limit['decode_b1_tok_s_bf16']:.1f}",
            f"{limit['decode_b8_tok_s_bf16']:.1f}",
        )
    )
    for pair, values in ratio.items():
        rows.append((pair,) + tuple(f"{values[m]:.2f}x" if m in values else "—" for m in METRICS))
    full = [r for r in rows if len(r) == len(HEADERS) + 1]
    widths = [max(len(r[c]) for r in full) for c in range(len(HEADERS) + 1)]
    lines = []
    for r in rows:
        if len(r) != len(widths):  # a failed engine: its error spans the row
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
            continue
        lines.append(
            "  ".join(
                cell.ljust(w) if c == 0 else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(r, widths))
            )
        )
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def default_engines() -> list[str]:
    from olmoe import OlmoeForCausalLM

    names = ["olmoe"]
    if "quantize" in inspect.signature(OlmoeForCausalLM.from_pretrained).parameters:
        names += ["olmoe-int8", "olmoe-int4"]
    peers = ("transformers", "llamacpp", "llamacpp-q8", "llamacpp-q4_0", "llamacpp-q4_k_m")
    return names + [n for n in peers if engines.available(n)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(engines.SHAPES), default="released")
    parser.add_argument(
        "--engines",
        help=f"comma-separated, of {', '.join(engines.ENGINES)} "
        "(default: every one installed here)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="A B A B rounds (default 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--dir", type=Path, help="cached checkpoint (default ~/.cache/olmoe/bench/<shape>)"
    )
    parser.add_argument("--json", type=Path, help="write every raw number here")
    parser.add_argument(
        "--llama-cpp-src",
        help="unpacked llama-cpp-python sdist or llama.cpp "
        f"checkout holding convert_hf_to_gguf.py (or ${engines.LLAMA_CPP_SRC_ENV})",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dir is None:
        args.dir = Path.home() / ".cache/olmoe/bench" / args.shape
    args.dir = args.dir.expanduser().resolve()
    return args


def run_interleaved(names: list[str], errors: dict, config: OlmoeConfig, args) -> list[dict]:
    """Every engine once per round, A B A B, each in a fresh process after a free-memory check;
    one result (or error) per engine and round."""
    runs = []
    timeout = 3600 if args.shape == "released" else 600
    for repeat in range(args.repeats):
        for name in names:
            if name in errors:
                continue
            free, need = mem_available_gb(), needed_gb(config, name)
            if free < need:
                result = {
                    "engine": name,
                    "error": f"needs ~{need:.0f} GB free memory, {free:.1f} GB available: "
                    "close other programs or use --shape small",
                }
            else:
                print(f"[{repeat + 1}/{args.repeats}] {name} ...", flush=True)
                result = spawn(name, args, timeout)
            result["repeat"] = repeat
            runs.append(result)
            if "error" in result:
                print(f"    {name}: {result['error']}", flush=True)
    return runs


def matmul_origin(matmul: dict) -> str:
    """Where the limit's GEMM rate came from, as ', fastest of ...' (empty for a results file
    from before the probes beside the prefills)."""
    beside = matmul.get("beside_prefill_gflop_s")
    if not beside:
        return ""
    return (
        f", fastest of {matmul['at_start_gflop_s']:.0f} at the start and "
        f"{min(beside):.0f}-{max(beside):.0f} beside the engines' prefills"
    )


def print_report(report: dict, config: OlmoeConfig) -> None:
    limit, machine = report["limits"], report["machine"]
    print()
    print(
        f"{report['shape']} shape ({config.num_parameters() / 1e9:.2f}B parameters), "
        f"{machine['threads']} threads, {machine['cpu']} (matrix units: "
        f"{machine['matrix_units']}), torch {machine['torch']}, "
        f"load average {machine['load_average_1min']:.1f} at start; "
        f"median of {report['repeats']}"
    )
    print(
        f"read bandwidth {report['bandwidth']['gb_s']:.1f} GB/s, "
        f"{report['matmul'].get('dtype', 'bfloat16')} matmul "
        f"{report['matmul']['gflop_s']:.0f} GFLOP/s ({'x'.join(map(str, MATMUL_SHAPE))} MKN"
        f"{matmul_origin(report['matmul'])}); (%) = share of the limit in the engine's weight format"
    )
    print(format_table(report["median"], limit, report["ratios"]))
    print(format_adjacent(report["median"], report["adjacent"]))
    noisy = noisy_cells(report["median"])
    if noisy:
        print(
            f"  NOISY (max/min over repeats > {NOISY_SPREAD}): {noisy}; another process was "
            "probably running: rerun on an idle machine or with more --repeats"
        )
    for line in FORMULAS:
        print("  " + line)
    print(
        f"  decode bytes per token (bf16): b1 {limit['decode_b1_bytes_per_token_bf16'] / 1e9:.3f}"
        f" GB, b8 {limit['decode_b8_bytes_per_token_bf16'] / 1e9:.3f} GB "
        f"({expected_distinct_experts(config, 8):.1f} distinct experts per layer); prefill "
        f"{limit['prefill_flops_per_token'] / 1e9:.2f} GFLOP per token"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, args.dir, args.threads)
    names = args.engines.split(",") if args.engines else default_engines()
    unknown = [n for n in names if n not in engines.ENGINES]
    if unknown:
        print(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(engines.ENGINES)}")
        return 2
    started = time.perf_counter()
    config = engines.SHAPES[args.shape]()
    torch.set_num_threads(args.threads)
    machine = machine_info(args.threads)

    if engines.ensure_checkpoint(args.dir, args.shape):
        print(f"wrote a random bf16 {args.shape}-shape checkpoint to {args.dir}")
    errors = prepare_gguf(names, args)
    for method in ("int8", "int4"):
        if f"olmoe-{method}" in names and not engines.quantized_path(args.dir, method).is_dir():
            print(
                f"writing the {method} checkpoint (once, as `olmoe quantize` does) ...", flush=True
            )
            engines.ensure_quantized(args.dir, method)
    errors.update({n: "not installed" for n in names if not engines.available(n)})

    print(
        f"measuring read bandwidth ({BANDWIDTH_BUFFER_BYTES >> 30} GiB buffer) and the matmul rate "
        f"with {args.threads} threads ...",
        flush=True,
    )
    bandwidth = read_bandwidth_gb_s()
    at_start = matmul_gflop_s()
    runs = run_interleaved(names, errors, config, args)
    matmul = fastest_matmul(at_start, runs)
    limit = limits(config, bandwidth["gb_s"], matmul["gflop_s"])
    table = medians(runs, names, errors)
    report = {
        "shape": args.shape,
        "config": config.to_dict(),
        "checkpoint": str(args.dir),
        "machine": machine,
        "bandwidth": bandwidth,
        "matmul": matmul,
        "limits": limit,
        "formulas": FORMULAS,
        "engines": names,
        "repeats": args.repeats,
        "runs": runs,
        "median": table,
        "ratios": ratios(table),
        "adjacent": adjacent(table, limit),
        "fractions_of_limit": {
            n: fractions(r, limit) for n, r in table.items() if "error" not in r
        },
    }
    print_report(report, config)
    print(f"  total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
