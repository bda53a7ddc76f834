"""Load the released OLMoE-1B-7B shape (random bf16 weights) and report memory and time.

    .venv/bin/python bench/load_released_shape.py [--dir /tmp/olmoe-released-random]

Writes the checkpoint once (13.8 GB, sharded like the release) if the directory is empty, then
loads it in a fresh process and prints: the weights' bytes, the rise of the peak resident set
during loading (the target is near 1.0x the weights, never 2x), the load time, and the time to
simply read the same files (the floor a loader can reach).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from olmoe import OlmoeConfig
from olmoe.benchmarks.engines import write_checkpoint

MEASURE = r"""
import re, sys, time
import torch
from olmoe import OlmoeForCausalLM

def peak():
    return int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = peak()
start = time.perf_counter()
model = OlmoeForCausalLM.from_pretrained(sys.argv[1])
seconds = time.perf_counter() - start
print(peak() - base, seconds, model.dtype)
"""


def read_seconds(directory: Path) -> float:
    start = time.perf_counter()
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/olmoe-released-random"))
    args = parser.parse_args()
    if not (args.dir / "config.json").is_file():
        print(f"writing a random bf16 checkpoint of the released shape to {args.dir} ...")
        write_checkpoint(args.dir, OlmoeConfig.olmoe_1b_7b(), tokenizer=False)
    weights = OlmoeConfig.olmoe_1b_7b().num_parameters() * 2
    read = read_seconds(args.dir)
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(args.dir)], capture_output=True, text=True, check=True
    ).stdout.split()
    growth, seconds = int(out[0]), float(out[1])
    print(f"weights          {weights / 1e9:.2f} GB ({out[2]})")
    print(f"peak RSS rise    {growth / 1e9:.2f} GB = {growth / weights:.3f}x the weights")
    print(f"load             {seconds:.1f} s")
    print(f"plain file read  {read:.1f} s (same files, same page-cache state or warmer)")
    print(f"load / read      {seconds / read:.2f}")


if __name__ == "__main__":
    main()
