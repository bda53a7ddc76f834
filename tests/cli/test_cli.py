"""The `olmoe` command, run as a user runs it: a subprocess against a tiny local checkpoint."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM, TextStream
from olmoe.checkpoint import summarize_checkpoint
from olmoe.cli import main
from olmoe.errors import CheckpointError, ConfigError, DataError, InputError, UsageError
from olmoe.tokenizer import Tokenizer
from tests.conftest import modules_imported_by, randomize

CONSOLE_SCRIPT = Path(sys.executable).parent / "olmoe"


def olmoe(*args: str, stdin: str | None = None, timeout: float = 120):
    """Run the CLI as `python -m olmoe` (the console script is checked once separately)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    env.pop("OLMOE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "olmoe", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with OLMo's vocabulary, saved without a tokenizer (so the CLI uses
    the default OLMo tokenizer), and the same model in memory for expected outputs."""
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=256)
    model = randomize(OlmoeForCausalLM(config), seed=5).eval()
    directory = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(directory)
    return directory, model, Tokenizer.from_pretrained(directory)


def expected_text(model, tokenizer, ids, max_new_tokens) -> str:
    return "".join(TextStream(model, tokenizer, ids, max_new_tokens))


def assert_one_line_error(result, *fragments: str, status: int = 1):
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------- generate
def test_generate_streams_the_greedy_continuation(checkpoint):
    directory, model, tokenizer = checkpoint
    result = olmoe(
        "generate", str(directory), "Bitcoin is", "--max-new-tokens", "12", "--dtype", "fp32"
    )
    assert result.returncode == 0, result.stderr
    expected = expected_text(model, tokenizer, tokenizer.encode("Bitcoin is"), 12)
    assert expected  # a random model still produces some text
    assert result.stdout == expected + "\n"


def test_generate_no_stream_and_stdin_prompt_print_the_same(checkpoint):
    directory, model, tokenizer = checkpoint
    result = olmoe(
        "generate",
        str(directory),
        "-",
        "--max-new-tokens",
        "8",
        "--dtype",
        "fp32",
        "--no-stream",
        "--stats",
        stdin="Language modeling is",
    )
    assert result.returncode == 0, result.stderr
    expected = expected_text(model, tokenizer, tokenizer.encode("Language modeling is"), 8)
    assert result.stdout == expected + "\n"
    assert "tok/s" in result.stderr


def test_generate_sampling_is_reproducible_with_a_seed(checkpoint):
    directory, _, _ = checkpoint
    args = (
        "generate",
        str(directory),
        "Once upon a time",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--top-k",
        "50",
    )
    first = olmoe(*args, "--seed", "3")
    again = olmoe(*args, "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout


def test_console_script_is_installed(checkpoint):
    directory, model, _ = checkpoint
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "info", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"{model.config.num_parameters():,} total" in result.stdout


# ---------------------------------------------------------------------------- chat
def test_chat_answers_turns_fed_on_stdin_with_history_and_reset(checkpoint):
    directory, model, tokenizer = checkpoint
    turns = ["Hi there", "What is an expert?", "/reset", "Hi there"]
    result = olmoe(
        "chat",
        str(directory),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--dtype",
        "fp32",
        "--system",
        "Be brief.",
        stdin="\n".join(turns) + "\n",
    )
    assert result.returncode == 0, result.stderr

    history = [{"role": "system", "content": "Be brief."}]
    replies = []
    for user in ("Hi there", "What is an expert?"):
        history.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = expected_text(model, tokenizer, ids, 6)
        history.append({"role": "assistant", "content": reply})
        replies.append(reply)
    assert replies[0] != replies[1]  # the second turn saw the first
    # after /reset the same first message gets the same first reply
    assert result.stdout == f"{replies[0]}\n{replies[1]}\n{replies[0]}\n"
    assert "history cleared" in result.stderr


def test_chat_ends_at_exit_command(checkpoint):
    directory, _, _ = checkpoint
    result = olmoe(
        "chat",
        str(directory),
        "--max-new-tokens",
        "3",
        "--seed",
        "1",
        stdin="/exit\nnever answered\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------------------- quantize
def test_quantize_writes_an_int8_checkpoint_that_generates(checkpoint, tmp_path):
    directory, model, _ = checkpoint
    output = tmp_path / "int8"
    result = olmoe("quantize", str(directory), str(output))
    assert result.returncode == 0, result.stderr
    stored = summarize_checkpoint(output)  # what `olmoe info` shows (tested on its own below)
    assert stored.dtypes == ("float32", "int8")
    # the fp32 embedding stays; experts, projections and the LM head shrink 4x
    assert stored.total_bytes < 0.7 * 4 * model.num_parameters()
    assert (output / "tokenizer.json").is_file()
    result = olmoe("generate", str(output), "Bitcoin is", "--max-new-tokens", "5")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert_one_line_error(olmoe("quantize", str(directory), str(directory)), "OUTPUT")


def test_quantize_bits_4_writes_an_int4_checkpoint_that_generates(checkpoint, tmp_path):
    directory, _, _ = checkpoint
    output = tmp_path / "int4"
    result = olmoe("quantize", str(directory), str(output), "--bits", "4")
    assert result.returncode == 0, result.stderr
    assert set(summarize_checkpoint(output).dtypes) == {"float32", "float16", "uint8", "int8"}
    config = json.loads((output / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "olmoe-int4"
    result = olmoe("generate", str(output), "Bitcoin is", "--max-new-tokens", "5")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    both = olmoe("quantize", str(directory), str(tmp_path / "x"), "--bits", "4", "--method", "int8")
    assert both.returncode == 2 and "not allowed with" in both.stderr


# ---------------------------------------------------------------------------- info
def test_info_reports_counts_dtype_and_size(checkpoint):
    directory, model, _ = checkpoint
    config = model.config
    result = olmoe("info", str(directory), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == config.num_parameters() == model.num_parameters()
    assert info["active_parameters"] == config.num_parameters(active_only=True)
    assert info["dtypes"] == ["float32"]
    assert info["bytes"] == 4 * model.num_parameters()
    assert info["config"]["vocab_size"] == 50304


# ---------------------------------------------------------------------------- data chat
CHAT_RECORDS = {
    "sft": [
        {"messages": [{"role": "user", "content": "Name a colour."},
                      {"role": "assistant", "content": "Blue."}]},
        {"prompt": "Say hi.", "completion": "Hi!"},
        {"messages": [{"role": "user", "content": "A question with no answer?"}]},  # dropped
    ],
    "dpo": [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Soup."},
        {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hi!"}],
         "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "No."}]},
    ],
    "kto": [
        {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
        {"prompt": "Name a colour.", "completion": "Soup.", "label": False},
        {"prompt": "Name a fruit.", "completion": "Pear.", "label": True},
    ],
}  # fmt: skip


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_data_chat_prepares_sft_data_and_reports_it_in_one_line(tmp_path):
    from olmoe.data.chat import ChatExamples

    source = write_records(tmp_path / "sft.jsonl", CHAT_RECORDS["sft"])
    result = olmoe("data", "chat", str(source), "--out", str(tmp_path / "sft"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    for fragment in ("sft: 2 examples", "0 of 2 sequences cut to 4,096", "1 dropped", "trained"):
        assert fragment in lines[0], lines[0]
    examples, tokenizer = ChatExamples(tmp_path / "sft"), Tokenizer.olmo()
    assert len(examples) == 2 and examples.metadata["records"] == 3
    ((ids, labels),) = examples[0]
    assert tokenizer.decode(ids.tolist()) == (
        "<|endoftext|><|user|>\nName a colour.\n<|assistant|>\nBlue.<|endoftext|>"
    )  # the Tulu template by default; the assistant's content and eos are all it learns
    assert tokenizer.decode(labels[labels != -100].tolist()) == "Blue.<|endoftext|>"
    info = olmoe("data", "info", str(tmp_path / "sft"))
    assert info.returncode == 0, info.stderr
    assert lines[0].split(";")[0] in info.stdout and "3 records" in info.stdout
    as_json = json.loads(olmoe("data", "info", str(tmp_path / "sft"), "--json").stdout)
    assert as_json["kind"] == "sft" and as_json["dropped_no_assistant_tokens"] == 1


def test_data_chat_takes_preferences_a_tokenizer_and_a_length(tmp_path):
    """dpo pairs with the OLMo tokenizer; kto with a checkpoint's own chat template, cut short."""
    from olmoe.data.chat import ChatExamples

    dpo = olmoe("data", "chat", str(write_records(tmp_path / "dpo.jsonl", CHAT_RECORDS["dpo"])),
                "--out", str(tmp_path / "dpo"), "--quiet")  # fmt: skip
    assert dpo.returncode == 0, dpo.stderr
    assert dpo.stdout.startswith("dpo: 2 examples,") and "of 4 sequences" in dpo.stdout
    assert len(ChatExamples(tmp_path / "dpo")[1]) == 2  # chosen, rejected

    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'A:\\n' + m['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'A:\\n' }}{% endif %}"
    )
    model_dir = tmp_path / "model"
    tokenizer = Tokenizer.olmo()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model_dir)
    source = write_records(tmp_path / "kto.jsonl", CHAT_RECORDS["kto"])
    kto = olmoe("data", "chat", str(source), "--out", str(tmp_path / "kto"),
                "--tokenizer", str(model_dir), "--max-length", "11")  # fmt: skip
    assert kto.returncode == 0, kto.stderr
    assert kto.stdout.startswith("kto: 3 examples (2 desirable),")
    assert "3 of 3 sequences cut to 11" in kto.stdout
    examples = ChatExamples(tmp_path / "kto")
    ((ids, labels),) = examples[0]
    assert tokenizer.decode(ids.tolist()) == "Q: Name a colour.\nA:\nBlue"
    assert tokenizer.decode(labels[labels != -100].tolist()) == "Blue"
    assert examples.desirable.tolist() == [True, False, True]


def test_data_chat_mistakes_are_one_line(tmp_path):
    good = write_records(tmp_path / "sft.jsonl", CHAT_RECORDS["sft"])
    mixed = write_records(tmp_path / "mixed.jsonl", CHAT_RECORDS["sft"] + CHAT_RECORDS["dpo"])
    unknown = write_records(tmp_path / "odd.jsonl", [{"question": "?", "answer": "!"}])
    assert_one_line_error(olmoe("data", "chat", str(mixed), "--out", str(tmp_path / "m")),
                          "dpo data among sft data")  # fmt: skip
    assert_one_line_error(olmoe("data", "chat", str(unknown), "--out", str(tmp_path / "u")),
                          "no known format")  # fmt: skip
    assert_one_line_error(olmoe("data", "chat", str(tmp_path / "none.jsonl"), "--out",
                                str(tmp_path / "n")), "none.jsonl")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.jsonl", "odd.jsonl", "sft.jsonl"]
    # --force replaces a prepared directory, never one that holds something else
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert_one_line_error(olmoe("data", "chat", str(good), "--out", str(keep)), "--force")
    assert_one_line_error(olmoe("data", "chat", str(good), "--out", str(keep), "--force"),
                          "will not replace it")  # fmt: skip
    assert (keep / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------- user mistakes
def test_missing_directory_is_one_line(tmp_path):
    result = olmoe("generate", str(tmp_path / "nowhere"), "hello")
    assert_one_line_error(result, "olmoe generate: error:", "nowhere")


def test_directory_without_weights_is_one_line(tmp_path):
    OlmoeConfig.tiny().save_pretrained(tmp_path)
    for command in (("generate", str(tmp_path), "hi"), ("info", str(tmp_path))):
        assert_one_line_error(olmoe(*command), "safetensors")


def test_directory_without_config_is_one_line(tmp_path):
    assert_one_line_error(olmoe("chat", str(tmp_path), stdin="hi\n"), "config.json")


def test_prompt_longer_than_the_context_window_is_one_line(checkpoint):
    directory, _, _ = checkpoint
    result = olmoe("generate", str(directory), "word " * 400)
    assert_one_line_error(result, "context window", "shorten")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "abc"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-k", "0"], "--top-k"),
        (["--dtype", "fp8"], "--dtype"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
    ],
)
def test_bad_flag_values_are_one_line(checkpoint, flags, fragment):
    directory, _, _ = checkpoint
    result = olmoe("generate", str(directory), "hi", *flags)
    assert_one_line_error(result, fragment, "--help", status=2)


def test_bad_device_is_one_line(checkpoint):
    directory, _, _ = checkpoint
    assert_one_line_error(
        olmoe("generate", str(directory), "hi", "--device", "toaster"), "--device"
    )


def test_missing_arguments_are_one_line():
    assert_one_line_error(olmoe("generate"), "MODEL", status=2)


def test_bench_hands_its_options_to_the_packaged_benchmark(tmp_path):
    # From any directory: the benchmark ships in the package, not beside it in a checkout.
    result = subprocess.run(
        [sys.executable, "-m", "olmoe", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "--shape" in result.stdout and "cpu_inference" in result.stdout


# ---------------------------------------------------------------------------- bugs vs mistakes
@pytest.mark.parametrize("bug", [ValueError, RuntimeError, KeyError, TypeError])
def test_a_library_bug_keeps_its_traceback(checkpoint, monkeypatch, bug):
    """Only an OlmoeError (or an OSError) is a user's mistake: any other exception from the
    library is a bug, and the command must not pass it off as a one-line user error."""
    directory, _, _ = checkpoint

    def broken(*args, **kwargs):
        raise bug("an internal invariant broke")

    monkeypatch.setattr("olmoe.checkpoint.summarize_checkpoint", broken)
    monkeypatch.delenv("OLMOE_DEBUG", raising=False)
    with pytest.raises(bug, match="internal invariant"):
        main(["info", str(directory)])


def test_a_library_bug_prints_a_traceback_from_the_command(checkpoint):
    directory, _, _ = checkpoint
    script = (
        "import sys, olmoe.checkpoint\n"
        "def broken(*args, **kwargs):\n"
        "    raise ValueError('an internal invariant broke')\n"
        "olmoe.checkpoint.summarize_checkpoint = broken\n"
        "from olmoe.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OLMOE_DEBUG"}
    result = subprocess.run(
        [sys.executable, "-c", script, "info", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: an internal invariant" in result.stderr
    assert "olmoe info: error:" not in result.stderr


@pytest.mark.parametrize("error", [ConfigError, CheckpointError, DataError, InputError, UsageError])
def test_an_olmoe_error_is_one_line_and_status_1(checkpoint, monkeypatch, capsys, error):
    directory, _, _ = checkpoint

    def refuse(*args, **kwargs):
        raise error("the file says\nsomething wrong")

    monkeypatch.setattr("olmoe.checkpoint.summarize_checkpoint", refuse)
    monkeypatch.delenv("OLMOE_DEBUG", raising=False)
    assert main(["info", str(directory)]) == 1
    assert capsys.readouterr().err == "olmoe info: error: the file says something wrong\n"


def test_olmoe_debug_shows_the_traceback_of_a_mistake(checkpoint, monkeypatch):
    directory, _, _ = checkpoint

    def refuse(*args, **kwargs):
        raise CheckpointError("not a checkpoint")

    monkeypatch.setattr("olmoe.checkpoint.summarize_checkpoint", refuse)
    monkeypatch.setenv("OLMOE_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["info", str(directory)])


# ---------------------------------------------------------------------------- package layout
SOURCE = Path(importlib.util.find_spec("olmoe").origin).parent
# Imported by the command line's modules before a command runs: `olmoe --help` must not wait
# for any of them.
HEAVY_MODULES = {"torch", "numpy", "safetensors", "tokenizers", "transformers", "uvicorn",
                 "fastapi", "matplotlib", "pyarrow"}  # fmt: skip


def _imports(tree: ast.AST):
    """(module name, node) of every import in `tree`; `from a import b` also yields a.b."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value, node  # importlib.import_module("...") and monkeypatch targets


def test_the_parser_loads_without_the_heavy_libraries():
    """What `olmoe --help` and a mistyped flag wait for: the package, every command module,
    transitively (the test below reads only the command modules' own imports), and olmoe.memory,
    which `main` sets up before any command."""
    heavy = HEAVY_MODULES - {"numpy"}  # numpy: a tenth of a second, for eval's metrics
    parser = "import olmoe.cli, olmoe.memory; olmoe.cli.build_parser()"
    assert modules_imported_by(parser, heavy) == []


def test_the_library_never_imports_the_command_line():
    offenders = []
    for path in sorted(SOURCE.rglob("*.py")):
        relative = path.relative_to(SOURCE)
        if relative.parts[0] == "cli" or relative == Path("__main__.py"):
            continue  # the command line itself, and `python -m olmoe`, which runs it
        for name, node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if name == "olmoe.cli" or name.startswith("olmoe.cli."):
                offenders.append(f"{relative}:{node.lineno} {name}")
    assert not offenders, offenders


def test_command_modules_import_heavy_libraries_only_inside_functions():
    offenders = []
    for path in sorted((SOURCE / "cli").glob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                offenders += [
                    f"{path.name}:{node.lineno} {name}"
                    for name, _ in _imports(node)
                    if name.split(".")[0] in HEAVY_MODULES
                ]
    assert not offenders, offenders


@pytest.mark.parametrize("native_bf16, engine", [(False, False), (True, False), (False, True)])
def test_a_person_loading_bf16_on_a_cpu_without_bf16_matmul_is_told(
    checkpoint, monkeypatch, capsys, native_bf16, engine
):
    """Unless the engine runs the model: it multiplies bf16 in float32 itself there."""
    import argparse

    import olmoe.engine
    from olmoe.cli import common

    monkeypatch.setattr(common, "cpu_has_bf16_matmul", lambda: native_bf16)
    monkeypatch.setattr(olmoe.engine, "applied", lambda model: engine)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    directory = checkpoint[0]
    args = argparse.Namespace(
        model=str(directory), revision=None, dtype="bf16", device="cpu", quantize=None
    )
    common.load_model(args)
    note = "--dtype fp32" in capsys.readouterr().err
    assert note is not (native_bf16 or engine)
