"""What the engine's tests share: a request sink that collects its tokens, a small model, and
submitting a request (the `engine_factory` fixture is in conftest.py)."""

from __future__ import annotations

import threading

from olmoe.serve.engine import Request
from tests.conftest import tiny_model


class Collector:
    """A request's sink: the tokens (and routing) of each choice, and when all have finished."""

    def __init__(self, n: int = 1):
        self.tokens = [[] for _ in range(n)]
        self.experts = [[] for _ in range(n)]
        self.finish = [None] * n
        self.done = threading.Event()

    def __call__(self, out) -> None:
        assert out.error is None, out.error
        if out.token is not None:
            self.tokens[out.index].append(out.token)
        if out.experts is not None:
            self.experts[out.index].append(out.experts)
        if out.finish_reason is not None:
            self.finish[out.index] = out.finish_reason
            if all(self.finish):
                self.done.set()

    def wait(self):
        assert self.done.wait(60), "the request did not finish"
        return self


def model_of(dtype):
    return tiny_model(seed=3, eos_token_id=None, max_position_embeddings=128).to(dtype)


def submit(engine, prompt, max_tokens, **kwargs) -> Collector:
    collector = Collector(kwargs.get("n", 1))
    engine.submit(Request(prompt, max_tokens, collector, **kwargs))
    return collector
