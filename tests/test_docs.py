"""The documentation runs and stays true: README.md and docs/*.md execute their Python examples,
bench/README.md's tables equal what bench/tables.py renders from the results JSON, and links
point at files and headings that exist.

Every ```python block of a page runs, in page order, in one namespace, in a temporary working
directory: a block may use what an earlier block on the same page defined. Examples that need
a trained model, the network or a running server are written as ```text (or ```bash) blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.bench_scripts import bench_script

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BENCH_README = ROOT / "bench" / "README.md"

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)
PYTHON_TAGS = {"python", "py", "python3"}


def python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for each Python block of `page`."""
    text = page.read_text()
    return [
        (text.count("\n", 0, match.start(2)) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1).lower() in PYTHON_TAGS
    ]


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_and_docs_show_python():
    assert python_blocks(README), "the README should show the Python API"
    pages_with_code = {_name(page) for page in PAGES if python_blocks(page)}
    for page in ("docs/inference.md", "docs/python-api.md", "docs/data.md", "docs/training.md",
                 "docs/evaluation.md", "docs/routing-analysis.md"):  # fmt: skip
        assert page in pages_with_code


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: _name(p))
def test_python_blocks_run(page, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)  # examples write their checkpoints into the working directory
    namespace: dict = {"__name__": "__docs__"}
    for line, block in python_blocks(page):
        # Pad with blank lines so that a traceback names the line of the Markdown file.
        code = compile("\n" * (line - 1) + block, str(page), "exec")
        exec(code, namespace)


def test_readme_test_command_is_make_test():
    text = README.read_text()
    assert "make test" in text and "make install" in text
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:", makefile, flags=re.MULTILINE)
    assert re.search(r"^install:", makefile, flags=re.MULTILINE)


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 200


DATED = re.compile(r"\b(today|yesterday|this session|last session|this run|the run before)\b",
                   flags=re.IGNORECASE)  # fmt: skip


@pytest.mark.parametrize("page", [*PAGES, BENCH_README], ids=lambda p: _name(p))
def test_no_dated_prose(page):
    found = [m.group(0) for m in DATED.finditer(page.read_text())]
    assert not found, f"{_name(page)}: {found}: state the fact, its command and machine instead"


# ------------------------------------------------------------------------------ links
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _headings(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown text (outside code blocks)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


@pytest.mark.parametrize("page", [*PAGES, BENCH_README], ids=lambda p: _name(p))
def test_links_resolve(page):
    text = page.read_text()
    text_outside_code = FENCE.sub("", text)
    for target in LINK.findall(text_outside_code):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{_name(page)} links to {target}, which does not exist"
        if anchor:
            assert file.suffix == ".md", f"{_name(page)}: anchor on a non-Markdown file {target}"
            assert anchor in _headings(file.read_text()), (
                f"{_name(page)} links to {target}, but {file.name} has no such heading"
            )


# ------------------------------------------------------------------------------ benchmarks
@pytest.fixture(scope="module")
def tables():
    with bench_script("tables") as module:
        yield module


def test_bench_readme_tables_are_rendered_from_the_results_json(tables):
    assert list((ROOT / "bench").glob("results-*.json")), "no benchmark results to render"
    section = tables.generated_section(BENCH_README.read_text())
    assert section == tables.render(), (
        "bench/README.md's tables differ from bench/results-*.json: "
        "run .venv/bin/python bench/tables.py --write"
    )


def test_bench_tables_write_is_idempotent(tables, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{tables.BEGIN}\nstale\n{tables.END}\n\nnotes\n")
    assert tables.write(readme, ROOT / "bench")
    assert not tables.write(readme, ROOT / "bench")
    text = readme.read_text()
    assert tables.generated_section(text) == tables.render()
    assert text.startswith("# Benchmarks\n\n") and text.endswith(f"{tables.END}\n\nnotes\n")


def test_bench_tables_name_the_gemm_rates_behind_the_prefill_limit(tables, tmp_path):
    data = json.loads((ROOT / "bench" / "results-released-avx2-cpu.json").read_text())
    data["matmul"].pop("beside_prefill_gflop_s", None)
    data["matmul"].pop("at_start_gflop_s", None)
    data["matmul"]["gflop_s"] = 38.4
    (tmp_path / "results-old-cpu.json").write_text(json.dumps(data))
    data["matmul"].update(gflop_s=64.6, at_start_gflop_s=38.4, beside_prefill_gflop_s=[61.2, 64.6])
    (tmp_path / "results-new-cpu.json").write_text(json.dumps(data))
    text = tables.render(tmp_path)
    sections = {part.split("\n")[0]: part for part in text.split("### ")[1:]}
    old, new = (sections[f"CPU inference, released shape: results-{n}"] for n in ("old", "new"))
    assert "float32 GEMM 38 GFLOP/s" in new and "the fastest GEMM rate of the run, 65" in new
    assert "(beside the engines' prefills: 61-65)" in new
    assert "float32 GEMM 38 GFLOP/s" in old and "fastest GEMM rate" not in old
    assert f"--engines {','.join(data['engines'])} --json" in text


def test_bench_tables_say_whether_peak_rss_counts_the_probe_buffers(tables, tmp_path):
    data = json.loads((ROOT / "bench" / "results-released-avx2-cpu.json").read_text())
    for run in data["runs"]:
        run.pop("probe_rss_gb", None)
    (tmp_path / "results-old-cpu.json").write_text(json.dumps(data))
    for run in data["runs"]:
        run["probe_rss_gb"] = 0.562
    (tmp_path / "results-new-cpu.json").write_text(json.dumps(data))
    text = tables.render(tmp_path)
    sections = {part.split("\n")[0]: part for part in text.split("### ")[1:]}
    old, new = (sections[f"CPU inference, released shape: results-{n}"] for n in ("old", "new"))
    assert "Peak RSS includes the 0.5 GB buffer" in old and "less the" not in old
    assert "high-water mark less the 0.56 GB" in new and "includes" not in new


def test_bench_tables_note_unknown_layouts(tables, tmp_path):
    (tmp_path / "results-other.json").write_text(json.dumps({"something": 1}))
    assert "results-other.json" in tables.render(tmp_path)


def test_readme_headline_numbers_are_the_released_results():
    medians = json.loads((ROOT / "bench" / "results-released-cpu.json").read_text())["median"]
    text = README.read_text()
    for engine, keys in {
        "olmoe": ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"),
        "olmoe-int8": ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"),
        "transformers": ("prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"),
        "llamacpp": ("prefill_tok_s", "decode_b1_tok_s"),
        "llamacpp-q8": ("prefill_tok_s", "decode_b1_tok_s"),
    }.items():
        for key in keys:
            value = f"{medians[engine][key]:.1f}"
            assert value in text, f"README lacks {engine} {key} = {value} from the results JSON"


# ------------------------------------------------------------------------------ model card
# OLMoE's model card, as published (transformers imports, the hub repo id).
MODEL_CARD = """
from transformers import OlmoeForCausalLM, AutoTokenizer
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Load different ckpts via passing e.g. `revision=step10000-tokens41B`
model = OlmoeForCausalLM.from_pretrained("allenai/OLMoE-1B-7B-0924").to(DEVICE)
tokenizer = AutoTokenizer.from_pretrained("allenai/OLMoE-1B-7B-0924")
inputs = tokenizer("Bitcoin is", return_tensors="pt")
inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
out = model.generate(**inputs, max_length=64)
print(tokenizer.decode(out[0]))
"""


def test_model_card_snippet_runs_with_olmoe_imports(tmp_path, capsys):
    from olmoe import OlmoeConfig, OlmoeForCausalLM, Tokenizer

    # A random model with OLMoE's vocabulary and context; its tokenizer is the OLMo default.
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=4096)
    OlmoeForCausalLM(config).save_pretrained(tmp_path / "olmoe-tiny")
    snippet = MODEL_CARD.replace("from transformers import", "from olmoe import").replace(
        '"allenai/OLMoE-1B-7B-0924"', repr(str(tmp_path / "olmoe-tiny"))
    )
    assert snippet.count("olmoe-tiny") == 2 and "transformers" not in snippet
    namespace: dict = {}
    exec(compile(snippet, "model card", "exec"), namespace)
    out, tokenizer = namespace["out"], namespace["tokenizer"]
    assert isinstance(tokenizer, Tokenizer)
    assert out.shape[1] == 64 or out[0, -1] == 50279  # unless it ended with end-of-text
    assert out[0, :3].tolist() == tokenizer.encode("Bitcoin is")
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(out[0]) + "\n"
    assert printed.startswith("Bitcoin is")
