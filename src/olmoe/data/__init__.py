"""Training data: sources -> documents -> OLMo-style token files -> fixed-length instances.

`olmoe data prepare SOURCES... --out DIR` (or `prepare`) writes DIR/train.npy, DIR/valid.npy and
DIR/metadata.json; `load_tokens` reads them and OLMo's raw token files; `InstanceLoader` serves
seeded, rank-sharded, resumable batches. Preparing data needs no torch: the loader's names load
on first use (olmoe.lazy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olmoe.data.encode import encode_documents
from olmoe.data.prepare import PrepareSummary, prepare
from olmoe.data.sources import SKIP_REASONS, STDLIB_SOURCES, iter_documents, stdlib_files
from olmoe.data.tokens import load_tokens, read_metadata, token_dtype
from olmoe.lazy import lazy_exports

_EXPORTS = {
    "InstanceLoader": ("olmoe.data.loader", "InstanceLoader"),
    "as_instances": ("olmoe.data.loader", "as_instances"),
}

if TYPE_CHECKING:  # what type checkers and editors see; tests check it matches _EXPORTS
    from olmoe.data.loader import InstanceLoader, as_instances

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "SKIP_REASONS",
    "STDLIB_SOURCES",
    "InstanceLoader",
    "PrepareSummary",
    "as_instances",
    "encode_documents",
    "iter_documents",
    "load_tokens",
    "prepare",
    "read_metadata",
    "stdlib_files",
    "token_dtype",
]
