"""A full disk and a read-only output, for every command that writes: one line naming the
output (status 1, no traceback), the previous output as it was, no staging left behind; a
read-only output fails before the work. The disk fills through tests/conftest.py's `full_disk`
(ENOSPC once the room is used up); bench/train_faults.py --only disk fills a real tmpfs."""

from __future__ import annotations

import errno
import importlib

import pytest

from olmoe import OlmoeForCausalLM
from olmoe.checkpoint import save_pretrained
from olmoe.cli import main
from olmoe.tokenizer import Tokenizer
from tests.conftest import tiny_model

prepare_module = importlib.import_module("olmoe.data.prepare")  # the package exports prepare()

COMMANDS = ["eval", "data prepare", "analyze", "quantize"]
COMMAND_IDS = [name.replace(" ", "-") for name in COMMANDS]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny model with OLMo's vocabulary (and so its default tokenizer), and a small text."""
    folder = tmp_path_factory.mktemp("inputs")
    tiny_model(vocab_size=50304, eos_token_id=50279, max_position_embeddings=128).save_pretrained(
        folder / "model"
    )
    (folder / "text").mkdir()
    for i in range(3):
        (folder / "text" / f"{i}.txt").write_text(f"Document {i}: the quick brown fox. " * 20)
    return folder


def command(name: str, inputs, out) -> tuple[list[str], object]:
    """The command line of `name` and the output it writes, under `out`."""
    model, text = str(inputs / "model"), str(inputs / "text")
    argv, output = {
        "eval": (["eval", model, "--text", text, "--max-length", "16", "--dtype", "fp32",
                  "--no-progress", "--output"], out / "results.json"),
        "data prepare": (["data", "prepare", text, "--quiet", "--force", "--out"], out / "tokens"),
        "analyze": (["analyze", "load", model, "--data", text, "--max-tokens", "100",
                     "--chunk-length", "32", "--dtype", "fp32", "--quiet", "--out"],
                    out / "analysis"),
        "quantize": (["quantize", model], out / "int8"),
    }[name]  # fmt: skip
    return [*argv, str(output)], output


def files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def one_line_error(capsys, name: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"olmoe {name.split()[0]}: error: "), err
    return err


@pytest.mark.parametrize("share", [0, 0.5], ids=["at-the-first-byte", "half-way"])
@pytest.mark.parametrize("name", COMMANDS, ids=COMMAND_IDS)
def test_a_full_disk_keeps_the_previous_output(name, share, inputs, tmp_path, full_disk, capsys):
    argv, output = command(name, inputs, tmp_path / "out")
    assert main(argv) == 0  # the previous output
    before = files(tmp_path / "out")
    capsys.readouterr()
    full_disk(tmp_path / "out", room=int(share * sum(map(len, before.values()))))
    assert main(argv) == 1
    err = one_line_error(capsys, name)
    assert f"cannot write {output} (No space left on device); the earlier {output.name} is " \
           "unchanged" in err  # fmt: skip
    assert files(tmp_path / "out") == before  # intact, and no staging left beside it


@pytest.mark.parametrize("name", COMMANDS, ids=COMMAND_IDS)
def test_a_read_only_output_fails_before_the_work(name, inputs, read_only_dir, monkeypatch,
                                                  capsys):  # fmt: skip
    def work(*args, **kwargs):
        raise AssertionError("the work began before the output was found read-only")

    monkeypatch.setattr(OlmoeForCausalLM, "from_pretrained", work)
    monkeypatch.setattr(prepare_module, "DocumentEncoder", work)
    argv, output = command(name, inputs, read_only_dir / "out")
    assert main(argv) == 1
    err = one_line_error(capsys, name)
    assert f"cannot write {output} (" in err
    assert "Read-only file system" in err or "Permission denied" in err


@pytest.mark.parametrize("share", [0, 0.5, 0.9])
def test_save_pretrained_on_a_full_disk_keeps_the_previous_checkpoint(share, tmp_path, full_disk):
    model, tokenizer = tiny_model(vocab_size=50304), Tokenizer.olmo()
    output = tmp_path / "out" / "model"
    save_pretrained(model, output, tokenizer=tokenizer)
    before = files(tmp_path / "out")
    full_disk(tmp_path / "out", room=int(share * sum(map(len, before.values()))))
    with pytest.raises(OSError, match="the earlier model is unchanged") as caught:
        save_pretrained(tiny_model(seed=1, vocab_size=50304), output, tokenizer=tokenizer)
    assert caught.value.errno == errno.ENOSPC
    assert files(tmp_path / "out") == before
