"""Perplexity and bits per byte over a corpus, with a sliding window.

Every token is scored exactly once, with as much left context as the window allows: windows of
`max_length` tokens end every `stride` tokens, and each window scores only the tokens the
previous one did not (transformers' perplexity guide). A smaller stride gives each token more
context at more cost (stride must stay below max_length, so every window keeps some context).

A corpus is scored as the token stream `olmoe data prepare` writes for it: each document's
tokens followed by the end-of-text token, all documents in one stream, after one more
end-of-text token so that the first document's first token is scored too. Text sources are
encoded by `olmoe.data`'s own encoder, so text and the token directory prepared from it give
the same numbers.

bits per byte = summed negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the text (the
end-of-text tokens are scored but have no bytes); it compares models with different
tokenizers, which perplexity per token does not.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from olmoe.errors import ConfigError, DataError
from olmoe.eval.logprobs import target_logprobs


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    tokens: int  # tokens scored
    bytes: int | None  # UTF-8 bytes of the text they encode (None when unknown)
    nll: float  # summed negative log-likelihood, nats
    documents: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / math.log(2)

    @property
    def bits_per_byte(self) -> float | None:
        return None if not self.bytes else self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "bits_per_token": self.bits_per_token,
            "bits_per_byte": self.bits_per_byte,
            "nll_nats": self.nll,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a sequence of `length` tokens
    whose position 0 is context only. The first window scores 1..max_length-1; each next one
    ends `stride` tokens later and scores those, after max_length - stride tokens of context.
    Together they score positions 1..length-1 once each."""
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise ConfigError(f"stride must be in [1, max_length={max_length}), got {stride}")
    spans, end = [], min(max_length, length)
    if length > 1:
        spans.append((0, end, 1))
    while end < length:
        new_end = min(end + stride, length)
        spans.append((new_end - max_length, new_end, end))
        end = new_end
    return spans


@torch.inference_mode()
def sequence_nll(
    model,
    tokens: np.ndarray | Sequence[int] | torch.Tensor,
    max_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Summed negative log-likelihood (nats) of tokens[1:] given what precedes them, through
    sliding windows; `progress(n)` gets the number of tokens each batch scored."""
    stride = max_length // 2 if stride is None else stride
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    device = next(model.parameters()).device
    spans = windows(len(tokens), max_length, stride)
    total = 0.0
    # Windows of equal length batch without padding; all but the last have max_length tokens.
    for lo in range(0, len(spans), batch_size):
        group = spans[lo : lo + batch_size]
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for span in group:
            by_length.setdefault(span[1] - span[0], []).append(span)
        for same in by_length.values():
            inputs = torch.stack([tokens[b:e] for b, e, _ in same]).to(device)  # (B, L)
            hidden = model.forward_hidden(input_ids=inputs, use_cache=False).last_hidden_state
            rows, cols, targets = [], [], []
            for i, (b, e, first) in enumerate(same):
                scored = torch.arange(first, e)  # absolute positions to score
                rows += [i] * len(scored)
                cols += (scored - b - 1).tolist()  # predicted by the position before
                targets += tokens[first:e].tolist()
            picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
            targets_t = torch.tensor(targets, device=device)
            logprobs = target_logprobs(model, picked, list(range(len(targets))), targets_t)
            total -= float(logprobs.double().sum())
            if progress is not None:
                progress(len(targets))
    return total


def corpus_perplexity(
    model,
    tokens: np.ndarray | Sequence[int],
    separator: int,
    num_bytes: int | None,
    documents: int,
    max_length: int = 2048,
    stride: int | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Score a stream of `documents` documents, each followed by the `separator`
    (end-of-text) token, after one more separator; `num_bytes` is the UTF-8 size of their
    text."""
    if len(tokens) == 0:
        raise DataError("no tokens to score: the text or split is empty")
    sequence = np.concatenate([[separator], np.asarray(tokens, dtype=np.int64)])
    nll = sequence_nll(model, sequence, max_length, stride, batch_size, progress)
    return PerplexityResult(len(tokens), num_bytes, nll, documents)


def text_perplexity(model, tokenizer, source: str | os.PathLike, **kwargs) -> PerplexityResult:
    """Perplexity and bits per byte of a text source: a file or folder (or a built-in source)
    read and encoded exactly as `olmoe data prepare` does, with `tokenizer`."""
    from olmoe.data.encode import DocumentEncoder

    encoder = DocumentEncoder(tokenizer)
    documents, num_bytes = [], 0
    for tokens, document in encoder.encode(str(source)):
        documents.append(tokens)
        num_bytes += document.nbytes
    if not documents:
        raise DataError(f"{source} holds no text to score (empty, binary or not UTF-8)")
    return corpus_perplexity(
        model, np.concatenate(documents), encoder.eos, num_bytes, len(documents), **kwargs
    )


def token_perplexity(model, directory: str, split: str = "valid", **kwargs) -> PerplexityResult:
    """Perplexity and bits per byte of a split of a directory `olmoe data prepare` wrote."""
    from olmoe.data import load_tokens, read_metadata

    metadata = read_metadata(directory)
    tokens = load_tokens(directory, split)
    num_bytes = metadata.get("bytes", {}).get(split)
    separator = int(metadata["eos_token_id"])
    documents = metadata.get("splits", {}).get(split, {}).get("documents", 0)
    return corpus_perplexity(model, tokens, separator, num_bytes, documents, **kwargs)
