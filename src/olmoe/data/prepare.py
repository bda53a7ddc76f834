"""`prepare`: sources -> a directory of OLMo-style token files (train.npy, valid.npy,
metadata.json).

Documents are tokenised by `olmoe.data.encode` (batched, on all cores), each followed by the eos
token. Tokens stream straight into the two .npy files, so memory stays bounded however large the
corpus is. Everything is written into a temporary folder beside the output, which is renamed
into place only once complete.

The validation split is drawn by document: document i goes to "valid" when the i-th draw of a
generator seeded with `seed` is below `valid_fraction`. So that a small corpus still gets a
usable validation set, the first `valid_min_tokens / valid_fraction` tokens are held in memory;
if the corpus ends within them, the documents with the next-smallest draws move to "valid" until
it holds `valid_min_tokens` tokens (at most half the documents). The split depends only on the
documents, their order and the seed.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olmoe.data.encode import (
    OLMO_TOKENIZER_NAME,  # noqa: F401 - the trainer imports it from here
    DocumentEncoder,
)
from olmoe.data.sources import check_source, stdlib_dir
from olmoe.data.tokens import FORMAT, METADATA_FILE, SPLITS, NpyWriter
from olmoe.errors import ConfigError, DataError, InputError
from olmoe.fileio import atomic_directory, check_writable

# The most tokens held back to size a small corpus's validation split (~200-400 MB of memory).
MAX_BUFFER_TOKENS = 50_000_000


@dataclass
class SourceStats:
    source: str
    documents: int = 0
    tokens: int = 0  # eos tokens included
    bytes: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass
class PrepareSummary:
    """What `prepare` wrote: the directory, its metadata (as in metadata.json) and the time."""

    out_dir: Path
    metadata: dict[str, Any]
    seconds: float

    @property
    def tokens(self) -> int:
        return sum(split["tokens"] for split in self.metadata["splits"].values())

    @property
    def documents(self) -> int:
        return sum(split["documents"] for split in self.metadata["splits"].values())

    @property
    def skipped(self) -> dict[str, int]:
        return self.metadata["skipped"]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def format(self) -> str:
        """A few lines for people: per source, per split, skips, time and speed."""
        lines = []
        for source in self.metadata["sources"]:
            skipped = sum(source["skipped"].values())
            lines.append(
                f"{source['source']}: {_count(source['documents'], 'document')}, "
                f"{_count(source['tokens'], 'token')}, {_count(source['bytes'], 'byte')}"
                + (f", {skipped:,} skipped" if skipped else "")
            )
        for name, split in self.metadata["splits"].items():
            lines.append(
                f"{name}: {_count(split['documents'], 'document')}, "
                f"{_count(split['tokens'], 'token')} "
                f"({_count(self.metadata['bytes'][name], 'byte')} of text)"
            )
        if (
            self.metadata["valid"]["fraction"] > 0
            and not self.metadata["splits"]["valid"]["tokens"]
        ):
            lines.append(
                "note: the validation split is empty (it takes whole documents, at most half of "
                "them): split a single large file into several"
            )
        if self.skipped:
            reasons = ", ".join(f"{n:,} {reason}" for reason, n in self.skipped.items())
            lines.append(f"skipped: {reasons}")
        else:
            lines.append("skipped: none")
        lines.append(
            f"wrote {self.out_dir} ({self.metadata['dtype']}) in {self.seconds:.1f} s, "
            f"{self.tokens_per_second:,.0f} tokens/s"
        )
        return "\n".join(lines)


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def prepare(
    sources: Sequence[str] | str,
    out_dir: str | os.PathLike,
    tokenizer=None,
    valid_fraction: float = 0.01,
    valid_min_tokens: int = 100_000,
    seed: int = 0,
    force: bool = False,
    progress: bool | None = None,
) -> PrepareSummary:
    """Tokenise `sources` (files, folders, "stdlib", "stdlib-code", "stdlib-docstrings"; see
    olmoe.data.sources) into `out_dir`.

    tokenizer: None for OLMoE's (the OLMo GPT-NeoX tokenizer), a checkpoint directory or hub
    repo id, or an olmoe Tokenizer. valid_fraction of the documents (and at least
    valid_min_tokens tokens, see the module docstring) go to the validation split; 0 writes an
    empty one. force replaces an existing prepared directory. progress: a bar on stderr (None:
    only on a terminal).
    """
    started = time.perf_counter()
    sources = [sources] if isinstance(sources, str) else list(sources)
    if not sources:
        raise InputError("no sources given: pass files, folders or a built-in source (stdlib)")
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    if valid_min_tokens < 0:
        raise ConfigError(f"valid_min_tokens must be >= 0, got {valid_min_tokens}")
    for source in sources:
        check_source(source)
    out_dir = Path(out_dir).expanduser()
    _check_output(out_dir, force)
    check_writable(out_dir)  # a read-only --out fails now, not after the tokenising
    encoder = DocumentEncoder(tokenizer)

    with atomic_directory(out_dir) as staging:
        splitter = _Splitter(staging, encoder.dtype, valid_fraction, valid_min_tokens, seed)
        stats = []
        bar = _progress_bar(progress)
        try:
            for source in sources:
                stats.append(_tokenize_source(source, encoder, splitter, bar))
            splits = splitter.close()
        except BaseException:
            splitter.discard()
            raise
        finally:
            bar.close()
        skipped: Counter = Counter()
        for entry in stats:
            skipped.update(entry.skipped)
        if not any(entry.documents for entry in stats):
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
            raise DataError(
                f"the sources hold no documents (skipped: {reasons or 'nothing'}); pass files "
                "with text in them"
            )
        metadata = {
            "format": FORMAT,
            "tokenizer": encoder.name,
            "eos_token_id": encoder.eos,
            "vocab_size": encoder.vocab_size,
            "dtype": encoder.dtype.name,
            "splits": {
                name: {"tokens": s.tokens, "documents": s.documents} for name, s in splits.items()
            },
            "bytes": {name: s.bytes for name, s in splits.items()},
            "sources": [_provenance(entry) for entry in stats],
            "skipped": dict(sorted(skipped.items())),
            "valid": {"fraction": valid_fraction, "min_tokens": valid_min_tokens, "seed": seed},
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        _check_output(out_dir, force)  # it may have appeared while we were working
    return PrepareSummary(out_dir, metadata, time.perf_counter() - started)


# ---------------------------------------------------------------------------- tokenising
def _tokenize_source(
    source: str, encoder: DocumentEncoder, splitter: _Splitter, bar
) -> SourceStats:
    stats = SourceStats(source)
    for tokens, document in encoder.encode(source, stats.skipped):
        splitter.add(tokens, document.nbytes)
        stats.documents += 1
        stats.tokens += len(tokens)
        stats.bytes += document.nbytes
        bar.update(document.nbytes)
    return stats


@dataclass
class _SplitStats:
    tokens: int = 0
    documents: int = 0
    bytes: int = 0


class _Splitter:
    """Routes each tokenised document to train or valid and streams it to that split's file."""

    def __init__(self, folder: Path, dtype, fraction: float, min_tokens: int, seed: int):
        self.fraction, self.min_tokens = fraction, min_tokens
        self.writers = {name: NpyWriter(folder / f"{name}.npy", dtype) for name in SPLITS}
        self.stats = {name: _SplitStats() for name in SPLITS}
        self.draws = np.random.default_rng(seed)
        buffer_tokens = math.ceil(min_tokens / fraction) if fraction > 0 and min_tokens else 0
        if buffer_tokens > MAX_BUFFER_TOKENS:
            raise ConfigError(
                f"valid_min_tokens / valid_fraction = {buffer_tokens:,} tokens would be held in "
                f"memory to size the validation split (at most {MAX_BUFFER_TOKENS:,}): lower "
                "valid_min_tokens or raise valid_fraction"
            )
        self.buffer_tokens = buffer_tokens
        self.buffer: list[tuple[float, np.ndarray, int]] | None = [] if buffer_tokens else None
        self.buffered = 0

    def add(self, tokens: np.ndarray, nbytes: int) -> None:
        """One document's ids and eos; nbytes: its text's UTF-8 bytes."""
        draw = float(self.draws.random())
        if self.buffer is None:
            self._write("valid" if draw < self.fraction else "train", tokens, nbytes)
            return
        self.buffer.append((draw, tokens, nbytes))
        self.buffered += len(tokens)
        if self.buffered >= self.buffer_tokens:  # large enough: the fraction alone decides
            for held_draw, held_tokens, held_bytes in self.buffer:
                split = "valid" if held_draw < self.fraction else "train"
                self._write(split, held_tokens, held_bytes)
            self.buffer = None

    def close(self) -> dict[str, _SplitStats]:
        if self.buffer is not None:
            self._split_small_corpus()
        for writer in self.writers.values():
            writer.close()
        return self.stats

    def discard(self) -> None:
        """Close the files after a failure (their folder is about to be removed)."""
        for writer in self.writers.values():
            writer.discard()

    def _split_small_corpus(self) -> None:
        """Valid gets the documents with the smallest draws: those below the fraction (as in a
        large corpus), then more until it has min_tokens tokens or half the documents."""
        order = sorted(range(len(self.buffer)), key=lambda i: self.buffer[i][0])
        valid, valid_tokens = set(), 0
        for i in order:
            draw, tokens, _ = self.buffer[i]
            topped_up = valid_tokens >= self.min_tokens or len(valid) >= len(self.buffer) // 2
            if draw >= self.fraction and topped_up:
                break
            valid.add(i)
            valid_tokens += len(tokens)
        for i, (_, tokens, nbytes) in enumerate(self.buffer):
            self._write("valid" if i in valid else "train", tokens, nbytes)
        self.buffer = None

    def _write(self, split: str, tokens: np.ndarray, nbytes: int) -> None:
        self.writers[split].write(tokens)
        stats = self.stats[split]
        stats.tokens += len(tokens)
        stats.documents += 1
        stats.bytes += nbytes


# ---------------------------------------------------------------------------- helpers
def _provenance(stats: SourceStats) -> dict[str, Any]:
    entry = stats.to_dict()
    if stats.source.startswith("stdlib"):
        import platform

        entry["path"] = str(stdlib_dir())
        entry["python"] = platform.python_version()
    else:
        entry["path"] = str(Path(stats.source).expanduser().resolve())
    return entry


def _is_prepared_dir(path: Path) -> bool:
    try:
        return json.loads((path / METADATA_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_output(out_dir: Path, force: bool) -> None:
    if not out_dir.exists():
        return
    if not force:
        raise InputError(f"{out_dir} exists; pass --force (force=True) to replace it")
    # --force deletes the old directory, so it must be one this function wrote (or empty):
    # a mistyped --out must never remove unrelated files.
    if not out_dir.is_dir() or not (_is_prepared_dir(out_dir) or not any(out_dir.iterdir())):
        raise InputError(
            f"{out_dir} exists and is not a prepared token directory, so --force will not "
            "replace it; choose another --out or remove it yourself"
        )


def _progress_bar(progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc="tokenising",
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
    )
