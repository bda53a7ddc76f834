"""`olmoe bench ARGS`: `olmoe.benchmarks.cpu_inference` (olmoe against its peers on this CPU)."""

from __future__ import annotations

import argparse
import sys

BENCHMARK = "olmoe.benchmarks.cpu_inference"


def add_commands(commands) -> None:
    bench = commands.add_parser(
        "bench", help="compare olmoe with transformers and llama.cpp on this CPU", add_help=False
    )
    bench.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help=f"{BENCHMARK}'s options (--shape small, --json FILE, ...)",
    )
    bench.set_defaults(run=run_bench)


def run_bench(args) -> int:
    """Run the benchmark in a fresh interpreter with the arguments as given, exactly as
    `python -m olmoe.benchmarks.cpu_inference` runs: its usage line and exit status, and none of
    this process's allocator settings in its measurements."""
    import subprocess

    return subprocess.call([sys.executable, "-m", BENCHMARK, *args.bench_args])
