"""The OLMoE paper's routing statistics, computed from `RoutingCounts`.

Every function is a small formula over counts (see `collect.py`), so the same numbers come out of
a fresh collection, a saved `.npz` file, or a hand-built routing in the tests. An expert set is a
token's top-k by router logit in one layer, as in the paper (section 5).
"""

from __future__ import annotations

import numpy as np

from olmoe.analysis.collect import RoutingCounts
from olmoe.errors import InputError

_SATURATION_BLOCK = 1 << 16  # tokens compared at once: bounds the (T, L, k, k) comparison


def router_saturation(early: RoutingCounts, final: RoutingCounts, k: int) -> np.ndarray:
    """Per layer, the mean over tokens of |top-k(early) ∩ top-k(final)| / k.

    Both must be collections of the same tokens with `keep_trace=True`. Independent routers
    give about k/E; a router that no longer changes gives 1.
    """
    a, b = early.trace, final.trace
    if a is None or b is None:
        raise InputError("router saturation needs traces: collect both with keep_trace=True")
    if a.shape[:2] != b.shape[:2] or not np.array_equal(early.trace_ids, final.trace_ids):
        raise InputError("the two collections did not route the same tokens")
    if not 1 <= k <= min(a.shape[2], b.shape[2]):
        raise InputError(f"k must be between 1 and the top-k of both models, got {k}")
    if len(a) == 0:
        raise InputError("the collections are empty")
    overlap = np.zeros(a.shape[1], np.int64)
    for start in range(0, len(a), _SATURATION_BLOCK):
        x = a[start : start + _SATURATION_BLOCK, :, :k, None]  # (T, L, k, 1)
        y = b[start : start + _SATURATION_BLOCK, :, None, :k]  # (T, L, 1, k)
        overlap += (x == y).any(axis=-1).sum(axis=(0, 2))
    return overlap / (len(a) * k)


def coactivation(counts: RoutingCounts, adjacent: bool = False) -> np.ndarray:
    """(L, E, E): N(Ei and Ej in one token's top-k) / N(Ei), row i, column j.

    The paper's definition counts every pair of a token's experts. `adjacent=True` counts only
    neighbours in the logit-sorted top-k, as the OLMoE release's plotting script did; it gives
    lower values and is offered only to reproduce that figure.
    """
    pairs = counts.adjacent_pair_counts if adjacent else counts.pair_counts
    used = counts.expert_counts[:, :, None]  # (L, E, 1) tokens that chose Ei
    return np.divide(pairs, used, out=np.zeros(pairs.shape), where=used > 0)


def most_used_experts(counts: RoutingCounts, layer: int, n: int) -> np.ndarray:
    """The `n` experts of `layer` that received the most routing slots, busiest first."""
    return np.argsort(-counts.expert_counts[layer], kind="stable")[:n]


def expert_shares(counts: RoutingCounts, top1: bool = False) -> np.ndarray:
    """(L, E): routing slots per expert over tokens. Over the top-k set each token fills k
    slots, so a row sums to k and a uniform router gives k/E; with `top1`, rows sum to 1."""
    if counts.tokens == 0:
        raise InputError("no tokens were routed")
    return (counts.top1_counts if top1 else counts.expert_counts) / counts.tokens


def load_statistics(counts: RoutingCounts) -> dict[str, np.ndarray]:
    """Per layer: tokens per expert, max/mean and min/mean load, the entropy of the load
    distribution over experts (nats; log E when perfectly balanced), and the mean entropy of
    a token's router softmax (nats; log E for a router with no preference)."""
    if counts.tokens == 0:
        raise InputError("no tokens were routed")
    load = counts.expert_counts.astype(np.float64)  # (L, E)
    mean = load.mean(axis=1)
    share = load / load.sum(axis=1, keepdims=True)
    safe = np.where(share > 0, share, 1.0)
    return {
        "tokens_per_expert": counts.expert_counts,
        "max_over_mean": load.max(axis=1) / mean,
        "min_over_mean": load.min(axis=1) / mean,
        "load_entropy": -(share * np.log(safe)).sum(axis=1),
        "router_entropy": counts.entropy_sum / counts.tokens,
    }


def _vocabulary(counts: RoutingCounts, kind: str, top1: bool):
    if kind not in counts.vocabulary:
        raise InputError(
            f"no {kind!r} vocabulary counts were collected; collect with vocabulary=True"
        )
    vocabulary = counts.vocabulary[kind]
    keys, hits = (vocabulary.top1 if top1 else vocabulary.topk).items()
    V, E = counts.vocab_size, counts.num_experts
    layer, token, expert = keys // (V * E), (keys // E) % V, keys % E
    return vocabulary.occurrences, layer, token, expert, hits


def vocabulary_specialization(
    counts: RoutingCounts, kind: str = "input", top1: bool = True, min_count: int = 10
) -> np.ndarray:
    """Per layer: for each token id seen at least `min_count` times, the largest share of its
    occurrences routed to one expert; averaged over those ids (NaN for a layer without any).

    `kind` attributes a position to its input token, the gold next token or the predicted next
    token. With `top1=False` an occurrence counts for every expert of its top-k set.
    """
    occurrences, layer, token, _, hits = _vocabulary(counts, kind, top1)
    # Keys are sorted, so the (layer, token) groups are contiguous runs.
    group = layer * counts.vocab_size + token
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    best = np.maximum.reduceat(hits, starts) if len(hits) else hits
    group_layer, group_token = layer[starts], token[starts]
    frequent = occurrences[group_token] >= min_count
    result = np.full(counts.num_layers, np.nan)
    for index in range(counts.num_layers):
        chosen = frequent & (group_layer == index)
        if chosen.any():
            result[index] = np.mean(best[chosen] / occurrences[group_token[chosen]])
    return result


def preferred_tokens(
    counts: RoutingCounts,
    layer: int,
    kind: str = "input",
    top1: bool = True,
    min_count: int = 10,
    top: int = 10,
) -> list[list[tuple[int, float, int]]]:
    """Per expert of `layer`: the token ids (seen at least `min_count` times) with the largest
    share of their occurrences routed to it, as (token id, share, routed count), best first."""
    occurrences, key_layer, token, expert, hits = _vocabulary(counts, kind, top1)
    here = (key_layer == layer) & (occurrences[token] >= min_count)
    token, expert, hits = token[here], expert[here], hits[here]
    share = hits / occurrences[token]
    result = []
    for index in range(counts.num_experts):
        mine = np.flatnonzero(expert == index)
        order = mine[np.lexsort((-hits[mine], -share[mine]))][:top]
        result.append([(int(token[i]), float(share[i]), int(hits[i])) for i in order])
    return result
