"""What killed writes leave in a run directory is never read and is deleted by the next trainer
of the run; a checkpoint being pruned is hidden before its files go."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from olmoe.train import state
from olmoe.train.lock import LOCK_NAME

LEFTOVERS = [  # what SIGKILL leaves, mid-write, in a run `run` (bench/train_faults.py's keys)
    ".config.k2j3l4m5.yaml.partial",
    "checkpoints/.step-00000004.partial/",
    "checkpoints/..step-00000004.partial.a1b2c3d4.partial/",
    "checkpoints/.latest.a1b2c3d4.partial",
    "checkpoints/.step-00000002.old/",
    "revisions/.step4-tokens0B.a1b2c3d4.partial/",
    "revisions/.step4-tokens0B.a1b2c3d4.old/",
    "../.run.a1b2c3d4.partial/",
]
KEPT = [
    LOCK_NAME,
    "config.yaml",
    "log.jsonl",
    "checkpoints/latest",
    "checkpoints/step-00000006/",
    "revisions/step4-tokens0B/",
    "../.run2.a1b2c3d4.partial/",  # another run's, beside this one
    "../.run.notes",
]


def make(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        if name.endswith("/"):
            path.mkdir(parents=True)
            (path / "model.safetensors").write_text("weights")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("text")


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_remove_leftovers_deletes_hidden_staging_and_keeps_the_run(tmp_path):
    run_dir = tmp_path / "run"
    make(run_dir, KEPT)
    kept = listing(tmp_path)
    make(run_dir, LEFTOVERS)
    outside = tmp_path / "elsewhere"
    make(outside, ["model.safetensors"])
    (run_dir / "checkpoints" / ".x.partial").symlink_to(outside)  # the link goes, not its target
    state.remove_leftovers(run_dir)
    assert listing(tmp_path) == kept | {"elsewhere", "elsewhere/model.safetensors"}


def test_the_trainer_removes_leftovers_once_it_holds_the_lock(tmp_path):
    from olmoe.train import load_config
    from olmoe.train.trainer import Trainer

    run_dir = tmp_path / "run"
    make(run_dir, LEFTOVERS)
    config = load_config(None, [f"--run_dir={run_dir}", f"--data.path={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError):
        Trainer(config, progress=False)  # fails at the data, after the lock and the cleanup
    assert listing(tmp_path) == {"run", f"run/{LOCK_NAME}", "run/checkpoints", "run/revisions"}


def checkpoints(root: Path, steps: list[int]) -> None:
    make(root, [f"{state.checkpoint_name(step)}/" for step in steps])


def test_prune_keeps_the_newest(tmp_path):
    checkpoints(tmp_path, [2, 4, 6])
    state._prune(tmp_path, keep=2, latest=state.checkpoint_name(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    state._prune(tmp_path, keep=0, latest=state.checkpoint_name(6))  # 0 keeps every one
    assert len(list(tmp_path.iterdir())) == 2


def test_a_prune_cut_short_leaves_no_checkpoint_that_lacks_files(tmp_path, monkeypatch):
    checkpoints(tmp_path, [2, 4, 6])
    (tmp_path / ".step-00000002.old").mkdir()  # an earlier prune's, killed: not in the way
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        if (Path(path) / "model.safetensors").exists():  # the checkpoint's, not the empty one
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt  # SIGKILL, as far as the files can tell
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        state._prune(tmp_path, keep=2, latest=state.checkpoint_name(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step-00000002.old",  # hidden: no reader looks here; the next trainer deletes it
        "step-00000004",
        "step-00000006",
    ]
    for name in ("step-00000004", "step-00000006"):
        assert (tmp_path / name / "model.safetensors").is_file()


def test_a_resume_drops_the_log_line_a_full_disk_tore(tmp_path):
    from olmoe.train import load_config, train

    np.save(tmp_path / "train.npy", np.tile(np.arange(2, 100, dtype=np.uint16), 20))
    config = load_config(None, [
        f"--run_dir={tmp_path / 'run'}", "--model.preset=tiny", f"--data.path={tmp_path}/train.npy",
        "--data.seq_len=32", "--train.max_steps=2", "--train.global_batch_tokens=128",
        "--train.micro_batch_size=4", "--train.precision=fp32", "--train.threads=1",
        "--checkpoint.every=2",
    ])  # fmt: skip
    train(config, progress=False)
    log = tmp_path / "run" / "log.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "loss": 4.1')  # the append that ENOSPC cut short
    assert train(config, resume=tmp_path / "run", progress=False).step == 2
    assert log.read_text() == whole
