"""`olmoe.data.prepare` and the sources behind it, on small hand-made corpora."""

from __future__ import annotations

import ast
import bz2
import gzip
import importlib
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from olmoe import cli
from olmoe.data import (
    SKIP_REASONS,
    encode_documents,
    iter_documents,
    load_tokens,
    prepare,
    read_metadata,
    stdlib_files,
)
from olmoe.data import encode as encode_module
from olmoe.data import sources as sources_module
from olmoe.errors import ConfigError, DataError, InputError
from olmoe.tokenizer import Tokenizer

# The package exports the function `prepare`, which hides the module of the same name.
prepare_module = importlib.import_module("olmoe.data.prepare")

# Plain-text documents, in the order the folder walk reads them (sorted paths).
TEXTS = {
    "a.txt": "The quick brown fox jumps over the lazy dog.\n",
    "b.md": "# Title\n\n*Markdown*, ünïcödé, emoji 🦊 and a literal <|endoftext|>.\n",
    "nested/deeper/c.py": 'def add(a, b):\n    """Add."""\n    return a + b\n',
}
JSONL_TEXTS = ["first Dolma document", "second one\nwith two lines", "third: \u00e9t\u00e9"]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(None)


@pytest.fixture(scope="module")
def encode(tokenizer):
    # Special-token text inside a document is ordinary text, as prepare encodes it.
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return lambda text: backend.encode(text, add_special_tokens=False).ids


def make_corpus(root: Path) -> tuple[list[str], Counter]:
    """A folder with every kind of input; returns the documents it holds (in reading order)
    and the skips it must produce."""
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(JSONL_TEXTS)]
    lines[1:1] = ["{not json", json.dumps({"id": 9}), json.dumps({"text": "  "}), ""]
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    (root / "e_empty.txt").write_bytes(b"")
    (root / "f_binary.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (root / "g_latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (root / "g_shard.json.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    (root / "g_text.txt.bz2").write_bytes(bz2.compress(b"bzip2 text\n"))
    (root / "h_broken_link.txt").symlink_to(root / "missing")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("never read")
    expected_skips = Counter(
        {
            "bad-json": 1,
            "no-text": 1,
            "empty": 2,
            "binary": 1,
            "not-utf8": 1,
            "unreadable": 1,
            "unsupported-compression": 1,
        }
    )
    if not ROOT:  # root reads files whatever their permissions
        locked = root / "i_locked.txt"
        locked.write_text("secret")
        locked.chmod(0)
        expected_skips["unreadable"] += 1
    # sorted walk: a.txt, b.md, d.jsonl.gz, ..., then the nested folder
    documents = [
        TEXTS["a.txt"],
        TEXTS["b.md"],
        *JSONL_TEXTS,
        "bzip2 text\n",
        TEXTS["nested/deeper/c.py"],
    ]
    return documents, expected_skips


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    documents, skips = make_corpus(root)
    yield root, documents, skips
    for path in root.rglob("*"):  # let pytest clean up the locked file
        if not path.is_symlink():
            path.chmod(0o755)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    assert len(tokens) == 0 or tokens[-1] == eos, "every document ends with eos"
    ends = np.flatnonzero(tokens == eos)
    return np.split(np.asarray(tokens), ends + 1)[:-1]


def test_documents_in_order_and_skips_counted(corpus):
    root, documents, skips = corpus
    skipped = Counter()
    assert list(iter_documents(str(root), skipped)) == documents
    assert skipped == skips
    assert set(skipped) <= set(SKIP_REASONS)  # every reason is documented


def test_prepare_counts_eos_round_trip(corpus, tokenizer, encode, tmp_path):
    root, documents, skips = corpus
    summary = prepare([str(root)], tmp_path / "out", valid_fraction=0.3, valid_min_tokens=0)
    eos = tokenizer.eos_token_id
    metadata = read_metadata(tmp_path / "out")
    assert metadata == summary.metadata
    assert metadata["dtype"] == "uint16" and metadata["eos_token_id"] == eos == 50279
    train, valid = load_tokens(tmp_path / "out"), load_tokens(tmp_path / "out", "valid")
    assert train.dtype == valid.dtype == np.uint16
    assert (tmp_path / "out").stat().st_mode & 0o055 == 0o055 & ~current_umask()  # not private

    decoded = {}
    for name, tokens in (("train", train), ("valid", valid)):
        pieces = split_documents(tokens, eos)
        assert all(eos not in piece[:-1] for piece in pieces)
        texts = [tokenizer.decode(piece[:-1].tolist()) for piece in pieces]
        decoded[name] = texts
        assert metadata["splits"][name] == {"tokens": len(tokens), "documents": len(texts)}
        assert metadata["bytes"][name] == sum(len(t.encode()) for t in texts)
        for text, piece in zip(texts, pieces):
            assert piece[:-1].tolist() == encode(text)
    # Every document is in exactly one split; each split keeps the reading order.
    assert sorted(decoded["train"] + decoded["valid"]) == sorted(documents)
    for texts in decoded.values():
        assert texts == [d for d in documents if d in texts]
    assert decoded["train"] and decoded["valid"]

    (source,) = metadata["sources"]
    assert source["documents"] == len(documents)
    assert source["tokens"] == sum(len(encode(d)) + 1 for d in documents)
    assert source["bytes"] == sum(len(d.encode()) for d in documents)
    assert source["skipped"] == dict(skips) == metadata["skipped"]
    assert summary.tokens == source["tokens"]
    # A literal "<|endoftext|>" in a document is text, not a document boundary.
    assert "literal <|endoftext|>." in "".join(decoded["train"] + decoded["valid"])


def test_encode_documents_is_what_prepare_writes(corpus, tmp_path, monkeypatch):
    root, documents, skips = corpus
    skipped = Counter()
    arrays = list(encode_documents(str(root), skipped=skipped))
    assert skipped == skips and len(arrays) == len(documents)
    assert all(a.dtype == np.uint16 and a[-1] == 50279 for a in arrays)
    prepare([str(root)], tmp_path / "out", valid_fraction=0.0)
    assert np.concatenate(arrays).tolist() == load_tokens(tmp_path / "out").tolist()

    # Stopping early ends the reading thread.
    monkeypatch.setattr(encode_module, "CHUNK_DOCUMENTS", 1)
    threads = threading.active_count()
    iterator = encode_documents(str(root))
    assert next(iterator).tolist() == arrays[0].tolist()
    assert threading.active_count() == threads + 1
    iterator.close()
    assert threading.active_count() == threads


def test_validation_split_deterministic_and_seeded(tmp_path):
    # Many documents so that different seeds surely draw different splits.
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):
        (many / f"{i:02d}.txt").write_text(f"document number {i}\n")

    def split(seed, out, **kwargs):
        prepare([str(many)], tmp_path / out, valid_fraction=0.25, seed=seed, **kwargs)
        return tuple(
            [tuple(doc) for doc in split_documents(load_tokens(tmp_path / out, name), 50279)]
            for name in ("train", "valid")
        )

    first = split(1, "a", valid_min_tokens=0)
    assert first == split(1, "b", valid_min_tokens=0)
    assert first != split(2, "c", valid_min_tokens=0)
    assert 0 < len(first[1]) < 20
    # A small minimum that the fraction already meets leaves the split unchanged.
    assert first == split(1, "d", valid_min_tokens=5)
    # A larger one tops the split up with more documents, until it has that many tokens ...
    train, valid = split(1, "e", valid_min_tokens=60)
    assert set(first[1]) < set(valid) and sum(map(len, valid)) >= 60
    assert len(valid) < 20
    assert sorted(train + valid) == sorted(first[0] + first[1])
    # ... and never beyond half the documents.
    train, valid = split(1, "f", valid_min_tokens=10**6)
    assert len(valid) == 20 and set(first[1]) < set(valid)
    prepare([str(many)], tmp_path / "g", valid_fraction=0.0)
    assert len(load_tokens(tmp_path / "g", "valid")) == 0


def test_output_is_atomic_and_not_overwritten(corpus, tmp_path, monkeypatch):
    root, _, _ = corpus
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as patch:
        patch.setattr(prepare_module._Splitter, "add", fail)
        with pytest.raises(RuntimeError):
            prepare([str(root)], out)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a staging folder

    def fail_reading(source, skipped):  # runs in the reader thread
        yield from list(sources_module.read_documents(source))[:2]
        raise OSError("disk gone")

    threads = threading.active_count()
    with monkeypatch.context() as patch:
        patch.setattr(encode_module, "read_documents", fail_reading)
        patch.setattr(encode_module, "CHUNK_DOCUMENTS", 1)
        with pytest.raises(OSError, match="disk gone"):
            prepare([str(root)], out)
    assert list(tmp_path.iterdir()) == [] and threading.active_count() == threads

    prepare([str(root)], out)
    with pytest.raises(InputError, match="exists; pass --force"):
        prepare([str(root)], out)
    before = load_tokens(out).tolist()
    prepare([str(root / "a.txt")], out, force=True)
    assert load_tokens(out).tolist() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not a prepared token directory"):
        prepare([str(root)], other, force=True)
    assert (other / "notes.txt").read_text() == "keep me"


def test_bad_arguments(corpus, tmp_path):
    root, _, _ = corpus
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(root), str(root / "nope.txt")], tmp_path / "x")
    with pytest.raises(ConfigError, match="valid_fraction"):
        prepare([str(root)], tmp_path / "x", valid_fraction=1.0)
    with pytest.raises(InputError, match="no sources"):
        prepare([], tmp_path / "x")
    with pytest.raises(DataError, match="hold no documents .skipped: 1 binary, 1 empty"):
        prepare([str(root / "e_empty.txt"), str(root / "f_binary.bin")], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_uint32_for_large_vocabulary(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = len(vocab)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    Tokenizer(backend, eos_token="</s>").save_pretrained(tmp_path / "tok")
    tokenizer = Tokenizer.from_pretrained(tmp_path / "tok")
    (tmp_path / "doc.txt").write_text("w1 w69999 w65536 w7")
    summary = prepare(
        [str(tmp_path / "doc.txt")], tmp_path / "out", tokenizer=str(tmp_path / "tok")
    )
    eos = tokenizer.eos_token_id
    assert eos == 70_001 and summary.metadata["dtype"] == "uint32"
    assert summary.metadata["tokenizer"] == str(tmp_path / "tok")
    assert summary.metadata["vocab_size"] == 70_002
    tokens = load_tokens(tmp_path / "out")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == [1, 69_999, 65_536, 7, eos]


# ---------------------------------------------------------------------------- stdlib sources
STDLIB_SAMPLE = '''"""Module docstring.

Second paragraph."""
import os  # a comment that stays


class Thing:
    """A thing."""

    def method(self):
        """Only a docstring."""

    async def run(self):  # comment
        """Run it.

        Indented detail.
        """
        return 1


def inline(): "inline doc"; return 2
\x0c

def ñame(x):
    \'\'\'Non-ASCII before the docstring.\'\'\'
    return x
'''


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    root = tmp_path / "python3.x"
    files = {
        "sample.py": STDLIB_SAMPLE,
        "pkg/__init__.py": '"""Only a module docstring."""\n',
        "pkg/broken.py": "def broken(:\n    pass\n",
        "test/test_x.py": '"""excluded test suite"""\n',
        "pkg/tests/t.py": '"""excluded"""\n',
        "site-packages/numpy/x.py": '"""excluded"""\n',
        "README.txt": "not python",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(sources_module, "stdlib_dir", lambda: root)
    return root


def test_stdlib_files_exclude_tests_and_packages(fake_stdlib):
    assert [p.relative_to(fake_stdlib).as_posix() for p in stdlib_files()] == [
        "sample.py", "pkg/__init__.py", "pkg/broken.py",
    ]  # fmt: skip


def test_stdlib_sources(fake_stdlib):
    skipped = Counter()
    whole = list(iter_documents("stdlib", skipped))
    assert whole == [STDLIB_SAMPLE, '"""Only a module docstring."""\n', "def broken(:\n    pass\n"]
    assert not skipped  # the whole-file source does not parse

    skipped = Counter()
    docstrings = list(iter_documents("stdlib-docstrings", skipped))
    assert docstrings == [
        "Module docstring.\n\nSecond paragraph.",
        "A thing.",
        "Only a docstring.",
        "Run it.\n\nIndented detail.",
        "inline doc",
        "Non-ASCII before the docstring.",
        "Only a module docstring.",
    ]
    assert skipped == Counter({"syntax-error": 1})

    skipped = Counter()
    (code,) = iter_documents("stdlib-code", skipped)  # pkg/__init__.py leaves no code
    assert skipped == Counter({"syntax-error": 1})
    assert code == (
        "import os  # a comment that stays\n\n\nclass Thing:\n\n"
        "    def method(self):\n        pass\n\n"
        "    async def run(self):  # comment\n        return 1\n\n\n"
        "def inline(): pass; return 2\n\x0c\n\n"
        "def ñame(x):\n    return x\n"
    )


def test_real_stdlib_listing():
    files = stdlib_files()
    names = {p.name for p in files}
    assert {"os.py", "ast.py", "__init__.py"} <= names
    for path in files:
        assert not {"test", "tests", "site-packages", "__pycache__"} & set(path.parts)
    # A sample of real files: stripped code parses and has no docstrings left.
    sample = "\n".join(p.read_text(encoding="utf-8") for p in files if p.name in ("ast.py",))
    code = sources_module._code_without_docstrings(sample, Counter())[0]

    assert not list(sources_module._docstring_nodes(ast.parse(code)))
    assert "def parse(" in code and "Parse the source into an AST node." not in code


# ---------------------------------------------------------------------------- command line
def test_cli_prepare_and_info(corpus, tmp_path, capsys):
    root, documents, skips = corpus
    out = tmp_path / "out"
    assert cli.main(["data", "prepare", str(root), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(documents)} documents" in printed
    assert "skipped: " + ", ".join(f"{n} {r}" for r, n in sorted(skips.items())) in printed
    assert "tokens/s" in printed and "train:" in printed and "valid:" in printed

    assert cli.main(["data", "prepare", str(root), "--out", str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            ["data", "prepare", str(root), "--out", str(tmp_path / "o"), "--valid-fraction", "1"]
        )
    assert exit_info.value.code == 2
    assert "--valid-fraction: expected a number in [0, 1), got 1" in capsys.readouterr().err

    assert cli.main(["data", "info", str(out)]) == 0
    assert "tokenizer    allenai/gpt-neox-olmo-dolma-v1_5" in capsys.readouterr().out
    assert cli.main(["data", "info", str(out / "train.npy"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == len(load_tokens(out)) and info["dtype"] == "uint16"


def test_cli_bad_source_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OLMOE_DEBUG"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "olmoe",
            "data",
            "prepare",
            "no/such/dir",
            "--out",
            str(tmp_path / "o"),
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "source 'no/such/dir' does not exist" in lines[0]
    assert not (tmp_path / "o").exists()
