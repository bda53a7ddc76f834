"""The token streams the routing studies run over: named corpora of documents or token files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from olmoe.analysis.collect import RoutingCounts, collect_routing
from olmoe.data import encode_documents
from olmoe.data.sources import check_source
from olmoe.data.tokens import METADATA_FILE, load_tokens
from olmoe.errors import DataError, InputError


@dataclass(frozen=True)
class Corpus:
    """A corpus by name (what plots and result files call it) and source: a file, a folder, a
    built-in source of `olmoe data` (`stdlib`, `stdlib-code`, `stdlib-docstrings`), a prepared
    token directory (its validation split) or a token file (`.npy`, OLMo's raw memmaps)."""

    name: str
    source: str

    @classmethod
    def parse(cls, spec: str) -> Corpus:
        """`NAME=SOURCE`, or `SOURCE` alone, named after the file or built-in source."""
        name, separator, source = spec.partition("=")
        if not separator:
            source = spec
            name = Path(spec.rstrip("/")).stem or spec
        if not name or not source:
            raise InputError(f"corpus {spec!r} must be SOURCE or NAME=SOURCE with both non-empty")
        return cls(name, source)

    def check(self) -> None:
        """Raise DataError unless the source exists, before any model is loaded."""
        if not _is_token_source(Path(self.source).expanduser()):
            check_source(self.source)


def _is_token_source(path: Path) -> bool:
    return (path.is_dir() and (path / METADATA_FILE).is_file()) or (
        path.is_file() and path.suffix == ".npy"
    )


# The domains `olmoe data` can make on every machine: Python code and the English prose of its
# docstrings, so a model trained by the quickstart can be analysed offline right away.
DEFAULT_CORPORA = (Corpus("code", "stdlib-code"), Corpus("docstrings", "stdlib-docstrings"))


def corpus_tokens(source: str, tokenizer, max_tokens: int) -> np.ndarray:
    """The first `max_tokens` tokens of `source` as int64 ids.

    Documents are tokenised in corpus order with the end-of-text token after each, exactly as
    `olmoe data prepare` writes them; token directories and files are read as they are.
    """
    if max_tokens < 1:
        raise InputError(f"max tokens must be at least 1, got {max_tokens}")
    path = Path(source).expanduser()
    if _is_token_source(path):
        # A prepared directory gives its held-out split; a token file is read whole.
        return np.asarray(load_tokens(path, split="valid")[:max_tokens], dtype=np.int64)
    check_source(source)
    pieces, total = [], 0
    documents = encode_documents(source, tokenizer)
    for ids in documents:
        pieces.append(ids.astype(np.int64))
        total += len(ids)
        if total >= max_tokens:
            documents.close()  # ends the encoder's read-ahead thread
            break
    if total == 0:
        raise DataError(f"corpus {source!r} has no readable documents")
    return np.concatenate(pieces)[:max_tokens]


def collect_corpora(
    model,
    tokenizer,
    corpora: Sequence[Corpus] | None = None,
    *,
    max_tokens: int,
    chunk_length: int = 2048,
    batch_size: int = 1,
    pool: bool = False,
    keep_trace: bool = False,
    vocabulary: bool = False,
    progress: bool = True,
) -> dict[str, RoutingCounts]:
    """Route the first `max_tokens` tokens of each corpus (default: `DEFAULT_CORPORA`) through
    the model: counts per corpus name, or with `pool` one `RoutingCounts` named "all" (each
    corpus still chunked on its own). See `collect_routing` for the other arguments."""
    corpora = list(DEFAULT_CORPORA if corpora is None else corpora)
    names = [corpus.name for corpus in corpora]
    if not corpora or len(set(names)) != len(names):
        raise InputError(f"corpora need distinct names, got {names}; name them NAME=SOURCE")
    tokens = {
        corpus.name: corpus_tokens(corpus.source, tokenizer, max_tokens) for corpus in corpora
    }
    groups = {"all": list(tokens.values())} if pool else tokens
    return {
        name: collect_routing(
            model,
            streams,
            chunk_length=chunk_length,
            batch_size=batch_size,
            vocabulary=vocabulary,
            keep_trace=keep_trace,
            progress=progress,
            description=name,
        )
        for name, streams in groups.items()
    }
