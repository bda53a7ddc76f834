"""Documents -> token arrays, each followed by eos: the one encoding `prepare` writes to disk and
that other parts (the routing analysis' corpora) use to tokenise sources the same way.

Documents are encoded in chunks with `tokenizers`' batch encoder (Rust, on all cores) while a
background thread reads the next chunk. Text that spells a special token ("<|endoftext|>" in a
document about tokenisers) is encoded as ordinary text, so the eos id only ever ends a document.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from olmoe.data.sources import Document, read_documents
from olmoe.data.tokens import token_dtype
from olmoe.errors import ConfigError

OLMO_TOKENIZER_NAME = "allenai/gpt-neox-olmo-dolma-v1_5"
CHUNK_BYTES = 4 << 20  # text per encode_batch call: enough to keep every core busy
CHUNK_DOCUMENTS = 4096
FIRST_CHUNK_DOCUMENTS = 64


def encode_documents(
    source: str, tokenizer=None, skipped: Counter | None = None
) -> Iterator[np.ndarray]:
    """Each document of `source` (see `iter_documents`) as its token ids followed by eos, in the
    token files' dtype: exactly what `prepare` writes for it. tokenizer: as for `prepare`.
    Stopping early is fine: the reading thread ends with the iterator."""
    for tokens, _ in DocumentEncoder(tokenizer).encode(source, skipped):
        yield tokens


class DocumentEncoder:
    """A tokenizer set up for documents: its name for the metadata, eos, id range and dtype."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer, self.name = resolve_tokenizer(tokenizer)
        self.eos = self.tokenizer.eos_token_id
        if self.eos is None:
            raise ConfigError(
                "the tokenizer has no eos token, which separates documents; use another"
            )
        backend = self.tokenizer.backend_tokenizer
        # The ids' range, which can exceed len(tokenizer) when added tokens leave gaps.
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.dtype = token_dtype(self.vocab_size)
        self._backend = type(backend).from_str(backend.to_str())  # a copy: the caller's is kept
        self._backend.encode_special_tokens = True

    def encode(
        self, source: str, skipped: Counter | None = None
    ) -> Iterator[tuple[np.ndarray, Document]]:
        """(ids + eos, the document) for each document of `source`, in order."""
        chunks = _read_ahead(_chunks(read_documents(source, skipped)))
        try:
            for chunk in chunks:
                texts = [document.text for document in chunk]
                encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
                for document, encoding in zip(chunk, encodings):
                    ids = encoding.ids
                    tokens = np.empty(len(ids) + 1, dtype=self.dtype)
                    tokens[:-1] = ids
                    tokens[-1] = self.eos
                    yield tokens, document
        finally:
            chunks.close()  # stops the reading thread when the caller stops early


def resolve_tokenizer(tokenizer) -> tuple[Any, str]:
    """(an olmoe Tokenizer, the name metadata records) for None (OLMoE's own: the OLMo
    GPT-NeoX tokenizer), a checkpoint directory or hub repo id, or a Tokenizer."""
    from olmoe.tokenizer import Tokenizer

    if tokenizer is None:
        return Tokenizer.from_pretrained(None), OLMO_TOKENIZER_NAME
    if isinstance(tokenizer, (str, os.PathLike)):
        return Tokenizer.from_pretrained(tokenizer), str(tokenizer)
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, "custom (a Tokenizer object)"
    raise TypeError(
        f"tokenizer must be None, a path or hub repo id, or an olmoe Tokenizer; got "
        f"{type(tokenizer).__name__}"
    )


def _chunks(documents: Iterator[Document]) -> Iterator[list[Document]]:
    """Lists of documents for one batch call each. The first are small and they double up to
    the full size, so the first tokens come quickly (a caller that needs only a few, a progress
    bar) while the bulk is encoded in large, efficient batches."""
    chunk: list[Document] = []
    chunk_bytes, most = 0, FIRST_CHUNK_DOCUMENTS
    for document in documents:
        chunk.append(document)
        chunk_bytes += document.nbytes
        if chunk_bytes >= CHUNK_BYTES or len(chunk) >= min(most, CHUNK_DOCUMENTS):
            yield chunk
            chunk, chunk_bytes, most = [], 0, 2 * most
    if chunk:
        yield chunk


def _read_ahead(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead, in order. Reading and
    parsing documents is Python (it holds the GIL); encoding is Rust and releases it, so the two
    overlap instead of taking turns."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 - raised again in the consuming thread
            put((None, exc))

    thread = threading.Thread(target=produce, name="olmoe-data-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error, an interrupt): let the thread end
        thread.join()
