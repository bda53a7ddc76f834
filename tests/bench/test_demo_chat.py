"""bench/demo_chat.py's data builder (`make demo-chat`) on small synthetic modules: the requests
and answers it writes, the broken answers it prefers against, and its held-out split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench_scripts import bench_script

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "demo_chat.py"


@pytest.fixture(scope="module")
def demo():
    with bench_script("demo_chat") as module:
        yield module


GEOMETRY = '''"""Shapes."""
import math


def area(radius: float, *, exact=False) -> float:
    """Return the area of a circle
    of this radius.

    More detail that the request leaves out.
    """
    if exact:
        return math.pi * radius ** 2
    return 3.14 * radius ** 2


@functools.cache
def perimeter(radius):
    """The perimeter of a circle."""

    # a comment stays with the code
    total = 2 * math.pi
    return total * radius


def _private(x):
    """Not public."""
    return x


def undocumented(x):
    return x


def only_docstring():
    """Nothing after it."""


def same_line(): "A docstring on the def line."; return 1


class Shape:
    def method(self):
        """Not top-level."""
        return 1
'''

TEXT = '''def shout(text, times=2):
    """Repeat text loudly."""
    loud = text.upper()
    parts = [loud] * times
    return " ".join(parts)


def whisper(text):
    """Say text quietly."""
    quiet = text.lower()
    return quiet + "..."
'''


def functions(demo):
    return demo.extract_functions(GEOMETRY, "geometry") + demo.extract_functions(TEXT, "text")


def chars(messages):
    """A stand-in for the tokenizer: one token per character of the contents."""
    return sum(len(m["content"]) for m in messages)


def test_extracts_public_documented_top_level_functions(demo):
    found = demo.extract_functions(GEOMETRY, "geometry")
    assert [f.qualname for f in found] == ["geometry.area", "geometry.perimeter"]
    area, perimeter = found
    assert area.signature == "area(radius: float, *, exact=False) -> float"
    assert area.summary == "Return the area of a circle of this radius."
    assert area.source == (
        "def area(radius: float, *, exact=False) -> float:\n"
        "    if exact:\n"
        "        return math.pi * radius ** 2\n"
        "    return 3.14 * radius ** 2\n"
    )
    assert perimeter.source.startswith("@functools.cache\ndef perimeter(radius):\n    # a comment")
    assert '"""' not in area.source + perimeter.source
    assert demo.extract_functions("def broken(:\n", "bad") == []


def test_records_are_conversations_of_request_and_source(demo):
    records = demo.build_records(functions(demo), chars, max_tokens=10_000)
    sft = records["sft-train"] + records["sft-valid"]
    assert len(sft) == 4
    by_name = {r["name"]: r for r in sft}
    user, assistant = by_name["geometry.area"]["messages"]
    assert user == {
        "role": "user",
        "content": "Write a Python function `area(radius: float, *, exact=False) -> float` that "
        "does this: Return the area of a circle of this radius.",
    }
    assert assistant["role"] == "assistant" and assistant["content"].startswith("def area(")
    assert "\n" not in user["content"]  # one line: `olmoe chat` reads one turn per line


def test_rejected_answers_are_broken_variants(demo):
    found = functions(demo)
    records = demo.build_records(found, chars, max_tokens=10_000)
    pairs = records["dpo-train"] + records["dpo-valid"]
    assert len(pairs) == len(found)
    sources = {f.qualname: f for f in found}
    for pair in pairs:
        function = sources[pair["name"]]
        assert pair["prompt"] == function.request and pair["chosen"] == function.source
        assert pair["rejected"] != pair["chosen"]
        assert pair["rejected"].startswith("".join(function.header))  # the same signature
        assert pair["variant"] in demo.VARIANTS
    shout, whisper = demo.extract_functions(TEXT, "text")
    assert demo.truncated(shout) == "def shout(text, times=2):\n    loud = text.upper()\n"
    assert sorted(demo.shuffled(shout).splitlines()) == sorted(shout.source.splitlines())
    assert demo.shuffled(shout) != shout.source
    assert demo.swapped(shout, whisper) == "def shout(text, times=2):\n" + "".join(whisper.body)
    assert demo.swapped(shout, shout) is None


def test_every_variant_is_used_when_possible(demo):
    """Many functions, each picking its variant by a hash of its name: all three turn up."""
    source = "".join(
        f'def f{i}(x):\n    """Doc {i}."""\n    y = x + {i}\n    z = y * 2\n    return z - {i}\n\n'
        for i in range(30)
    )
    records = demo.build_records(demo.extract_functions(source, "many"), chars, 10_000)
    variants = {r["variant"] for r in records["dpo-train"] + records["dpo-valid"]}
    assert variants == set(demo.VARIANTS)


def test_conversations_that_do_not_fit_are_skipped(demo):
    found = functions(demo)
    limit = min(chars(demo.conversation(f.request, f.source)) for f in found)
    records = demo.build_records(found, chars, max_tokens=limit)
    kept = [r["name"] for r in records["sft-train"] + records["sft-valid"]]
    assert len(kept) == 1
    for pair in records["dpo-train"] + records["dpo-valid"]:
        assert chars(demo.conversation(pair["prompt"], pair["rejected"])) <= limit


def held_out_in_a_fresh_process(hash_seed: str) -> str:
    """The held-out indices of test_the_split's names, printed by another Python process."""
    code = (
        "import importlib.util as u, sys\n"
        f"s = u.spec_from_file_location('d', {str(SCRIPT)!r})\n"
        "m = sys.modules['d'] = u.module_from_spec(s)\n"
        "s.loader.exec_module(m)\n"
        "print([i for i in range(2000) if m.is_held_out(f'module.f{i}')])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_split_is_deterministic_and_about_five_percent(demo):
    names = [f"module.f{i}" for i in range(2000)]
    held_out = [i for i, name in enumerate(names) if demo.is_held_out(name)]
    assert 0.03 < len(held_out) / len(names) < 0.07
    # The same functions in every process, whatever Python's str hash seed.
    assert held_out_in_a_fresh_process("1") == held_out_in_a_fresh_process("2")
    assert held_out_in_a_fresh_process("1") == f"{held_out}\n"
    first = demo.build_records(functions(demo), chars, 10_000)
    assert first == demo.build_records(functions(demo), chars, 10_000)
    train = {r["name"] for r in first["sft-train"]}
    valid = {r["name"] for r in first["sft-valid"]}
    assert not train & valid
    assert valid == {n for n in train | valid if demo.is_held_out(n)}
    assert {r["name"] for r in first["dpo-valid"]} <= valid


def test_subsample_keeps_order_and_is_deterministic(demo):
    records = [{"name": f"m.f{i}"} for i in range(50)]
    picked = demo.subsample(records, 10)
    assert len(picked) == 10 and picked == demo.subsample(records, 10)
    assert [records.index(r) for r in picked] == sorted(records.index(r) for r in picked)
    assert demo.subsample(records, 100) == records
