"""Autoregressive generation from small parts that the CLI, the server and the benchmarks share.

    prefill      one forward over the (left-padded) prompts, filling a preallocated KV cache
    decode_step  one forward of one new token per sequence against that cache
    next_tokens  repetition penalty, temperature, top-k, top-p, then argmax or a draw
    generate_tokens  the loop: yields each step's tokens, stops each sequence at its own eos
                 or stop string
    generate     collects the loop into `prompt + new tokens`, as transformers' `generate` does

Letters used in shape comments: B batch, L prompt length, C cache capacity (prompt + new tokens),
V vocabulary.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from olmoe import engine
from olmoe.cache import KVCache
from olmoe.errors import InputError

# transformers' default when neither max_length nor max_new_tokens is given.
DEFAULT_MAX_LENGTH = 20


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the logits. Validated on creation, so a bad value
    fails before any compute, with a message that names the setting."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise InputError(
                f"temperature must be a number > 0, got {self.temperature!r} "
                "(for greedy decoding use do_sample=False)"
            )
        if self.top_k is not None and not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise InputError(f"top_k must be an integer >= 0 (0 or None: off), got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            raise InputError(f"top_p must lie in (0, 1] (1 or None: off), got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            raise InputError(
                f"repetition_penalty must be a number > 0 (1: off), got {self.repetition_penalty!r}"
            )


# ---------------------------------------------------------------------------- logits processing
def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make every token in `seen` (B, N) less likely: positive logits are divided by `penalty`,
    negative ones multiplied (CTRL's rule, as transformers applies it, prompt included)."""
    scores = logits.gather(1, seen)  # (B, N)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, seen, scores)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included); -inf elsewhere."""
    k = min(k, logits.shape[-1])
    threshold = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < threshold, -math.inf)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most probable tokens whose probabilities sum to at least p
    (always at least the most probable one); -inf elsewhere."""
    ascending, order = torch.sort(logits, dim=-1)  # (B, V)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - p
    drop[:, -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -math.inf)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """The scores the next token is chosen from, in transformers' order: repetition penalty,
    then (when sampling) temperature, top-k and top-p. `logits` (B, V) in float32."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def next_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row (B,) from the last position's logits (B, V)."""
    scores = process_logits(logits.float(), params, seen)
    if not params.do_sample:
        return scores.argmax(dim=-1)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------- model steps
def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) of left-padded prompts: each sequence counts from 0 at its first real
    token, so padding shifts nothing (pads get 1, a value their masked keys never use)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def prefill(
    model,
    input_ids: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the prompts (B, L) through the model into `cache`; the last position's logits (B, V)."""
    positions = prompt_positions(attention_mask) if attention_mask is not None else None
    out = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        num_logits_to_keep=1,
    )
    return out.logits[:, -1]


def decode_step(
    model,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed one token per sequence (B,) at `positions` (B,); the next logits (B, V).
    `attention_mask` (B, cached + 1) is only needed when some sequence is padded."""
    out = model(
        tokens[:, None],
        attention_mask=attention_mask,
        position_ids=positions[:, None],
        past_key_values=cache,
        use_cache=True,
        num_logits_to_keep=1,
    )
    return out.logits[:, -1]


# ---------------------------------------------------------------------------- stopping
class StopStrings:
    """Whether a sequence's generated text contains one of the stop strings.

    Only the last few tokens are decoded each step: a byte-level token carries at least one byte,
    so a stop string of n bytes lies within the last n + 1 tokens of the text that completed it.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        if tokenizer is None:
            raise InputError(
                "stop_strings need the tokenizer to read the generated text: pass tokenizer="
            )
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise InputError(
                f"stop_strings must be a list of non-empty strings, got {stop_strings!r}"
            )
        self.tokenizer = tokenizer
        self.strings = tuple(stop_strings)
        self.window = max(len(s.encode()) for s in self.strings) + 1

    def hit(self, generated: Sequence[int]) -> bool:
        text = self.tokenizer.decode(list(generated[-self.window :]))
        return any(s in text for s in self.strings)


def eos_id_list(eos_token_id: int | Sequence[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


# ---------------------------------------------------------------------------- the loop
@dataclass
class Step:
    """One decoding step: the token each sequence got (B,) — `pad_token_id` for sequences that
    had already finished — and which sequences are finished after it (B,)."""

    tokens: torch.Tensor
    finished: torch.Tensor


def plan_new_tokens(
    prompt_length: int,
    context_window: int,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    warn: bool = True,
) -> int:
    """How many tokens to generate: `max_new_tokens` wins over `max_length` (prompt included),
    as in transformers; generation never runs past the model's context window (with a warning
    when that cuts what was asked for, unless `warn=False`)."""
    if prompt_length >= context_window:
        raise InputError(
            f"the prompt has {prompt_length} tokens but the model's context window is "
            f"{context_window} (max_position_embeddings): shorten the prompt"
        )
    if max_new_tokens is not None:
        if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        wanted = max_new_tokens
    else:
        max_length = DEFAULT_MAX_LENGTH if max_length is None else max_length
        if not (isinstance(max_length, int) and max_length > prompt_length):
            raise InputError(
                f"max_length={max_length!r} leaves no room after the {prompt_length}-token prompt: "
                "raise max_length (it counts the prompt) or use max_new_tokens"
            )
        wanted = max_length - prompt_length
    room = context_window - prompt_length
    if wanted > room and warn:
        warnings.warn(
            f"generation stops after {room} new tokens, at the model's context window "
            f"({context_window} tokens), not the {wanted} asked for",
            stacklevel=3,
        )
    return min(wanted, room)


@torch.inference_mode()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    params: SamplingParams | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: StopStrings | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[Step]:
    """Prefill once, then decode one token per sequence per step through a preallocated cache.

    `input_ids` (B, L) are left-padded prompts with `attention_mask` marking the real tokens.
    Each sequence finishes at its own eos or stop string and gets `pad_token_id` from then on;
    the loop ends when all have finished or after `max_new_tokens` steps. The model runs on the
    CPU engine where it applies (olmoe.engine).
    """
    model.check_can_generate()
    engine.apply(model)
    params = params or SamplingParams()
    batch, length = input_ids.shape
    device = input_ids.device
    capacity = length + max_new_tokens
    eos = torch.tensor(eos_id_list(eos_token_id), dtype=torch.long, device=device)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0

    # Everything a step writes lives in buffers sized once: the cache, the token history the
    # repetition penalty reads, and the mask (dropped when no sequence is padded).
    cache = KVCache(model.config.num_hidden_layers, capacity=capacity)
    sequences = input_ids.new_empty(batch, capacity)  # (B, C)
    sequences[:, :length] = input_ids
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = None
    if padded:
        mask = attention_mask.new_ones(batch, capacity)  # (B, C)
        mask[:, :length] = attention_mask
    positions = (
        prompt_positions(attention_mask)[:, -1]
        if padded
        else torch.full((batch,), length - 1, device=device)
    )
    finished = torch.zeros(batch, dtype=torch.bool, device=device)

    logits = prefill(model, input_ids, cache, mask[:, :length] if padded else None)
    for step in range(max_new_tokens):
        n = length + step
        tokens = next_tokens(logits, params, sequences[:, :n], generator)
        tokens = tokens.masked_fill(finished, pad_token_id)
        sequences[:, n] = tokens
        finished = finished | torch.isin(tokens, eos)
        if stop_strings is not None:
            for row in (~finished).nonzero().flatten().tolist():
                if stop_strings.hit(sequences[row, length : n + 1].tolist()):
                    finished[row] = True
        yield Step(tokens, finished.clone())
        if bool(finished.all()) or step + 1 == max_new_tokens:
            return
        positions = positions + 1
        logits = decode_step(model, tokens, positions, cache, mask[:, : n + 1] if padded else None)


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: str | Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    tokenizer=None,
) -> torch.Tensor:
    """Prompt plus generated tokens (B, L + new), as transformers' `generate` returns them.

    Sequences that finish early are filled with `pad_token_id` (default: the model's, else the
    first eos id). `streamer` gets transformers' calls: `put(prompt)`, `put(tokens)` per step,
    `end()`; it is meant for a single sequence. `stop_strings` need `tokenizer`.
    """
    input_ids = _as_batch(input_ids, "input_ids")
    if attention_mask is not None:
        attention_mask = _as_batch(attention_mask, "attention_mask")
        if attention_mask.shape != input_ids.shape:
            raise InputError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                f"{tuple(input_ids.shape)}"
            )
    config = model.config
    new = plan_new_tokens(
        input_ids.shape[1], config.max_position_embeddings, max_length, max_new_tokens
    )
    params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stops = StopStrings(tokenizer, stop_strings) if stop_strings else None
    eos_token_id = config.eos_token_id if eos_token_id is None else eos_token_id
    pad_token_id = config.pad_token_id if pad_token_id is None else pad_token_id

    if streamer is not None:
        streamer.put(input_ids.cpu())
    steps = []
    for step in generate_tokens(
        model,
        input_ids,
        new,
        attention_mask,
        params,
        eos_token_id,
        pad_token_id,
        stops,
        generator,
    ):
        steps.append(step.tokens)
        if streamer is not None:
            streamer.put(step.tokens.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


def _as_batch(tensor, name: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        tensor = torch.tensor(tensor)
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or tensor.shape[1] == 0:
        raise InputError(f"{name} must have shape (batch, length > 0), got {tuple(tensor.shape)}")
    return tensor
