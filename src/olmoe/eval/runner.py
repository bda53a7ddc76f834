"""Summed log-probabilities of continuations, computed in batches.

Each request is tokenised as OLMES does: context and continuation separately (no BOS), joined,
cut from the left so the model sees at most `max_length` tokens, and scored on the continuation's
tokens only. Two strategies compute the same numbers:

- "packed" (the default) shares work wherever the tokens are the same:
  - contexts that begin with the same tokens (a task's five fixed shots, per MMLU subject) share
    that prefix: it runs once, alone, into a KV cache, which is copied into every row of the
    batches of that group, and only the rest of each context runs after it. A left-truncated
    context starts mid-shot and shares nothing, so it runs whole;
  - the choices of one question share their context: the context runs once (a causal pass
    into the KV cache) and then every choice's continuation goes in one row of a second pass,
    each attending to the cached context and to itself only (a small block mask; positions
    restart after the context). Single-token continuations (the MC letters) need no second
    pass.
- "flat": one row per request, whole context repeated, plain causal attention
  (lm-evaluation-harness's way); the reference the packed rows are tested against.

Rows are sorted by length so a batch wastes little padding, and the LM head runs only at the
positions that predict continuation tokens, once per position however many choices it predicts
(the four MC letters all follow the context's last token).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence

import torch

from olmoe.cache import KVCache
from olmoe.errors import ConfigError, DataError
from olmoe.eval.logprobs import target_logprobs
from olmoe.eval.strategies import STRATEGIES
from olmoe.eval.tasks import Request

DEFAULT_MAX_LENGTH = 2048  # OLMES truncates prompts to the model's 2,048-token window
# Continuation tokens per packed row (unless one continuation is longer). The second pass
# computes attention over the whole row and masks most of it away, so its cost grows with the
# square of the row: the 56,000 unconditional MMLU continuations behind the 2-token "Answer:"
# gain nothing from rows of thousands of tokens.
_PACKED_ROW_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A request's tokens after truncation: the (possibly cut) context and the continuation."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclasses.dataclass
class _Row:
    context: tuple[int, ...]
    items: list[tuple[int, tuple[int, ...]]]  # (request index, continuation tokens)

    @property
    def length(self) -> int:
        # A continuation's last token is only predicted, never fed in.
        return len(self.context) + sum(len(c) - 1 for _, c in self.items)


def encode_requests(
    tokenizer, requests: Sequence[Request], max_length: int = DEFAULT_MAX_LENGTH
) -> list[Encoded]:
    """Tokenise each distinct text once (contexts repeat across choices), without special
    tokens, and cut each request from the left to `max_length` + 1 tokens (the last one is
    predicted, not fed)."""
    texts = list(dict.fromkeys(t for r in requests for t in (r.context, r.continuation)))
    backend = tokenizer.backend_tokenizer
    ids = {
        t: tuple(e.ids)
        for t, e in zip(texts, backend.encode_batch(texts, add_special_tokens=False))
    }
    encoded = []
    for request in requests:
        context, continuation = ids[request.context], ids[request.continuation]
        if not continuation:
            raise DataError(f"the continuation {request.continuation!r} encodes to no tokens")
        if len(continuation) > max_length:
            raise DataError(
                f"a continuation of {len(continuation)} tokens does not fit the {max_length}-token "
                "window: raise max_length"
            )
        keep = max(0, len(context) + len(continuation) - (max_length + 1))
        context = context[keep:]
        if not context:
            raise DataError(
                f"the request with continuation {request.continuation!r} has an empty context"
            )
        encoded.append(Encoded(context, continuation))
    return encoded


def _rows(encoded: Sequence[Encoded], strategy: str) -> list[_Row]:
    if strategy == "flat":
        return [_Row(e.context, [(i, e.continuation)]) for i, e in enumerate(encoded)]
    if strategy != "packed":
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e.context, []).append((i, e.continuation))
    rows = []
    for context, items in groups.items():
        # A context shared by very many requests (the unconditional "Answer:") is split into
        # rows of a few continuations each.
        row = _Row(context, [])
        budget = 0
        for item in items:
            if row.items and budget + len(item[1]) > _PACKED_ROW_TOKENS:
                rows.append(row)
                row, budget = _Row(context, []), 0
            row.items.append(item)
            budget += len(item[1])
        rows.append(row)
    return rows


# A shared prefix shorter than this is not worth a pass (and batches) of its own.
_MIN_SHARED_PREFIX = 64


def _common_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens `a` and `b` share (binary search over C-level slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _shared_prefix_groups(rows: Sequence[_Row]) -> list[tuple[int, list[_Row]]]:
    """Split rows into groups whose contexts all begin with the same `n` tokens, as (n, rows);
    the rows that share no prefix worth running apart come last with n = 0.

    Sorting the contexts puts the ones with a common prefix next to each other (one group per
    task format, per MMLU subject: the header and five shots), so each row only needs comparing
    with its neighbours. A row joins the group before it unless that would shrink the group's
    prefix so much that fewer tokens are saved, or, when the group is a single row, joining it
    would lose more of what the row shares with the next one than it saves: a context that
    shares only a few tokens with a group, on either side of it, stays out. Each context keeps
    at least its last token out of the prefix: the hidden state there predicts the first
    continuation token.
    """
    ordered = sorted(rows, key=lambda r: r.context)
    # links[i]: the tokens rows i and i + 1 share.
    links = [_common_length(a.context, b.context) for a, b in itertools.pairwise(ordered)] + [0]
    groups: list[list] = []  # [shared length, rows]
    for i, row in enumerate(ordered):
        own = len(row.context) - 1
        if groups:
            n, members = groups[-1]
            shared = min(n, own, links[i - 1])
            joins = shared >= _MIN_SHARED_PREFIX and len(members) * shared >= (len(members) - 1) * n
            if joins and (len(members) > 1 or 2 * links[i - 1] >= links[i]):
                groups[-1][0] = shared
                members.append(row)
                continue
        groups.append([own, [row]])
    shared_groups = [(n, members) for n, members in groups if len(members) > 1]
    alone = [row for n, members in groups if len(members) == 1 for row in members]
    return shared_groups + ([(0, alone)] if alone else [])


@torch.inference_mode()
def score_requests(
    model,
    tokenizer,
    requests: Sequence[Request],
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    strategy: str = "packed",
    progress: Callable[[int], None] | None = None,
    greedy: bool = False,
) -> list[tuple[float, int]] | list[tuple[float, int, bool]]:
    """(summed log-probability, token count) of each request's continuation, in order; with
    `greedy`, (log-probability, token count, is_greedy): whether every continuation token is the
    model's most likely one (lm-evaluation-harness's second answer to a log-likelihood request).
    `progress(n)` is called as each batch finishes with the number of requests it scored."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    # A request asked twice (the same answer after "Answer:" in many MMLU questions) is scored
    # once.
    distinct = list(dict.fromkeys(requests))
    encoded = encode_requests(tokenizer, distinct, max_length)
    rows = _rows(encoded, strategy)
    # "flat" is the plain reference: nothing shared.
    groups = _shared_prefix_groups(rows) if strategy == "packed" else [(0, rows)]
    # The group with the longest rows first, and in each group the longest contexts first (a
    # pass pads to the longest in its batch; a batch that runs out of memory does so at once,
    # not at the end).
    groups.sort(key=lambda g: -max(len(r.context) - g[0] for r in g[1]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = torch.zeros(len(distinct), dtype=torch.float64)
    # Per request, how many continuation tokens were not the most likely one.
    misses = torch.zeros(len(distinct), dtype=torch.int64) if greedy else None
    for shared, group in groups:
        prefix = _prefix_cache(model, group[0].context[:shared], device) if shared else None
        group = sorted(group, key=lambda r: (-len(r.context), -r.length))
        for start in range(0, len(group), batch_size):
            batch = group[start : start + batch_size]
            # Rows with one continuation each (WinoGrande's cloze format) share nothing
            # beyond the prefix: one causal pass is cheaper than two.
            single = all(len(row.items) == 1 for row in batch)
            score = _score_flat if single else _score_packed
            score(model, batch, shared, prefix, pad, device, sums, misses)
            if progress is not None:
                progress(sum(len(r.items) for r in batch))
    if progress is not None and len(distinct) < len(requests):
        progress(len(requests) - len(distinct))
    scores = {
        r: (float(s), len(e.continuation)) for r, s, e in zip(distinct, sums.tolist(), encoded)
    }
    if misses is not None:
        scores = {r: (*scores[r], m == 0) for r, m in zip(distinct, misses.tolist())}
    return [scores[r] for r in requests]


def _prefix_cache(model, tokens: Sequence[int], device) -> KVCache:
    """The keys and values of a prefix that a group of contexts shares, from one causal pass."""
    cache = KVCache(model.config.num_hidden_layers)
    model.forward_hidden(
        input_ids=torch.tensor([tokens], device=device), past_key_values=cache, use_cache=True
    )
    return cache


def _batch_cache(model, prefix: KVCache | None, batch: int, capacity: int) -> KVCache:
    """A KV cache of `batch` rows with room for `capacity` positions, each row starting with
    the shared prefix's keys and values (when there is one)."""
    cache = KVCache(model.config.num_hidden_layers, capacity)
    if prefix is not None:
        for layer in range(cache.num_layers):
            keys, values = prefix.layer(layer)  # (1, G, S, D)
            cache.update(layer, keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
    return cache


def _score_flat(
    model, rows: list[_Row], shared: int, prefix: KVCache | None, pad: int, device, sums, misses
) -> None:
    """One causal pass over context + continuation per row, after the `shared` prefix tokens
    already in `prefix` (right-padded: padding after a row's tokens cannot affect them, so no
    mask is needed)."""
    sequences = [row.context[shared:] + row.items[0][1][:-1] for row in rows]
    input_ids = _padded(sequences, pad).to(device)
    length = input_ids.shape[1]
    cache = _batch_cache(model, prefix, len(rows), shared + length) if shared else None
    hidden = model.forward_hidden(
        input_ids=input_ids,
        past_key_values=cache,
        use_cache=bool(shared),
        cache_position=torch.arange(shared, shared + length, device=device),
    ).last_hidden_state  # (B, L, H)
    picks = []  # (row, position, target, request)
    for i, row in enumerate(rows):
        request, continuation = row.items[0]
        c = len(row.context) - shared
        picks += [(i, c - 1 + j, t, request) for j, t in enumerate(continuation)]
    _accumulate(model, [hidden], [(0, *p) for p in picks], device, sums, misses)


def _score_packed(
    model, rows: list[_Row], shared: int, prefix: KVCache | None, pad: int, device, sums, misses
) -> None:
    """Two passes after the `shared` prefix tokens already in `prefix`: the rest of the
    contexts (causal, right-padded, into the KV cache), then every row's continuations side by
    side, each attending to its row's cached context and to itself only. Single-token
    continuations (the MC letters) need no second pass at all."""
    contexts = [row.context[shared:] for row in rows]
    lc = shared + max(len(c) for c in contexts)  # cache slots of the contexts
    fed = [sum(len(c) - 1 for _, c in row.items) for row in rows]  # tokens of the 2nd pass
    lk = max(fed)
    cache = _batch_cache(model, prefix, len(rows), lc + lk) if lk or shared else None
    hidden_ctx = model.forward_hidden(
        input_ids=_padded(contexts, pad).to(device),
        past_key_values=cache,
        use_cache=cache is not None,
        cache_position=torch.arange(shared, lc, device=device),
    ).last_hidden_state  # (B, Lc - shared, H)
    hiddens = [hidden_ctx]
    picks = []  # (pass, row, position, target, request)
    if lk:
        input_ids = torch.full((len(rows), lk), pad, dtype=torch.long)
        positions = torch.zeros((len(rows), lk), dtype=torch.long)
        # allowed[b, t, s]: continuation token t may see cache slot s (contexts in [0, lc),
        # this pass's tokens after them).
        allowed = torch.zeros((len(rows), lk, lc + lk), dtype=torch.bool)
        causal = torch.ones(lk, lk, dtype=torch.bool).tril()
        for i, row in enumerate(rows):
            c, at = len(row.context), 0
            for _, continuation in row.items:
                k = len(continuation) - 1
                if k:
                    input_ids[i, at : at + k] = torch.tensor(continuation[:-1])
                    positions[i, at : at + k] = torch.arange(c, c + k)
                    allowed[i, at : at + k, :c] = True
                    allowed[i, at : at + k, lc + at : lc + at + k] = causal[:k, :k]
                at += k
            padding = torch.arange(at, lk)  # sees itself only; never read
            allowed[i, padding, lc + padding] = True
        hiddens.append(
            model.forward_hidden(
                input_ids=input_ids.to(device),
                attention_mask=allowed[:, None].to(device),
                position_ids=positions.to(device),
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.arange(lc, lc + lk, device=device),
            ).last_hidden_state  # (B, Lk, H)
        )
    for i, row in enumerate(rows):
        c, at = len(row.context), 0
        for request, continuation in row.items:
            # continuation[0] is predicted by the context's last position, continuation[j] by
            # the second-pass position holding continuation[j - 1].
            picks.append((0, i, c - 1 - shared, continuation[0], request))
            picks += [(1, i, at + j - 1, t, request) for j, t in enumerate(continuation) if j]
            at += len(continuation) - 1
    _accumulate(model, hiddens, picks, device, sums, misses)


def _padded(sequences: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad, dtype=torch.long)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = torch.tensor(sequence)
    return out


def _accumulate(
    model, hiddens, picks, device, sums: torch.Tensor, misses: torch.Tensor | None
) -> None:
    """Add log p(target) at each picked (pass, row, position) to its request's sum (and, with
    `misses`, count the targets that are not the most likely token), running the LM head once
    per distinct position (the MC letters all follow the same one)."""
    positions = sorted({p[:3] for p in picks})  # by pass, row, position
    slot = {key: i for i, key in enumerate(positions)}
    picked = torch.cat(
        [
            hidden[
                torch.tensor([p[1] for p in positions if p[0] == n], device=device),
                torch.tensor([p[2] for p in positions if p[0] == n], device=device),
            ]
            for n, hidden in enumerate(hiddens)
        ]
    )  # (P, H), in the order of `positions`
    ordered = sorted(picks, key=lambda p: slot[p[:3]])
    targets = torch.tensor([p[3] for p in ordered], device=device)
    owners = torch.tensor([p[4] for p in ordered])
    slots = [slot[p[:3]] for p in ordered]
    if misses is None:
        logprobs = target_logprobs(model, picked, slots, targets)
    else:
        logprobs, argmax = target_logprobs(model, picked, slots, targets, greedy=True)
        misses.index_add_(0, owners, (~argmax).long().cpu())
    sums.index_add_(0, owners, logprobs.double().cpu())
