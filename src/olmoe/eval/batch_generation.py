"""Many prompts through the server's continuous-batching engine (`olmoe.serve.engine`).

The engine rather than `olmoe.generation.generate` over padded batches: answers end at their own
stop sequences, a few tokens for a QA answer and hundreds for a chain of thought, and a padded
batch runs until its longest answer ends, while the engine gives a finished row to the next
problem at once. A prompt that begins as a recent one did (a task's few-shot examples) is
prefilled only past the shared part (olmoe.serve.prefixes); decoding runs batched.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable, Sequence
from typing import Any

from olmoe.generation import SamplingParams
from olmoe.serve.engine import Engine, Output
from olmoe.serve.engine import Request as EngineRequest

PREFIX_CACHE_WINDOWS = 2
_POLL_SECONDS = 1.0  # how often the wait for results checks that the engine is still alive


@dataclasses.dataclass(frozen=True)
class Job:
    """`samples` answers to one tokenised prompt. temperature 0: greedy."""

    key: Any
    prompt: Sequence[int]
    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float = 0.0
    samples: int = 1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Done:
    job: Job
    texts: list[str]  # one per sample, cut before the first stop sequence
    finish_reasons: list[str]  # "stop" or "length"


def job_seed(seed: int, index: int) -> int:
    """The sampling seed of the `index`-th problem of a run seeded `seed`: each problem draws its
    own numbers, whatever else is generated beside it."""
    return seed * 1_000_003 + index


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop sequence (lm-eval's generate_until drops it too)."""
    end = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:end]


def run_jobs(
    model, tokenizer, jobs: Sequence[Job], batch_size: int, on_done: Callable[[Done], None]
) -> None:
    """Generate every job's answers, up to `batch_size` sequences at a time, calling `on_done`
    (on this thread) as each job finishes, in the order they finish."""
    if not jobs:
        return
    rows = max(batch_size, *(job.samples for job in jobs))
    # Few-shot prompts share their examples: keep recent prompts' keys and values (two context
    # windows' worth) so that each prompt is prefilled only past what it shares.
    kept = PREFIX_CACHE_WINDOWS * model.config.max_position_embeddings
    engine = Engine(
        model, tokenizer, max_batch_size=rows, max_queue=len(jobs), prefix_cache_tokens=kept
    )
    events: queue.Queue[tuple[int, Output]] = queue.Queue()
    tokens = [[[] for _ in range(job.samples)] for job in jobs]
    reasons: list[list[str | None]] = [[None] * job.samples for job in jobs]
    requests = []
    engine.start()
    try:
        for number, job in enumerate(jobs):
            sampling = SamplingParams(
                do_sample=job.temperature > 0, temperature=job.temperature or 1.0
            )
            request = EngineRequest(
                prompt=list(job.prompt),
                max_tokens=job.max_new_tokens,
                sink=lambda output, number=number: events.put((number, output)),
                params=sampling,
                stop=job.stop,
                seed=job.seed,
                n=job.samples,
            )
            engine.submit(request)
            requests.append(request)
        remaining = len(jobs)
        while remaining:
            try:
                number, output = events.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not engine.alive:
                    raise RuntimeError("the generation engine stopped unexpectedly") from None
                continue
            if output.finish_reason == "error":
                raise RuntimeError(f"generation failed: {output.error}")
            if output.token is not None:
                tokens[number][output.index].append(output.token)
            if output.finish_reason is not None:
                reasons[number][output.index] = output.finish_reason
                if all(r is not None for r in reasons[number]):
                    remaining -= 1
                    job = jobs[number]
                    texts = [
                        cut_at_stop(tokenizer.decode(t, skip_special_tokens=True), job.stop)
                        for t in tokens[number]
                    ]
                    on_done(Done(job, texts, list(reasons[number])))
    finally:
        for request in requests:  # an interruption: free the rows at the engine's next step
            request.cancel()
        engine.stop()
