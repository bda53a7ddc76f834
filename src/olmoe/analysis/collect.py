"""Run a model over a corpus and keep what its routers chose as compact counts.

A million tokens of router logits of the released model would be 4 GB (16 layers x 64 experts x
float32); the studies only need counts over each token's top-k expert set, which are a few
megabytes. `collect_routing` runs fixed-length chunks through the model and folds each chunk's
routing into a `RoutingCounts`; the logits never outlive their chunk.

Letters used in shape comments:
    T  tokens of a chunk batch (flattened)
    L  layers
    E  experts per layer
    K  experts per token (the model's top-k)
    V  vocabulary size
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from olmoe import engine
from olmoe.errors import ConfigError, DataError, InputError
from olmoe.fileio import atomic_path

COUNTS_FORMAT = "olmoe-routing-counts/1"
VOCABULARY_KINDS = ("input", "gold", "predicted")  # whose token id a routing is attributed to


@dataclass
class ChunkRouting:
    """The routing of one batch of chunks, flattened over batch and position."""

    input_ids: np.ndarray  # (T,) the token at each position
    next_ids: np.ndarray  # (T,) the gold next token; -1 at the last position of a chunk
    predicted_ids: np.ndarray | None  # (T,) the model's most probable next token, if computed
    experts: np.ndarray  # (T, L, K) expert ids, highest router logit first
    entropy: np.ndarray  # (T, L) entropy of the router's softmax over all experts, in nats


class SparseCounts:
    """Counts over a huge key space (layer x token id x expert) of which few keys occur.

    New keys are buffered and merged in batches, so adding a chunk costs a concatenation and
    a merge costs one sort of the keys seen so far.
    """

    MERGE_EVERY = 1 << 22  # buffered keys before a merge: 32 MB of int64

    def __init__(self, keys: np.ndarray | None = None, counts: np.ndarray | None = None):
        self._keys = np.zeros(0, np.int64) if keys is None else keys.astype(np.int64)
        self._counts = np.zeros(0, np.int64) if counts is None else counts.astype(np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        self._pending.append(keys.reshape(-1).astype(np.int64))
        self._pending_size += self._pending[-1].size
        if self._pending_size >= self.MERGE_EVERY:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        new = np.concatenate(self._pending)
        keys = np.concatenate([self._keys, new])
        weights = np.concatenate([self._counts, np.ones(new.size, np.int64)])
        self._keys, inverse = np.unique(keys, return_inverse=True)
        self._counts = np.bincount(inverse, weights=weights, minlength=self._keys.size).astype(
            np.int64
        )
        self._pending, self._pending_size = [], 0

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct keys (sorted) and how often each was added."""
        self._merge()
        return self._keys, self._counts


@dataclass
class VocabularyCounts:
    """For one way of attributing a position to a token id: how often each id occurred, and
    how often each (layer, id, expert) routing happened, for the top-1 expert and for the
    whole top-k set. Keys are `(layer * V + token_id) * E + expert`."""

    occurrences: np.ndarray  # (V,)
    top1: SparseCounts = field(default_factory=SparseCounts)
    topk: SparseCounts = field(default_factory=SparseCounts)


class RoutingCounts:
    """What a model's routers chose over one corpus, as counts the studies are computed from.

    `expert_counts[l, e]`: routing slots (token, expert in its top-k) that went to expert e in
    layer l; each token fills K slots. `top1_counts`: the same for each token's first choice.
    `pair_counts[l, i, j]`: tokens with both i and j in their top-k (i != j).
    `adjacent_pair_counts[l, i, j]`: times i and j were neighbours in a token's top-k sorted by
    router logit, in either order (what the OLMoE release's co-activation script counted).
    `entropy_sum[l]`: the sum over tokens of the router's softmax entropy (nats).
    `vocabulary`: per attribution kind (`input`, `gold`, `predicted`), if collected.
    `trace`: every token's (L, K) expert ids in corpus order, if kept (router saturation
    compares two models' traces on the same tokens).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, vocab_size: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.vocab_size = vocab_size
        self.tokens = 0
        shape = (num_layers, num_experts)
        self.expert_counts = np.zeros(shape, np.int64)
        self.top1_counts = np.zeros(shape, np.int64)
        self.pair_counts = np.zeros((num_layers, num_experts, num_experts), np.int64)
        self.adjacent_pair_counts = np.zeros_like(self.pair_counts)
        self.entropy_sum = np.zeros(num_layers, np.float64)
        self.vocabulary: dict[str, VocabularyCounts] = {}
        self._trace: list[np.ndarray] | None = None
        self._trace_ids: list[np.ndarray] = []

    # ------------------------------------------------------------------------ folding in
    def track_vocabulary(self, kinds: Iterable[str] = VOCABULARY_KINDS) -> None:
        for kind in kinds:
            if kind not in VOCABULARY_KINDS:
                raise ConfigError(f"unknown vocabulary kind {kind!r}; use {VOCABULARY_KINDS}")
            self.vocabulary.setdefault(kind, VocabularyCounts(np.zeros(self.vocab_size, np.int64)))

    def keep_trace(self) -> None:
        if self._trace is None:
            self._trace = []

    def update(self, chunk: ChunkRouting) -> None:
        experts = chunk.experts.astype(np.int64)
        tokens, layers, k = experts.shape
        if (layers, k) != (self.num_layers, self.top_k):
            raise DataError(
                f"routing of {layers} layers x top-{k} does not fit counts of "
                f"{self.num_layers} layers x top-{self.top_k}"
            )
        E = self.num_experts
        self.tokens += tokens
        layer_offset = (np.arange(layers) * E)[None, :, None]  # (1, L, 1)
        self.expert_counts += _bincount(experts + layer_offset, layers * E).reshape(layers, E)
        top1 = experts[:, :, :1]
        self.top1_counts += _bincount(top1 + layer_offset, layers * E).reshape(layers, E)

        member = torch.zeros(tokens, layers, E)  # (T, L, E) one-hot top-k sets
        member.scatter_(2, torch.from_numpy(experts.astype(np.int64)), 1.0)
        # Exact: each entry counts at most T tokens, far below float32's 2**24.
        pairs = torch.einsum("tli,tlj->lij", member, member).round().long().numpy()
        pairs[:, np.arange(E), np.arange(E)] = 0
        self.pair_counts += pairs

        first, second = experts[:, :, :-1], experts[:, :, 1:]  # (T, L, K-1) neighbours
        layer_block = (np.arange(layers) * E * E)[None, :, None]
        both_orders = np.concatenate([first * E + second, second * E + first], axis=2)
        neighbours = both_orders + layer_block  # (T, L, 2(K-1)) flat (layer, i, j) indices
        self.adjacent_pair_counts += _bincount(neighbours, layers * E * E).reshape(layers, E, E)
        self.entropy_sum += chunk.entropy.sum(axis=0, dtype=np.float64)

        for kind, vocabulary in self.vocabulary.items():
            ids = _attributed_ids(chunk, kind)
            keep = ids >= 0
            ids, routed = ids[keep], experts[keep]  # (T',), (T', L, K)
            vocabulary.occurrences += _bincount(ids, self.vocab_size)
            keys = (np.arange(layers)[None, :, None] * self.vocab_size + ids[:, None, None]) * E
            vocabulary.topk.add(keys + routed)
            vocabulary.top1.add(keys + routed[:, :, :1])

        if self._trace is not None:
            self._trace.append(experts.astype(_expert_dtype(E)))
            self._trace_ids.append(chunk.input_ids.astype(np.int64))

    # ------------------------------------------------------------------------ reading out
    @property
    def trace(self) -> np.ndarray | None:
        """(tokens, L, K) expert ids in corpus order, or None if no trace was kept."""
        if self._trace is None:
            return None
        if len(self._trace) != 1:
            self._trace = [np.concatenate(self._trace) if self._trace else _empty_trace(self)]
        return self._trace[0]

    @property
    def trace_ids(self) -> np.ndarray:
        """The token ids the trace belongs to."""
        if len(self._trace_ids) != 1:
            self._trace_ids = [np.concatenate(self._trace_ids or [np.zeros(0, np.int64)])]
        return self._trace_ids[0]

    # ------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write every count to one `.npz` file (written under a temporary name, then renamed).

        Arrays: the count arrays above under their names; `meta` (a JSON string: format,
        num_layers, num_experts, top_k, vocab_size, tokens); per vocabulary kind
        `{kind}_occurrences`, `{kind}_top1_keys`/`_counts`, `{kind}_topk_keys`/`_counts`;
        `trace` and `trace_ids` if a trace was kept.
        """
        path = Path(path)
        meta = {
            "format": COUNTS_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "vocab_size": self.vocab_size,
            "tokens": self.tokens,
        }
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "expert_counts": self.expert_counts,
            "top1_counts": self.top1_counts,
            "pair_counts": self.pair_counts,
            "adjacent_pair_counts": self.adjacent_pair_counts,
            "entropy_sum": self.entropy_sum,
        }
        for kind, vocabulary in self.vocabulary.items():
            arrays[f"{kind}_occurrences"] = vocabulary.occurrences
            for name in ("top1", "topk"):
                keys, counts = getattr(vocabulary, name).items()
                arrays[f"{kind}_{name}_keys"], arrays[f"{kind}_{name}_counts"] = keys, counts
        if self.trace is not None:
            arrays["trace"], arrays["trace_ids"] = self.trace, self.trace_ids
        with atomic_path(path) as temporary, open(temporary, "wb") as file:
            np.savez_compressed(file, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RoutingCounts:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("format") != COUNTS_FORMAT:
                raise DataError(f"{path} is not an olmoe routing-counts file ({COUNTS_FORMAT})")
            counts = cls(meta["num_layers"], meta["num_experts"], meta["top_k"], meta["vocab_size"])
            counts.tokens = meta["tokens"]
            for name in ("expert_counts", "top1_counts", "pair_counts", "adjacent_pair_counts"):
                setattr(counts, name, data[name].astype(np.int64))
            counts.entropy_sum = data["entropy_sum"].astype(np.float64)
            for kind in VOCABULARY_KINDS:
                if f"{kind}_occurrences" not in data:
                    continue
                counts.vocabulary[kind] = VocabularyCounts(
                    data[f"{kind}_occurrences"],
                    *(
                        SparseCounts(data[f"{kind}_{name}_keys"], data[f"{kind}_{name}_counts"])
                        for name in ("top1", "topk")
                    ),
                )
            if "trace" in data:
                counts._trace, counts._trace_ids = [data["trace"]], [data["trace_ids"]]
        return counts


def _bincount(values: np.ndarray, size: int) -> np.ndarray:
    return np.bincount(values.reshape(-1).astype(np.int64), minlength=size).astype(np.int64)


def _expert_dtype(num_experts: int) -> type:
    return np.uint8 if num_experts <= 256 else np.int32


def _empty_trace(counts: RoutingCounts) -> np.ndarray:
    return np.zeros((0, counts.num_layers, counts.top_k), _expert_dtype(counts.num_experts))


def _attributed_ids(chunk: ChunkRouting, kind: str) -> np.ndarray:
    if kind == "input":
        return chunk.input_ids
    if kind == "gold":
        return chunk.next_ids
    if chunk.predicted_ids is None:
        raise InputError("predicted-token counts need the chunk's predictions (predict=True)")
    return chunk.predicted_ids


# ---------------------------------------------------------------------------- the model side
@torch.no_grad()
def route_chunks(model, input_ids: torch.Tensor, predict: bool = False) -> ChunkRouting:
    """Run a batch of equal-length chunks (B, C) and return every token's routing.

    Each chunk is its own sequence starting at position 0, as in the paper's studies. Logits
    over the vocabulary are computed only when the predicted next tokens are wanted.
    """
    out = model(
        input_ids=input_ids,
        output_routing=True,
        use_cache=False,
        num_logits_to_keep=0 if predict else 1,
    )
    experts = [layer.top_k_indices for layer in out.routing]  # L x (T, K), T = B * C
    entropy = [layer.entropy() for layer in out.routing]  # L x (T,)
    next_ids = torch.full_like(input_ids, -1)  # (B, C)
    next_ids[:, :-1] = input_ids[:, 1:]
    predicted = out.logits.argmax(dim=-1).reshape(-1).cpu().numpy() if predict else None
    return ChunkRouting(
        input_ids=input_ids.reshape(-1).cpu().numpy(),
        next_ids=next_ids.reshape(-1).cpu().numpy(),
        predicted_ids=predicted,
        experts=torch.stack(experts, dim=1).cpu().numpy(),  # (T, L, K)
        entropy=torch.stack(entropy, dim=1).cpu().numpy(),  # (T, L)
    )


def split_chunks(tokens: np.ndarray, chunk_length: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of `chunk_length` tokens; the last one may be shorter."""
    if chunk_length < 2:
        raise ConfigError(f"chunk length must be at least 2 tokens, got {chunk_length}")
    for start in range(0, len(tokens), chunk_length):
        yield np.asarray(tokens[start : start + chunk_length], dtype=np.int64)


def collect_routing(
    model,
    tokens: np.ndarray | Sequence[np.ndarray],
    *,
    chunk_length: int = 2048,
    batch_size: int = 1,
    vocabulary: bool | Iterable[str] = False,
    keep_trace: bool = False,
    progress: bool = True,
    description: str = "routing",
) -> RoutingCounts:
    """Fold the model's routing over `tokens` (a 1-D array of ids, or several that are chunked
    separately, such as corpora pooled for one study) into `RoutingCounts`.

    Each array is cut into chunks of `chunk_length` (the paper: 2,048; at most the model's
    context), `batch_size` chunks per forward pass. `vocabulary=True` (or a list of kinds)
    also counts routings per token id, which for `predicted` computes the vocabulary logits.
    The model runs on the CPU engine where it applies (olmoe.engine).
    """
    engine.apply(model)
    config = model.config
    if config.moe_routing != "token_choice" or not config.moe_layer_indices:
        raise ConfigError(
            "the routing studies read each token's top-k choice of experts: this model has "
            + ("no experts" if not config.moe_layer_indices else "expert-choice routing")
        )
    if chunk_length > config.max_position_embeddings:
        raise ConfigError(
            f"chunk length {chunk_length} exceeds the model's context of "
            f"{config.max_position_embeddings} tokens; pass a smaller chunk length"
        )
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    streams = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
    largest = max((int(np.max(s)) for s in streams if len(s)), default=-1)
    if largest >= config.vocab_size:
        raise DataError(
            f"token id {largest} is outside the model's vocabulary of {config.vocab_size}; "
            "was the corpus tokenised with another tokenizer?"
        )
    counts = RoutingCounts(
        len(config.moe_layer_indices),
        config.num_experts,
        config.num_experts_per_tok,
        config.vocab_size,
    )
    kinds = VOCABULARY_KINDS if vocabulary is True else (vocabulary or ())
    counts.track_vocabulary(kinds)
    if keep_trace:
        counts.keep_trace()
    model.eval()
    device = next(model.parameters()).device
    with tqdm(
        total=sum(len(s) for s in streams),
        desc=description,
        unit="tok",
        unit_scale=True,
        disable=not progress,
    ) as bar:
        chunks = itertools.chain.from_iterable(split_chunks(s, chunk_length) for s in streams)
        for batch in _batches(chunks, batch_size):
            input_ids = torch.from_numpy(np.stack(batch)).to(device)
            chunk = route_chunks(model, input_ids, predict="predicted" in kinds)
            counts.update(chunk)
            bar.update(input_ids.numel())
    return counts


def _batches(chunks: Iterator[np.ndarray], batch_size: int) -> Iterator[list[np.ndarray]]:
    """Groups of up to `batch_size` chunks of one length (only the last chunk is shorter)."""
    batch: list[np.ndarray] = []
    for chunk in chunks:
        if batch and (len(batch) == batch_size or len(chunk) != len(batch[0])):
            yield batch
            batch = []
        batch.append(chunk)
    if batch:
        yield batch
