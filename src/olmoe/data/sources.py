"""Sources of training text, turned into documents (one string each).

A source is a file, a folder (read recursively) or a built-in name:

- a text file (any name) is one document, read whole; its bytes must be UTF-8 without NUL
  bytes.
- a `.jsonl` / `.json` file, optionally compressed (`.gz`, `.bz2`, `.xz`), holds one JSON object
  per line with the document in its "text" field: the Dolma document format OLMo's data is in.
  A plain `.gz` / `.bz2` / `.xz` file of another name is one compressed text document; zstd,
  lz4 and zip files are skipped (counted as "unsupported-compression").
- a folder: every file below it, folder by folder in sorted order (a folder's files before its
  subfolders); names starting with "." (`.git`, editor files) are left out.
- "stdlib": this Python's standard library, one document per `.py` file (code with its
  docstrings), from `sysconfig.get_paths()["stdlib"]`, without the test suites (folders named
  `test`, `tests`, `idle_test`), `site-packages`/`dist-packages` (installed packages, not the
  standard library) and `__pycache__`. Files are kept as they are, parsable or not.
- "stdlib-code": the same files with every docstring (module, class, function) cut out by `ast`;
  comments stay, since they are part of the code as written. A body that held only a docstring
  gets `pass` in its place, so each document is still valid Python; a module that was only a
  docstring leaves nothing and gives no document.
- "stdlib-docstrings": the docstrings of those files alone, one document per module, class or
  function docstring, indented as `inspect.cleandoc` leaves it. English prose, for contrast with
  "stdlib-code".

Inputs that cannot become a document are skipped, never fatal, and counted by reason in a
`collections.Counter` the caller passes in (see `SKIP_REASONS`).
"""

from __future__ import annotations

import ast
import bz2
import gzip
import json
import lzma
import os
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from olmoe.errors import DataError

STDLIB_SOURCES = ("stdlib", "stdlib-code", "stdlib-docstrings")
SKIP_REASONS = {
    "empty": "no text, or only whitespace",
    "binary": "NUL bytes: not a text file",
    "not-utf8": "bytes that are not UTF-8 (or text with lone surrogates)",
    "unreadable": "could not be opened or read (permissions, broken link, corrupt archive)",
    "bad-json": "a JSONL line that is not a JSON object",
    "no-text": 'a JSONL object without a string "text" field',
    "syntax-error": "a standard-library file Python's parser rejects (stdlib-code, -docstrings)",
    "unsupported-compression": "zstd, lz4 or zip: decompress first (e.g. `zstd -d`), or re-pack "
    "as .gz",
}
_EXCLUDED_STDLIB_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                            "__pycache__"}  # fmt: skip
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_OPENERS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# Compressions the standard library cannot read; named in the skips rather than called binary.
_UNSUPPORTED_SUFFIXES = (".zst", ".zstd", ".lz4", ".zip", ".7z")


@dataclass(frozen=True)
class Document:
    text: str
    nbytes: int  # UTF-8 bytes of `text`, for bits-per-byte


def iter_documents(source: str, skipped: Counter | None = None) -> Iterator[str]:
    """The documents of `source` (a file, a folder or a built-in name, see the module
    docstring), in a deterministic order. Skipped inputs are counted by reason in `skipped`."""
    for document in read_documents(source, skipped):
        yield document.text


def check_source(source: str) -> None:
    """Raise DataError unless `source` names an existing file, folder or built-in source, so a
    typo fails before any work is done."""
    if source in STDLIB_SOURCES:
        stdlib_dir()
        return
    path = Path(source).expanduser()
    if not (path.is_file() or path.is_dir()):
        reason = "is not a file or folder" if path.exists() else "does not exist"
        raise DataError(
            f"source {source!r} {reason}; pass a text or .jsonl(.gz) file, a folder, or one of "
            f"the built-in sources {', '.join(STDLIB_SOURCES)}"
        )


def read_documents(source: str, skipped: Counter | None = None) -> Iterator[Document]:
    """`iter_documents` with each document's UTF-8 byte count."""
    check_source(source)
    skipped = Counter() if skipped is None else skipped
    if source == "stdlib":
        yield from _stdlib_documents(skipped, _whole_file)
    elif source == "stdlib-code":
        yield from _stdlib_documents(skipped, _code_without_docstrings)
    elif source == "stdlib-docstrings":
        yield from _stdlib_documents(skipped, _docstrings)
    else:
        path = Path(source).expanduser()
        for file in _walk(path) if path.is_dir() else [path]:
            yield from _file_documents(file, skipped)


def stdlib_dir() -> Path:
    path = Path(sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise DataError(
            f"this Python's standard library folder {path} is missing, so the built-in "
            "stdlib sources are unavailable; pass files or folders instead"
        )
    return path


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files that the stdlib sources read, in sorted order."""
    return [p for p in _walk(stdlib_dir(), _EXCLUDED_STDLIB_FOLDERS) if p.suffix == ".py"]


# ---------------------------------------------------------------------------- files
def _walk(folder: Path, excluded: set[str] = frozenset()) -> Iterator[Path]:
    """Files below `folder` in sorted order, without hidden names and `excluded` folders; the
    sort makes the document order (and so the validation split) the same on every machine."""
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not f.startswith(".") and f not in excluded)
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _split_suffixes(path: Path) -> tuple[Callable | None, str]:
    """The opener of the file's compression (None for plain files) and the suffix beneath it."""
    opener = _OPENERS.get(path.suffix.lower())
    inner = Path(path.stem).suffix.lower() if opener else path.suffix.lower()
    return opener, inner


def _file_documents(path: Path, skipped: Counter) -> Iterator[Document]:
    if path.suffix.lower() in _UNSUPPORTED_SUFFIXES:
        skipped["unsupported-compression"] += 1
        return
    opener, inner = _split_suffixes(path)
    if inner in _JSON_SUFFIXES:
        yield from _jsonl_documents(path, opener or open, skipped)
        return
    try:
        if opener is None:
            data = path.read_bytes()
        else:
            with opener(path, "rb") as handle:
                data = handle.read()
    except (OSError, EOFError):  # EOFError: a truncated compressed file
        skipped["unreadable"] += 1
        return
    document = _text_document(data, skipped)
    if document is not None:
        yield document


def _text_document(data: bytes, skipped: Counter) -> Document | None:
    if b"\x00" in data:
        skipped["binary"] += 1
        return None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["not-utf8"] += 1
        return None
    if not text.strip():
        skipped["empty"] += 1
        return None
    return Document(text, len(data))


def _jsonl_documents(path: Path, opener: Callable, skipped: Counter) -> Iterator[Document]:
    try:
        with opener(path, "rb") as handle:
            # Line by line, so a JSONL file larger than memory streams.
            for line in handle:
                if not line.strip():
                    continue
                document = _json_document(line, skipped)
                if document is not None:
                    yield document
    except (OSError, EOFError):
        # Documents before the damage were used; the rest of the file counts as one skip.
        skipped["unreadable"] += 1


def _json_document(line: bytes, skipped: Counter) -> Document | None:
    try:
        record = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        skipped["bad-json"] += 1
        return None
    if not isinstance(record, dict):
        skipped["bad-json"] += 1
        return None
    text = record.get("text")
    if not isinstance(text, str):
        skipped["no-text"] += 1
        return None
    if not text.strip():
        skipped["empty"] += 1
        return None
    try:
        nbytes = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # JSON can spell lone surrogates ("\ud800"), UTF-8 cannot
        skipped["not-utf8"] += 1
        return None
    if "\x00" in text:
        skipped["binary"] += 1
        return None
    return Document(text, nbytes)


# ---------------------------------------------------------------------------- stdlib
def _stdlib_documents(skipped: Counter, extract: Callable) -> Iterator[Document]:
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            skipped["unreadable"] += 1
            continue
        document = _text_document(data, skipped)
        if document is None:
            continue
        texts = extract(document.text, skipped)
        for text in texts:
            if text.strip():
                yield Document(text, len(text.encode("utf-8")))


def _whole_file(text: str, skipped: Counter) -> list[str]:
    return [text]


def _parse(text: str, skipped: Counter) -> ast.Module | None:
    try:
        return ast.parse(text)
    except (SyntaxError, ValueError):  # ValueError: source with NUL bytes (checked before)
        skipped["syntax-error"] += 1
        return None


def _docstring_nodes(tree: ast.Module) -> Iterator[tuple[ast.AST, ast.Expr]]:
    """(owner, docstring statement) for the module and every class and function."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, owners) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                yield node, first


def _docstrings(text: str, skipped: Counter) -> list[str]:
    tree = _parse(text, skipped)
    if tree is None:
        return []
    # ast.walk visits breadth-first; sorted by position the docstrings read in file order.
    nodes = sorted(_docstring_nodes(tree), key=lambda pair: (pair[1].lineno, pair[1].col_offset))
    return [ast.get_docstring(owner, clean=True) or "" for owner, _ in nodes]


def _code_without_docstrings(text: str, skipped: Counter) -> list[str]:
    tree = _parse(text, skipped)
    if tree is None:
        return []
    # ast positions are line numbers (1-based) and UTF-8 byte columns, so cut in bytes.
    # bytes.splitlines breaks only at \n, \r\n and \r, as the parser counts lines (str.splitlines
    # also breaks at form feeds and other separators).
    lines = text.encode("utf-8").splitlines(keepends=True)
    # From the last docstring to the first, so earlier positions stay valid.
    nodes = sorted(_docstring_nodes(tree), key=lambda pair: pair[1].lineno, reverse=True)
    for owner, doc in nodes:
        first, last = doc.lineno - 1, doc.end_lineno - 1
        before = lines[first][: doc.col_offset]
        after = lines[last][doc.end_col_offset :]
        alone = len(owner.body) == 1
        if before.strip() or after.strip() not in (b"", b";"):
            # Shares its line with other code (`def f(): "doc"; return 1`): `pass` in its place.
            lines[first : last + 1] = [before + b"pass" + after]
        elif alone and not isinstance(owner, ast.Module):
            lines[first : last + 1] = [before + b"pass" + _line_end(lines[last])]
        else:
            del lines[first : last + 1]
    return [b"".join(lines).decode("utf-8")]


def _line_end(line: bytes) -> bytes:
    return line[len(line.rstrip(b"\r\n")) :] or b"\n"
