"""Throughput of `olmoe serve` with 1 and with 8 concurrent streaming clients.

    .venv/bin/python bench/serve_throughput.py                    # small shape, about 2 minutes
    .venv/bin/python bench/serve_throughput.py --model DIR --dtype bf16 --json out.json
    .venv/bin/python bench/serve_throughput.py --url http://127.0.0.1:8000 --model-name NAME

Starts the server on a free loopback port (unless --url points at a running one), warms it up,
then for each client count runs that many clients at once, each sending --requests streaming
completions one after the other (greedy, --max-tokens new tokens after a ~16-token prompt of its
own). Reports generated tokens per second summed over all clients (usage counts, from the first
request sent to the last token received), the mean time to the first token, and the ratio of
8 clients to 1. Without --model it serves the cached random "small"-shape checkpoint of
bench/cpu_inference.py (released vocabulary and 64 experts, 4 layers of width 1024; 1 GB bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

from olmoe.cli.common import DTYPES

PROMPTS = [
    "The history of the printing press begins in",
    "A short guide to brewing green tea: first,",
    'def merge_sort(values):\n    """Sort a list by',
    "The three laws of thermodynamics state that",
    "Once upon a time, in a village by the sea,",
    "To configure the server, open the file and",
    "Photosynthesis converts light energy into",
    "The committee met on Tuesday to discuss the",
]


def start_server(args) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "olmoe", "serve", str(args.model), "--port", "0",
        "--dtype", args.dtype, "--max-batch-size", str(max(args.clients)),
        "--served-model-name", args.model_name,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    found = re.search(r"listening on (http://\S+)/v1", line)
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return process, found.group(1)


def one_client(client, model: str, prompt: str, args, out: list) -> None:
    for _ in range(args.requests):
        sent = time.perf_counter()
        first = None
        stream = client.completions.create(
            model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        tokens = 0
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        out.append({"tokens": tokens, "ttft_s": (first or time.perf_counter()) - sent})


def measure(client, model: str, clients: int, args) -> dict:
    results: list[dict] = []
    threads = [
        threading.Thread(
            target=one_client, args=(client, model, PROMPTS[i % len(PROMPTS)], args, results)
        )
        for i in range(clients)
    ]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2),
        "mean_ttft_s": round(sum(r["ttft_s"] for r in results) / len(results), 3),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: small shape)")
    parser.add_argument("--url", help="use a running server instead of starting one")
    parser.add_argument("--model-name", default="olmoe-bench", help="served model name")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--api-key", default=os.environ.get("OLMOE_API_KEY", "unused"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    process = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        if args.model is None:
            from olmoe.benchmarks import engines

            args.model = Path.home() / ".cache/olmoe/bench/small"
            if engines.ensure_checkpoint(args.model, "small"):
                print(f"wrote a random bf16 small-shape checkpoint to {args.model}")
        process, url = start_server(args)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0)
        model = client.models.list().data[0].id
        measure(client, model, 1, argparse.Namespace(requests=1, max_tokens=8))  # warm-up
        rows = [measure(client, model, n, args) for n in args.clients]
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    print(
        f"olmoe serve, {model}, {args.max_tokens} new tokens per request, greedy "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'clients':>8} {'requests':>9} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'TTFT s':>7}")
    for row in rows:
        print(
            f"{row['clients']:>8} {row['requests']:>9} {row['tokens']:>7} {row['seconds']:>8.2f} "
            f"{row['tokens_per_s']:>8.1f} {row['mean_ttft_s']:>7.3f}"
        )
    if len(rows) > 1:
        print(f"throughput {rows[-1]['clients']} vs {rows[0]['clients']} clients: "
              f"{rows[-1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x")  # fmt: skip
    if args.json:
        report = {
            "model": str(args.model or model),
            "max_tokens": args.max_tokens,
            "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
