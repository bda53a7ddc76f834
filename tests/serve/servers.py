"""What the server tests share: a tiny checkpoint with OLMoE's vocabulary and the real OLMo
tokenizer, `olmoe serve` started on it as a user starts it, and an in-process stand-in engine for
tests of the HTTP layer alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

from olmoe.serve.engine import Output
from olmoe.tokenizer import Tokenizer
from tests.conftest import tiny_model

MODEL = "tiny-olmoe"
# One thread: a tiny model gains nothing from more, and on a shared machine threads of small ops
# mostly wait for each other. A server sets its own OpenMP wait policy (re-executing itself);
# QUICK_START_ENV gives it up front, which saves that second start-up.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
QUICK_START_ENV = {**SERVER_ENV, "OMP_WAIT_POLICY": "PASSIVE"}


def save_checkpoint(directory, context: int):
    model = tiny_model(
        seed=5, vocab_size=50304, eos_token_id=50279, max_position_embeddings=context
    )
    model.save_pretrained(directory)
    Tokenizer.olmo().save_pretrained(directory)
    return directory


def start_server(directory, log, *flags: str, environment: dict | None = None):
    """Start `olmoe serve` on a free port; the process and its base URL once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "olmoe", "serve", str(directory), "--port", "0",
         "--dtype", "fp32", "--served-model-name", MODEL, *flags],
        stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, **(environment or SERVER_ENV)},
    )  # fmt: skip
    line = process.stdout.readline()  # the startup line, or "" if the process died
    found = re.search(r"listening on (http://127\.0\.0\.1:\d+)/v1", line)
    if not found:
        process.kill()
        raise AssertionError(f"no startup line: {line!r}; stderr: {log.name}")
    return process, found.group(1)


class FakeEngine:
    """The engine's interface without a model: it records each request and answers every choice
    at once with `max_tokens` copies of `token`, or, when `silent`, never."""

    def __init__(self, context_window: int = 256, max_queue: int = 4, silent: bool = False):
        self.config = SimpleNamespace(vocab_size=50304)
        self.context_window = context_window
        self.max_batch_size = 8
        self.max_queue = max_queue
        self.alive = True
        self.silent = silent
        self.token = 1000
        self.requests = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, request) -> None:
        self.requests.append(request)
        if self.silent:
            return
        for index in range(request.n):
            if request.max_tokens == 0:
                request.sink(Output(index, finish_reason="length"))
            for i in range(request.max_tokens):
                last = i == request.max_tokens - 1
                request.sink(Output(index, self.token, finish_reason="length" if last else None))
