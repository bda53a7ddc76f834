"""Soak and chaos for `olmoe serve`: many concurrent clients for a bounded time, then SIGTERM under
load.

    .venv/bin/python bench/serve_soak.py                            # 10 minutes, tiny model
    .venv/bin/python bench/serve_soak.py --duration 3600 --json soak.json
    .venv/bin/python bench/serve_soak.py --model DIR --dtype bf16   # a checkpoint of your own

Starts `olmoe serve` as a user does (a subprocess on a free loopback port, with small limits so
that every limit is reached) on --model, or on a tiny random model with OLMoE's vocabulary and
the OLMo tokenizer. --clients clients then send, until --duration seconds have passed, a random
mix of: completions and chat, streamed or not, with random sampling parameters; streams that the
client drops after a few events; requests the client cancels before the answer; prompts, texts,
bodies and max_tokens over the server's limits; malformed bodies; bursts of more requests than
the queue holds. Afterwards a batch of long streams is started, one more than the batch holds,
and the server gets SIGTERM.

It reports requests by kind and status, p50/p99 latency and time to the first token, and the
server's resident memory (VmRSS) over time, and passes (exit 0) only if: no response is a 5xx
other than a 503 for a full queue (load shedding, which is the point of the bursts); every status
is the one its kind of request should get; the server's own count of 5xx is zero; all batch rows
and the queue are free once the clients stop; RSS after the warm-up (the first third) stays within
--rss-bound-mib of its level at the end of the warm-up; and after SIGTERM every request in flight
finishes whole and the process exits with 0. tests/serve/test_soak.py runs it for 25 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MODEL = "olmoe-soak"
# Small limits, so that the chaos reaches each of them (and the queue) within seconds.
BATCH, QUEUE = 4, 8
LIMITS = {"max_new_tokens": 200, "max_input_chars": 4000, "max_body_bytes": 65536}
SERVER_FLAGS = [
    "--max-batch-size", str(BATCH), "--max-queue", str(QUEUE),
    "--max-new-tokens", str(LIMITS["max_new_tokens"]),
    "--max-input-chars", str(LIMITS["max_input_chars"]),
    "--max-body-bytes", str(LIMITS["max_body_bytes"]),
    "--request-timeout", "120",
]  # fmt: skip
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time",
    "Mixture-of-experts models route each token to",
    "1, 2, 3, 4,",
]
# Text a client may append: accents, CJK, emoji, controls, a zero-width joiner, right-to-left.
GARNISH = ["", " é", " 漢字", " 🙂🚀", "\t\n", "\x00\x1f", " a\u200db", " שלום"]
STOPS = ["\n", ".", " the", "🙂", "Paris"]
GENERATION_KINDS = ("completion", "completion-stream", "chat", "chat-stream")
# Kind of request -> relative weight in the mix.
MIX = {
    "completion": 5, "completion-stream": 5, "chat": 4, "chat-stream": 4,
    "disconnect": 2, "cancel": 2, "over-limit": 2, "malformed": 1, "burst": 1,
}  # fmt: skip
# Statuses each kind of request may get; a 503 (a full queue) may meet any that is queued.
EXPECTED = {
    **{kind: {200, 503} for kind in GENERATION_KINDS},
    "disconnect": {200, 503},
    "cancel": {200, 503},
    "burst": {200, 503},
    "over-limit": {400, 413},
    "malformed": {400, 404},
}


@dataclass
class Outcome:
    kind: str
    status: int | None  # None: the client gave up before the status arrived
    seconds: float
    first_token_s: float | None = None
    problem: str | None = None


@dataclass
class Soak:
    url: str
    pid: int
    duration: float
    clients: int
    rng: random.Random
    context: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, KiB)

    # ------------------------------------------------------------------------ requests
    def sampling(self) -> dict:
        r = self.rng
        body = {"max_tokens": r.randint(1, 48), "temperature": r.choice([0, 0.3, 0.8, 1.0, 1.7])}
        optional = {
            "top_p": lambda: round(r.uniform(0.05, 1.0), 2),
            "top_k": lambda: r.randint(0, 100),
            "repetition_penalty": lambda: round(r.uniform(0.5, 2.0), 2),
            "seed": lambda: r.randint(0, 2**63),
            "stop": lambda: r.sample(STOPS, r.randint(1, 4)),
            "n": lambda: 2,
            "olmoe": lambda: {"return_routing": True},
        }
        for name, value in optional.items():
            if r.random() < 0.25:
                body[name] = value()
        return body

    def prompt(self) -> str:
        return self.rng.choice(PROMPTS) + self.rng.choice(GARNISH)

    def generation(self, kind: str) -> tuple[str, dict]:
        """A random request of a generation kind: (path, body)."""
        body = {"model": MODEL, **self.sampling(), "stream": kind.endswith("stream")}
        if kind.startswith("chat"):
            body["messages"] = [{"role": "user", "content": self.prompt()}]
            if self.rng.random() < 0.2:
                body["logprobs"], body["top_logprobs"] = True, self.rng.randint(0, 5)
            if self.rng.random() < 0.1:
                del body["max_tokens"]  # the rest of the window, cut to --max-new-tokens
            return "/v1/chat/completions", body
        body["prompt"] = self.prompt()
        if self.rng.random() < 0.2:
            body["logprobs"] = self.rng.randint(0, 5)
        if self.rng.random() < 0.1 and not body["stream"]:
            body["echo"] = True
        return "/v1/completions", body

    async def send(self, client, kind: str, path: str, body, stream: bool, keep=None) -> Outcome:
        """Send one request; a stream is read to its end, or for `keep` events only."""
        started = time.monotonic()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        if not stream:
            response = await client.post(path, content=content)
            return _judged(kind, response.status_code, started, response.content)
        async with client.stream("POST", path, content=content) as response:
            if response.status_code != 200:
                return _judged(kind, response.status_code, started, await response.aread())
            first, events, done = None, 0, False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events += 1
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    return Outcome(kind, 200, time.monotonic() - started, problem=line)
                if first is None and _has_text(event):
                    first = time.monotonic() - started
                if keep is not None and events >= keep:
                    break  # the client hangs up mid-stream
        seconds = time.monotonic() - started
        problem = None if done or keep is not None else "the stream ended without [DONE]"
        return Outcome(kind, 200, seconds, first, problem)

    async def one(self, client, kind: str) -> list[Outcome]:
        r = self.rng
        if kind in GENERATION_KINDS:
            path, body = self.generation(kind)
            return [await self.send(client, kind, path, body, body["stream"])]
        if kind == "disconnect":
            path, body = self.generation(r.choice(["completion-stream", "chat-stream"]))
            body["max_tokens"] = LIMITS["max_new_tokens"]
            return [await self.send(client, kind, path, body, True, keep=r.randint(1, 3))]
        if kind == "cancel":
            path, body = self.generation(r.choice(["completion", "chat"]))
            body["max_tokens"] = LIMITS["max_new_tokens"]
            started = time.monotonic()
            try:
                sent = self.send(client, kind, path, body, False)
                return [await asyncio.wait_for(sent, r.uniform(0.02, 0.5))]
            except asyncio.TimeoutError:  # the client gives up: its connection closes
                return [Outcome(kind, None, time.monotonic() - started)]
        if kind == "burst":  # more at once than the rows and the queue hold
            path, body = "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 8}
            sends = [self.send(client, kind, path, body, False) for _ in range(BATCH + QUEUE + 4)]
            return list(await asyncio.gather(*sends))
        path, body = self.over_limit() if kind == "over-limit" else self.malformed()
        return [await self.send(client, kind, path, body, False)]

    def over_limit(self) -> tuple[str, dict | bytes]:
        """A request over one of the server's limits."""
        choice = self.rng.randrange(4)
        body = {"model": MODEL, "prompt": self.prompt()}
        if choice == 0:  # token ids beyond the context window
            body["prompt"] = [self.rng.randrange(50000) for _ in range(self.context + 10)]
        elif choice == 1:
            body["prompt"] = "x" * (LIMITS["max_input_chars"] + 1)
        elif choice == 2:
            body["prompt"] = "x" * LIMITS["max_body_bytes"]
        else:
            body["max_tokens"] = LIMITS["max_new_tokens"] + 1
        return "/v1/completions", body

    def malformed(self) -> tuple[str, dict | bytes]:
        return "/v1/completions", self.rng.choice(
            [
                b'{"model": "olmoe-soak", "prompt": "Hi"',
                b'{"model": "olmoe-soak", "prompt": "\xff"}',
                b"[" * 5000 + b"]" * 5000,
                {"model": MODEL, "prompt": "Hi", "temperature": "hot"},
                {"model": MODEL, "prompt": "Hi", "stop": ["\ud800"]},
                {"model": "another-model", "prompt": "Hi"},
            ]
        )

    # ------------------------------------------------------------------------ the run
    async def client_loop(self, client, deadline: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            self.outcomes += await self.one(client, kind)

    async def sample_rss(self, deadline: float, every: float = 0.25) -> None:
        started = time.monotonic()
        while time.monotonic() < deadline:
            self.rss.append((time.monotonic() - started, rss_kib(self.pid)))
            await asyncio.sleep(every)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            models = (await client.get("/v1/models")).json()
            self.context = models["data"][0]["max_model_len"]
            deadline = time.monotonic() + self.duration
            loops = [self.client_loop(client, deadline) for _ in range(self.clients)]
            await asyncio.gather(self.sample_rss(deadline), *loops)


def _has_text(event: dict) -> bool:
    for choice in event.get("choices", []):
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def _judged(kind: str, status: int, started: float, content: bytes) -> Outcome:
    seconds = time.monotonic() - started
    problem = None
    if status not in EXPECTED[kind]:
        problem = f"status {status}: {content[:300]!r}"
    elif status == 200 and "choices" not in json.loads(content):
        problem = f"a 200 without choices: {content[:300]!r}"
    elif status == 503 and json.loads(content)["error"]["code"] != "server_busy":
        problem = f"a 503 that is not load shedding: {content[:300]!r}"
    return Outcome(kind, status, seconds, problem=problem)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, flags=re.MULTILINE).group(1))


# ---------------------------------------------------------------------------- after the load
def server_metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    }


def wait_until_idle(url: str, seconds: float = 15) -> dict[str, float]:
    """The server's metrics once no row is busy and nothing waits (or after `seconds`): a
    cancelled non-streaming request is noticed within a second."""
    deadline = time.monotonic() + seconds
    while True:
        values = server_metrics(url)
        idle = values["olmoe_batch_size"] == 0 and values["olmoe_queue_depth"] == 0
        if idle or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


async def drain_on_sigterm(process: subprocess.Popen, url: str) -> dict:
    """Start one more long stream than the batch holds, SIGTERM the server once they all run or
    wait, and see each finish whole and the process exit."""
    body = {
        "model": MODEL,
        "prompt": "Once upon a time",
        "stream": True,
        "temperature": 1.0,  # sampled and seeded: no early end-of-text, as greedy might hit
        "max_tokens": LIMITS["max_new_tokens"],
        "stream_options": {"include_usage": True},
    }
    finished: list[tuple[float, str | None, int | None]] = []

    async def stream(client, seed: int) -> None:
        reason, tokens = None, None
        async with client.stream("POST", "/v1/completions", json={**body, "seed": seed}) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        reason = choice.get("finish_reason") or reason
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
        finished.append((time.monotonic(), reason, tokens))

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        streams = [asyncio.create_task(stream(client, seed)) for seed in range(BATCH + 1)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            values = await asyncio.to_thread(server_metrics, url)
            if values["olmoe_batch_size"] + values["olmoe_queue_depth"] == BATCH + 1:
                break
            await asyncio.sleep(0.01)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await asyncio.gather(*streams)
    exit_code = await asyncio.to_thread(process.wait, 120)
    whole = [reason is not None and tokens is not None for _, reason, tokens in finished]
    return {
        "in_flight_at_sigterm": sum(at > signalled for at, _, _ in finished),
        "finished_whole": sum(whole),
        "streams": len(finished),
        "exit_code": exit_code,
        "seconds_to_exit": round(time.monotonic() - signalled, 2),
    }


# ---------------------------------------------------------------------------- the report
def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def report(soak: Soak, idle: dict[str, float], drain: dict, rss_bound_mib: float) -> dict:
    outcomes = soak.outcomes
    completed = [o for o in outcomes if o.status == 200 and o.kind in GENERATION_KINDS]
    first = [o.first_token_s for o in completed if o.first_token_s is not None]
    warmup = soak.duration / 3
    after = [kib for t, kib in soak.rss if t >= warmup]
    baseline = after[0] if after else None
    growth_mib = (max(after) - baseline) / 1024 if after else None
    server_5xx = {
        name: value
        for name, value in idle.items()
        if name.startswith("olmoe_http_responses_total")
        and re.search(r'code="5\d\d"', name)
        and 'code="503"' not in name
    }
    statuses = Counter("gave up" if o.status is None else str(o.status) for o in outcomes)
    latencies = [o.seconds for o in completed]
    result = {
        "duration_s": soak.duration,
        "clients": soak.clients,
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "by_status": dict(sorted(statuses.items())),
        "served_200": statuses["200"],
        "shed_503": statuses["503"],
        "latency_s": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
        "first_token_s": {"p50": percentile(first, 0.5), "p99": percentile(first, 0.99)},
        "rss_mib": {
            "start": round(soak.rss[0][1] / 1024, 1),
            "after_warmup": round(baseline / 1024, 1),
            "max_after_warmup": round(max(after) / 1024, 1),
            "end": round(soak.rss[-1][1] / 1024, 1),
            "growth_after_warmup": round(growth_mib, 1),
            "bound": rss_bound_mib,
            "samples": [(round(t, 1), round(kib / 1024, 1)) for t, kib in soak.rss[::8]],
        },
        "idle_after_load": {"batch_size": idle["olmoe_batch_size"],
                            "queue_depth": idle["olmoe_queue_depth"]},
        "server_5xx": server_5xx,
        "drain": drain,
    }  # fmt: skip
    result["failures"] = failures(outcomes, result, growth_mib, rss_bound_mib)
    return result


def failures(outcomes: list[Outcome], result: dict, growth_mib: float, bound: float) -> list[str]:
    found = [f"{o.kind}: {o.problem}" for o in outcomes if o.problem][:20]
    if result["served_200"] == 0:
        found.append("no request was served")
    if result["server_5xx"]:
        found.append(f"the server counted 5xx responses: {result['server_5xx']}")
    idle = result["idle_after_load"]
    if idle["batch_size"] or idle["queue_depth"]:
        found.append(f"rows or queue still busy after the load: {idle}")
    if growth_mib > bound:
        found.append(f"RSS grew {growth_mib:.1f} MiB after the warm-up (bound {bound} MiB)")
    drain = result["drain"]
    if drain["exit_code"] != 0:
        found.append(f"after SIGTERM the server exited with {drain['exit_code']}")
    if drain["finished_whole"] != drain["streams"] or not drain["in_flight_at_sigterm"]:
        found.append(f"SIGTERM did not drain the streams in flight: {drain}")
    return found


def soak(process: subprocess.Popen, url: str, duration: float, clients: int, seed: int = 0,
         rss_bound_mib: float = 32) -> dict:  # fmt: skip
    """Run the soak against a server started with SERVER_FLAGS, then its SIGTERM check."""
    run = Soak(url, process.pid, duration, clients, random.Random(seed))
    asyncio.run(run.run())
    idle = wait_until_idle(url)
    drain = asyncio.run(drain_on_sigterm(process, url))
    return report(run, idle, drain, rss_bound_mib)


def summary(result: dict) -> str:
    rss, latency, first = result["rss_mib"], result["latency_s"], result["first_token_s"]
    lines = [
        f"{result['requests']} requests from {result['clients']} clients in "
        f"{result['duration_s']:g} s; by status {result['by_status']}; by kind {result['by_kind']}",
        f"latency p50 {latency['p50']} s, p99 {latency['p99']} s; "
        f"first token p50 {first['p50']} s, p99 {first['p99']} s",
        f"RSS {rss['start']} MiB at start, {rss['after_warmup']} after warm-up, "
        f"max {rss['max_after_warmup']} after, {rss['end']} at the end "
        f"(growth {rss['growth_after_warmup']} MiB, bound {rss['bound']})",
        f"after the load: {result['idle_after_load']}; server 5xx: {result['server_5xx'] or 0}",
        f"SIGTERM: {result['drain']}",
        "PASS" if not result["failures"] else "FAIL:\n  " + "\n  ".join(result["failures"]),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command
def start_server(model: Path, dtype: str, log, environment: dict) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "olmoe", "serve", str(model), "--port", "0", "--dtype", dtype,
        "--served-model-name", MODEL, *SERVER_FLAGS,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                               env={**os.environ, **environment})  # fmt: skip
    found = re.search(r"listening on (http://\S+)/v1", process.stdout.readline())
    if not found:
        process.kill()
        raise SystemExit(f"the server did not start; see {log.name}")
    return process, found.group(1)


def tiny_checkpoint(directory: Path) -> Path:
    """A tiny random model with OLMoE's vocabulary and a 256-token window, and the OLMo
    tokenizer: the server's work without the model's cost."""
    from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer

    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=256)
    OlmoeForCausalLM(config).save_pretrained(directory)
    Tokenizer.olmo().save_pretrained(directory)
    return directory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: tiny random)")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (600)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--seed", type=int, default=0, help="the mix's random seed (0)")
    parser.add_argument("--rss-bound-mib", type=float, default=32,
                        help="allowed RSS growth after the warm-up, MiB (32)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / "server.log", "w") as log:
        # A tiny model gains nothing from more than one thread.
        environment = {} if args.model else {"OMP_NUM_THREADS": "1"}
        model = args.model or tiny_checkpoint(Path(scratch) / "tiny")
        process, url = start_server(model, args.dtype, log, environment)
        try:
            result = soak(process, url, args.duration, args.clients, args.seed, args.rss_bound_mib)
        finally:
            process.kill()
    print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
