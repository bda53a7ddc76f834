"""The continuous-batching scheduler: one thread that decodes every running sequence together.

Each loop iteration (1) drops sequences whose client went away, (2) admits waiting requests while
rows are free — each prompt is prefilled on its own, exactly as `generate` prefills it, and its
cache copied into the batch (see slots.py) — and (3) runs one decode step over all running
sequences, each at its own position. A sequence that finishes leaves at once; a waiting one joins
at the next step. Sampling is `olmoe.generation.next_tokens` per sequence with the request's own
`torch.Generator`, so a seeded request draws the same tokens whatever else shares the batch.

Results go out through each request's `sink(Output)`, called on the engine thread; the HTTP layer
hands them over to its event loop.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from olmoe import engine
from olmoe.cache import KVCache
from olmoe.errors import ConfigError, InputError
from olmoe.generation import SamplingParams, StopStrings, eos_id_list, next_tokens
from olmoe.serve.prefixes import PrefixCache, copy_prefix
from olmoe.serve.slots import SlotCache

PROMPT_LOGPROBS_CHUNK = 256


class QueueFull(Exception):
    """The waiting queue is at its bound; the request was not accepted."""


@dataclass
class Output:
    """One event of one choice: a new token (with, when asked, the experts each layer routed the
    position that produced it to), and on the last one the finish reason."""

    index: int
    token: int | None = None
    experts: list[list[int]] | None = None  # (layers, K)
    # The model's own log-probability of the token (before temperature, top-k, top-p) and the
    # `Request.logprobs` most probable tokens with theirs, when asked.
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # With the first event, when asked: (logprob, top) of every prompt token; the first token
    # has none (nothing predicts it).
    prompt_logprobs: list[tuple[float | None, list[tuple[int, float]]]] | None = None
    finish_reason: str | None = None  # "stop", "length", or "error" (see `error`)
    error: str | None = None


@dataclass
class Request:
    """What to generate for one prompt: `n` independent choices of up to `max_tokens` tokens."""

    prompt: list[int]
    max_tokens: int
    sink: Callable[[Output], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    seed: int | None = None
    n: int = 1
    return_routing: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the token's and the k most probable
    prompt_logprobs: bool = False  # the same for the prompt's tokens (max_tokens may then be 0)
    cancelled: bool = False

    def cancel(self) -> None:
        """Free the request's rows at the next step (the client went away)."""
        self.cancelled = True


@dataclass
class _Sequence:
    request: Request
    index: int
    generator: torch.Generator | None
    history: torch.Tensor  # (1, prompt + max_tokens) token ids, for the repetition penalty
    length: int  # tokens in `history` (prompt + generated)
    generated: list[int] = field(default_factory=list)
    stops: StopStrings | None = None


class Stats:
    """Counters and gauges the /metrics endpoint reads (updated on the engine thread)."""

    WINDOW_S = 10.0

    def __init__(self, num_layers: int, num_experts: int):
        self.lock = threading.Lock()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.decode_steps = 0
        self.finished: collections.Counter[str] = collections.Counter()
        self.cancelled = 0
        self.running = 0
        self.waiting = 0
        self.expert_tokens = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - self.WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `WINDOW_S` seconds."""
        with self.lock:
            cutoff = time.monotonic() - self.WINDOW_S
            return sum(n for t, n in self._recent if t >= cutoff) / self.WINDOW_S


class Engine:
    """Runs `Request`s on `model` (an OlmoeForCausalLM in eval mode), at most `max_batch_size`
    sequences at a time, with at most `max_queue` requests waiting; `tokenizer` reads the text
    for stop strings. `start()` starts the thread, `stop()` finishes the accepted work first.
    The model runs on the CPU engine where it applies (olmoe.engine)."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch_size: int = 8,
        max_queue: int = 64,
        prefix_cache_tokens: int = 0,
    ):
        if max_batch_size < 1 or max_queue < 0 or prefix_cache_tokens < 0:
            raise ConfigError("max_batch_size must be >= 1, max_queue and prefix_cache_tokens >= 0")
        model.check_can_generate()
        self.model = engine.apply(model)
        self.tokenizer = tokenizer
        self.config = model.config
        self.context_window = model.config.max_position_embeddings
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.eos = torch.tensor(eos_id_list(model.config.eos_token_id), dtype=torch.long)
        self.cache = SlotCache(model.config, max_batch_size, model.dtype, model.device)
        self.stats = Stats(len(model.config.moe_layer_indices), model.config.num_experts)
        # Recent prompts' keys and values, for prompts that begin the same (see prefixes.py)
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[_Sequence] = []  # row i of the cache holds _running[i]
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------ public
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="olmoe-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Finish what was accepted, then end the engine thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request; raises QueueFull when `max_queue` requests are already waiting."""
        if request.n > self.max_batch_size:
            raise InputError(f"n={request.n} exceeds the server's batch size {self.max_batch_size}")
        with self._condition:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            self._condition.notify()

    # ------------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._condition:
                    while not (self._waiting or self._running or self._stopping):
                        self._condition.wait()
                    if self._stopping and not (self._waiting or self._running):
                        return
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as exc:  # noqa: BLE001 (a failed step must not end the server)
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._running))):
            if self._running[i].request.cancelled:
                self._leave(i)
                self.stats.cancelled += 1
        with self._condition:
            self.stats.cancelled += sum(r.n for r in self._waiting if r.cancelled)
            self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
            self.stats.waiting = len(self._waiting)

    def _admit(self) -> None:
        while True:
            with self._condition:
                if not self._waiting:
                    return
                request = self._waiting[0]
                if len(self._running) + request.n > self.max_batch_size:
                    return  # first come, first served: nobody overtakes the head of the queue
                self._waiting.popleft()
                self.stats.waiting = len(self._waiting)
            try:
                self._start(request)
            except Exception as exc:  # noqa: BLE001 (reported to this request's client)
                for index in range(request.n):
                    request.sink(Output(index, finish_reason="error", error=str(exc)))

    def _start(self, request: Request) -> None:
        """Prefill the prompt once (past a prefix an earlier prompt computed, where the engine
        keeps them), sample each choice's first token, give each choice a row."""
        length = len(request.prompt)
        prefilled, reused = self._prefix_of(request)
        device = self.model.device
        prompt = torch.tensor([request.prompt[reused:]], dtype=torch.long, device=device)
        positions = torch.arange(reused, length, device=device)
        logits, routing, hidden = self._forward(prompt, prefilled, cache_position=positions)
        if self.prefixes is not None:
            self.prefixes.add(request.prompt, prefilled)
        with self.stats.lock:
            self.stats.prompt_tokens += length
        self._count_experts(routing)
        prompt_logprobs = (
            self._prompt_logprobs(request, hidden) if request.prompt_logprobs else None
        )
        if request.max_tokens == 0:  # only the prompt's log-probabilities were asked for
            for index in range(request.n):
                request.sink(Output(index, prompt_logprobs=prompt_logprobs, finish_reason="length"))
            return
        experts = self._experts(routing, [length - 1 - reused]) if request.return_routing else None
        self.cache.reserve(length)
        for index in range(request.n):
            sequence = self._new_sequence(request, index, length)
            routed = experts[0] if experts else None
            if self._advance(sequence, logits, routed, prompt_logprobs):
                continue  # finished with its first token
            row = len(self._running)
            self.cache.load(row, prefilled, length)
            self._running.append(sequence)
        self.stats.running = len(self._running)

    def _prefix_of(self, request: Request) -> tuple[KVCache, int]:
        """A cache for the prompt holding the longest prefix the engine kept, and its length.
        Prompt log-probabilities need every position's hidden state: no prefix for those."""
        length = len(request.prompt)
        reused, source = 0, None
        if self.prefixes is not None and not request.prompt_logprobs:
            reused, source = self.prefixes.longest_prefix(request.prompt)
        if source is None:
            return KVCache(self.config.num_hidden_layers, capacity=length), 0
        return copy_prefix(source, reused, capacity=length), reused

    def _new_sequence(self, request: Request, index: int, length: int) -> _Sequence:
        generator = None
        if request.params.do_sample:
            seed = request.seed if request.seed is not None else _random_seed()
            generator = torch.Generator(self.model.device).manual_seed((seed + index) % 2**64)
        device = self.model.device
        history = torch.empty(1, length + request.max_tokens, dtype=torch.long, device=device)
        history[0, :length] = torch.tensor(request.prompt, device=device)
        stops = StopStrings(self.tokenizer, request.stop) if request.stop else None
        return _Sequence(request, index, generator, history, length, stops=stops)

    def _decode(self) -> None:
        """One token for every running sequence, each at its own position."""
        # A sequence's cache holds all its tokens but the last sampled one, which is fed now.
        lengths = torch.tensor([s.length - 1 for s in self._running], device=self.model.device)
        tokens = torch.stack([s.history[0, s.length - 1] for s in self._running])
        # Grown here (by doubling) rather than for max_tokens at admission: a chat request
        # asks for the whole context window by default, and most end long before it.
        self.cache.reserve(int(lengths.max()) + 1)
        kv_length = self.cache.prepare(lengths)
        mask = None
        if bool((lengths != lengths[0]).any()):  # rows of equal length need no mask
            columns = torch.arange(kv_length, device=lengths.device)
            mask = columns[None] <= lengths[:, None]  # (n, kv_length)
        logits, routing, _ = self._forward(
            tokens[:, None].to(self.model.device),
            self.cache,
            positions=lengths[:, None],
            mask=mask,
            cache_position=torch.tensor([kv_length - 1], device=self.model.device),
        )
        self.stats.decode_steps += 1
        self._count_experts(routing)
        wants_routing = [i for i, s in enumerate(self._running) if s.request.return_routing]
        experts = dict(zip(wants_routing, self._experts(routing, wants_routing)))
        finished = []
        for i, sequence in enumerate(self._running):
            if self._advance(sequence, logits[i : i + 1], experts.get(i)):
                finished.append(i)
        for i in reversed(finished):
            self._leave(i)

    def _forward(self, ids, cache, positions=None, mask=None, cache_position=None):
        """The last position's logits (B, V), every layer's routing and the final hidden states
        (B, L, H)."""
        out = self.model.forward_hidden(
            ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_routing=True,
            cache_position=cache_position,
        )
        hidden = out.last_hidden_state
        return self.model.logits_from_hidden(hidden[:, -1]), out.routing, hidden

    def _prompt_logprobs(self, request: Request, hidden: torch.Tensor) -> list:
        """(logprob, top alternatives) of each prompt token given the ones before it."""
        entries: list = [(None, [])]  # nothing predicts the first token
        targets = torch.tensor(request.prompt[1:], device=hidden.device)
        # A few hundred positions at a time: the float32 log-probabilities of a whole long
        # prompt over a 50k vocabulary would take gigabytes.
        for start in range(0, len(targets), PROMPT_LOGPROBS_CHUNK):
            end = start + PROMPT_LOGPROBS_CHUNK
            logits = self.model.logits_from_hidden(hidden[0, start:end])  # j predicts token j+1
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (chunk, V)
            chosen = logprobs.gather(1, targets[start:end, None])[:, 0].tolist()
            top = logprobs.topk(request.logprobs or 0, dim=-1)
            for logprob, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist()):
                entries.append((logprob, list(zip(ids, values))))
        return entries

    def _advance(
        self, sequence: _Sequence, logits: torch.Tensor, experts, prompt_logprobs=None
    ) -> bool:
        """Sample the sequence's next token from its logits (1, V), record it and send it; True
        when the sequence has finished with it."""
        request = sequence.request
        seen = sequence.history[:, : sequence.length]
        token = int(next_tokens(logits, request.params, seen, sequence.generator)[0])
        out = Output(sequence.index, token, experts, prompt_logprobs=prompt_logprobs)
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits[0].float(), dim=-1)  # (V,)
            top = logprobs.topk(request.logprobs)
            out.logprob = float(logprobs[token])
            out.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        sequence.history[0, sequence.length] = token
        sequence.length += 1
        sequence.generated.append(token)
        with self.stats.lock:
            self.stats.count_tokens(1)
        reason = None
        stop_string = sequence.stops is not None and sequence.stops.hit(sequence.generated)
        if bool((self.eos == token).any()) or stop_string:
            reason = "stop"
        elif (
            len(sequence.generated) >= sequence.request.max_tokens
            or sequence.length >= self.context_window
        ):
            reason = "length"
        if reason is not None:
            with self.stats.lock:
                self.stats.finished[reason] += 1
        out.finish_reason = reason
        request.sink(out)
        return reason is not None

    def _leave(self, i: int) -> None:
        """Free row i by moving the last running sequence into it."""
        last = len(self._running) - 1
        if i != last:
            moved = self._running[last]
            self.cache.move(last, i, moved.length - 1)
            self._running[i] = moved
        self._running.pop()
        self.stats.running = len(self._running)

    def _fail_all(self, message: str) -> None:
        for sequence in self._running:
            sequence.request.sink(Output(sequence.index, finish_reason="error", error=message))
        self._running.clear()
        self.stats.running = 0

    # ------------------------------------------------------------------------ routing
    def _count_experts(self, routing) -> None:
        if not routing:  # a model without experts
            return
        loads = torch.stack([layer.tokens_per_expert.cpu() for layer in routing])
        with self.stats.lock:
            self.stats.expert_tokens += loads

    def _experts(self, routing, rows: list[int]) -> list[list[list[int]]]:
        """For each of `rows`, the expert ids (top-k, most probable first) of every layer."""
        if not rows or not routing:
            return [[] for _ in rows]
        picked = torch.stack([layer.top_k_indices[rows] for layer in routing], dim=1)
        return picked.tolist()  # (rows, layers, K)


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")
