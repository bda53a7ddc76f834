"""The `olmoe` command, run as a user runs it: a subprocess against a tiny local checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM, TextStream
from olmoe.tokenizer import Tokenizer
from tests.conftest import randomize

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
    info = json.loads(olmoe("info", str(output), "--json").stdout)
    assert info["dtypes"] == ["float32", "int8"]
    # the fp32 embedding stays; experts, projections and the LM head shrink 4x
    assert info["bytes"] < 0.7 * 4 * model.num_parameters()
    assert (output / "tokenizer.json").is_file()
    result = olmoe("generate", str(output), "Bitcoin is", "--max-new-tokens", "5")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert_one_line_error(olmoe("quantize", str(directory), str(directory)), "OUTPUT")


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


def test_bench_hands_its_options_to_the_benchmark_script():
    result = olmoe("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "--shape" in result.stdout and "cpu_inference.py" in result.stdout
