"""Training runs on a tiny model: learning, exact resume, safe checkpoints, two processes, plots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from olmoe import OlmoeForCausalLM
from olmoe.cli import main as olmoe_main
from olmoe.train import load_config, state, train
from olmoe.train.plot import plot_run

STEPS = 20
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _tokens(folder: Path) -> tuple[Path, Path]:
    """A learnable stream: counting 2..99 again and again, with a sprinkle of noise."""
    rng = np.random.default_rng(0)
    stream = np.tile(np.arange(2, 100, dtype=np.uint16), 120)
    noisy = rng.random(stream.size) < 0.05
    stream[noisy] = rng.integers(2, 128, noisy.sum())
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "train.npy", stream)
    np.save(folder / "valid.npy", np.tile(np.arange(2, 100, dtype=np.uint16), 12))
    return folder / "train.npy", folder / "valid.npy"


def _config_file(folder: Path, run_dir: Path) -> Path:
    train_path, valid_path = _tokens(folder / "tokens")
    path = folder / "tiny.yaml"
    path.write_text(
        f"""run_dir: {run_dir}
model: {{preset: tiny}}
data: {{path: {train_path}, valid_path: {valid_path}, seq_len: 32}}
optim: {{lr: 1.0e-2}}
schedule: {{warmup_steps: 3}}
train: {{max_steps: {STEPS}, global_batch_tokens: 256, micro_batch_size: 4, precision: fp32,
         threads: 1}}
eval: {{every: 10, batches: 2}}
checkpoint: {{every: 10, keep: 0}}
"""
    )
    return path


def _steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if "loss" in json.loads(line)]


def _curve(records, keys=("step", "loss", "ce", "lb", "z", "grad_norm", "lr")):
    return [tuple(r[k] for k in keys) for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 20-step run (checkpoints at 10 and 20), shared by the tests."""
    folder = tmp_path_factory.mktemp("train")
    config_path = _config_file(folder, folder / "run")
    result = train(load_config(config_path), progress=False)
    return config_path, folder / "run", result


def test_a_short_run_learns(reference):
    _, run_dir, result = reference
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    first, last = np.mean([r["loss"] for r in steps[:3]]), np.mean([r["loss"] for r in steps[-3:]])
    assert last < first - 1.0, (first, last)
    assert result.val_loss < result.unigram_loss - 1.0  # far better than token frequencies
    record = steps[-1]
    assert record["loss"] == pytest.approx(record["ce"] + 0.01 * record["lb"] + 0.001 * record["z"])
    assert len(record["load_max"]) == len(record["router_entropy"]) == 2  # per layer
    assert np.sum(record["expert_counts"][0]) == 256 * 2  # every token's top-2 slots counted
    evals = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "val_loss" in r] == [10, 20]


def test_resume_reproduces_the_uninterrupted_run_exactly(reference, tmp_path):
    _, run_dir, _ = reference
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    # continue the copy from step 10 (as after a crash at step 17): its log is cut back to step
    # 10 and steps 11-20 must come out bit for bit as before, in float32 on the CPU
    checkpoint = resumed / "checkpoints" / state.checkpoint_name(10)
    assert olmoe_main(["train", "--resume", str(checkpoint), f"--run_dir={resumed}"]) == 0
    assert _curve(_steps(resumed)) == _curve(_steps(run_dir))
    final = resumed / "checkpoints" / state.checkpoint_name(STEPS)
    expected = run_dir / "checkpoints" / state.checkpoint_name(STEPS)
    for name in ("model.safetensors", state.OPTIMIZER_NAME):
        ours, theirs = load_file(final / name), load_file(expected / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_checkpoints_load_in_olmoe_and_transformers(reference):
    _, run_dir, _ = reference
    ids = torch.randint(0, 128, (2, 12))
    for directory in (run_dir, run_dir / "checkpoints" / state.checkpoint_name(STEPS)):
        ours = OlmoeForCausalLM.from_pretrained(directory)
        theirs = transformers.OlmoeForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_an_interrupted_save_never_looks_complete(reference, tmp_path, monkeypatch):
    config_path, _, _ = reference
    run_dir = tmp_path / "run"
    config = load_config(config_path, [f"--run_dir={run_dir}"])
    real_save_file = state.save_file

    def dies_at_step_20(tensors, path, metadata=None):
        if "00000020" in str(path):
            Path(path).write_bytes(b"half a file")
            raise KeyboardInterrupt  # the process is killed while writing
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(state, "save_file", dies_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / state.checkpoint_name(20)).exists()
    assert (checkpoints / state.LATEST_NAME).read_text().strip() == state.checkpoint_name(10)
    assert state.find_checkpoint(run_dir) == checkpoints / state.checkpoint_name(10)
    # the leftover is a hidden .partial directory, which the next trainer of the run removes
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == [
        f".{state.checkpoint_name(20)}.partial"
    ]
    monkeypatch.undo()
    assert train(config, resume=run_dir, progress=False).step == 20
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        state.LATEST_NAME,
        state.checkpoint_name(10),
        state.checkpoint_name(20),
    ]


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one(reference, tmp_path, strategy):
    config_path, _, _ = reference
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "olmoe"]
    command += ["train", str(config_path), f"--run_dir={two}"]
    command += [f"--distributed.strategy={strategy}", "--train.micro_batch_size=2"]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # One process with micro-batches of 2 accumulates the same 4 micro-batches per step that
    # the two ranks split between them (2 each), so even the per-micro-batch LB agrees.
    one = tmp_path / "one"
    train(
        load_config(config_path, [f"--run_dir={one}", "--train.micro_batch_size=2"]), progress=False
    )
    ones, twos = _steps(one), _steps(two)
    assert [r["step"] for r in twos] == list(range(1, STEPS + 1))
    # float32 sums over the batch in another order (gradients reduced across ranks instead of
    # accumulated in one .grad) differ by ~1e-7 relative per step; 1e-5 leaves room for 20
    # steps of that, while reading the wrong instances or averaging wrongly moves the loss by
    # more than 1e-3.
    for a, b in zip(ones, twos):
        for key in ("loss", "ce", "lb", "z", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # the checkpoint written by rank 0 loads in one process and in transformers
    ids = torch.randint(0, 128, (2, 12))
    ours = OlmoeForCausalLM.from_pretrained(two / "checkpoints" / state.checkpoint_name(STEPS))
    single = OlmoeForCausalLM.from_pretrained(one)
    theirs = transformers.OlmoeForCausalLM.from_pretrained(two).eval()
    with torch.no_grad():
        logits = ours(ids).logits
        torch.testing.assert_close(logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, single(ids).logits, rtol=1e-3, atol=1e-3)


def test_plot_writes_pngs(reference, tmp_path, capsys):
    _, run_dir, _ = reference
    paths = plot_run(run_dir, tmp_path)
    assert [p.name for p in paths] == ["curves.png", "expert_load.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert olmoe_main(["plot", str(run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert "expert_load.png" in capsys.readouterr().out


def test_train_command_errors_are_one_line(tmp_path, capsys):
    assert olmoe_main(["train"]) == 1
    assert "pass a CONFIG" in capsys.readouterr().err
    assert olmoe_main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "no config file" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("data: {path: x}\n")
    assert olmoe_main(["train", str(config), "--optim.lr=fast"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optim.lr must be a number" in err
    assert olmoe_main(["train", "--resume", str(tmp_path)]) == 1
    assert "no config.yaml" in capsys.readouterr().err


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    """ENOSPC while writing step 20's files: one clear error naming the intact checkpoint, no
    staging left behind, and the run resumes from step 10."""
    import errno

    config_path, _, _ = reference
    run_dir = tmp_path / "run"
    config = load_config(config_path, [f"--run_dir={run_dir}"])
    real_save_file = state.save_file

    def disk_full_at_step_20(tensors, path, metadata=None):
        if "00000020" in str(path):
            Path(path).write_bytes(b"the first bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(state, "save_file", disk_full_at_step_20)
    with pytest.raises(OSError, match=r"step-00000010, is intact") as caught:
        train(config, progress=False)
    assert caught.value.errno == errno.ENOSPC and "No space left" in str(caught.value)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        state.LATEST_NAME,
        state.checkpoint_name(10),
    ]
    monkeypatch.undo()
    assert train(config, resume=run_dir, progress=False).step == 20
