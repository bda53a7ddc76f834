"""Token files: the prepared directory's .npy files and OLMo's raw memmaps, read as they are.

OLMo's own token files (written by Dolma's tokenizer, often named `part-N-00000.npy`) are flat
little-endian arrays with no header despite the name; ours are real .npy files (np.save's
format). `load_tokens` tells them apart by the .npy magic bytes, not by the name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from olmoe.errors import ConfigError, DataError, InputError

FORMAT = "olmoe-tokens/1"
METADATA_FILE = "metadata.json"
SPLITS = ("train", "valid")
NPY_MAGIC = b"\x93NUMPY"
# Our .npy header is written before the token count is known and patched at the end, so it has a
# fixed size; 128 bytes keeps the data 64-byte aligned, as numpy's own writer does.
_HEADER_BYTES = 128


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (OLMo's choice: half the disk and memory), else uint32."""
    if vocab_size <= 0:
        raise ConfigError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ConfigError(f"a vocabulary of {vocab_size:,} ids does not fit uint32 token files")
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """A prepared directory's metadata.json (counts, bytes per split for bits-per-byte, ...)."""
    path = Path(directory).expanduser() / METADATA_FILE
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: {directory} is not a directory `olmoe data prepare` wrote"
        ) from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DataError(f"{path} is not olmoe token metadata (format {FORMAT!r})")
    return metadata


def load_tokens(
    path: str | os.PathLike, split: str = "train", dtype: np.dtype | str | None = None
) -> np.ndarray:
    """A read-only memory map of tokens.

    path: a prepared directory (its `split`), one of its .npy files, or a headerless OLMo token
    file (flat little-endian ids; dtype defaults to uint16, pass uint32 for large vocabularies).
    A .npy file whose dtype differs from a given `dtype` is an error, not a silent conversion.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        file = path / f"{split}.npy"
        if not file.is_file():
            present = sorted(p.stem for p in path.glob("*.npy"))
            raise FileNotFoundError(
                f"{path} has no {split!r} split ({file.name}); it has "
                f"{', '.join(present) or 'no .npy files'}"
            )
        path = file
    elif not path.is_file():
        raise FileNotFoundError(f"token file {path} does not exist")
    with open(path, "rb") as handle:
        is_npy = handle.read(len(NPY_MAGIC)) == NPY_MAGIC
    return _load_npy(path, dtype) if is_npy else _load_raw(path, dtype)


def _load_npy(path: Path, dtype) -> np.ndarray:
    try:
        # Only numeric arrays: a pickled object array is never loaded (allow_pickle=False).
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "empty" not in str(exc):
            raise DataError(f"{path} is not a readable .npy file ({exc})") from None
        array = np.load(path, allow_pickle=False)  # a zero-length array cannot be memory-mapped
    if array.ndim != 1 or array.dtype.kind not in "ui":
        raise DataError(
            f"{path} holds a {array.dtype} array of shape {array.shape}, not a flat array of "
            "token ids"
        )
    if dtype is not None and np.dtype(dtype) != array.dtype:
        raise DataError(f"{path} holds {array.dtype} tokens, not {np.dtype(dtype)}")
    return array


def _load_raw(path: Path, dtype) -> np.ndarray:
    dtype = np.dtype(np.uint16 if dtype is None else dtype).newbyteorder("<")
    if dtype.kind not in "ui":
        raise InputError(f"token files hold unsigned integers; dtype {dtype} is not one")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{path} has {size} bytes, not a whole number of {dtype.itemsize}-byte tokens: pass "
            "the dtype it was written with (OLMo uses uint16, or uint32 for vocabularies over "
            "65,536)"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class NpyWriter:
    """Appends 1-D token arrays to a .npy file whose length is unknown until `close`."""

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.count = path, np.dtype(dtype).newbyteorder("<"), 0
        self._handle = open(path, "wb")  # noqa: SIM115 - open across writes until close()
        self._handle.write(_npy_header(self.dtype, 0))

    def write(self, tokens: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.count += len(tokens)

    def close(self) -> None:
        self._handle.seek(0)
        self._handle.write(_npy_header(self.dtype, self.count))
        self._handle.close()

    def discard(self) -> None:
        """Close without finishing the header (the file is being thrown away)."""
        self._handle.close()


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    """numpy's format 1.0 header for a flat array, padded with spaces to `_HEADER_BYTES`."""
    fields = repr({"descr": dtype.str, "fortran_order": False, "shape": (count,)})
    room = _HEADER_BYTES - len(NPY_MAGIC) - 4  # magic, version (2 bytes), length (2 bytes)
    text = fields.ljust(room - 1) + "\n"
    return NPY_MAGIC + b"\x01\x00" + (room).to_bytes(2, "little") + text.encode("latin1")
