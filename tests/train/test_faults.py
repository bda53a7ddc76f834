"""Crash-anywhere training, a few kills of bench/train_faults.py's campaign: `olmoe train`
SIGKILLed at chosen instants and resumed each time leaves no checkpoint, revision or model that
looks complete but is not, and ends with the uninterrupted run's results, bit for bit (fp32).
The campaign itself, over a hundred kills: `python bench/train_faults.py` (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_scripts import bench_script

# KEY:N of the harness (see its docstring): the N-th hit of a hook at a path, in a run that
# checkpoints every 2 steps, keeps 2 and keeps a revision every 4.
OPTIMIZER_FILE = "save_file@checkpoints/.step-N.partial/trainer/optimizer.safetensors"
INTO_PLACE = "replace@checkpoints/.step-N.partial -> checkpoints/step-N"
PRUNE = "rmtree@checkpoints/.step-N.old"
QUICK = [  # (the kill, the step its resume starts from)
    pytest.param(f"{OPTIMIZER_FILE}:2", 2, id="writing-step-4s-optimizer-state"),
    pytest.param(f"{INTO_PLACE}:3", 4, id="renaming-step-6-into-place"),
    pytest.param(f"{PRUNE}:1", 6, id="deleting-step-2-after-step-6"),
    pytest.param("step:5", 4, id="in-the-5th-optimizer-step"),
]
SLOW = [
    pytest.param("backward:17", 4, id="in-a-backward-pass"),
    pytest.param("write@checkpoints/.latest.X.partial:4", 6, id="writing-latest"),
    pytest.param(
        "save_file@revisions/..stepN-tokensNB.X.partial.X.partial/model.safetensors:2",
        6,
        id="writing-the-step-8-revision",
    ),
    pytest.param(
        "replace@../.run.X.partial/config.json -> config.json:1",
        8,
        id="moving-the-final-config-in",
    ),
    pytest.param(
        "replace@../.run.X.partial/model.safetensors -> model.safetensors:1",
        8,
        id="moving-the-final-weights-in",
    ),
]


@pytest.fixture(scope="module")
def faults():
    with bench_script("train_faults") as module:
        yield module


def campaign(faults, folder: Path, processes: int):
    """A job of `processes` ranks and its uninterrupted, traced reference run."""
    job = faults.Campaign(folder, processes, timeout=180)
    return job, job.start_reference()


@pytest.fixture(scope="module")
def single(faults, tmp_path_factory):
    return campaign(faults, tmp_path_factory.mktemp("faults"), 1)


def kill_and_resume(job, reference, kill: str, rank: int = 0):
    """One episode: a fresh run killed at `kill` on `rank`, resumed to the end; its one kill."""
    assert kill.rsplit(":", 1)[0] in reference.hits[rank], "the reference run never gets there"
    episode = job.episode("targeted", [{"kill": kill, "kill_rank": rank}])
    assert [k.died_at for k in episode.kills] == [kill.rsplit(":", 1)[0]], episode
    assert episode.kills[0].problems == [], episode  # nothing that looks complete but is not
    assert episode.problems == [], episode  # the uninterrupted run's results, no leftovers
    return episode.kills[0]


@pytest.mark.parametrize(("kill", "resumed_from"), QUICK)
def test_a_killed_run_resumes_to_the_same_result(faults, single, kill, resumed_from):
    killed = kill_and_resume(*single, kill)
    assert killed.resumed_from == resumed_from
    if kill.startswith(PRUNE):  # the half-deleted checkpoint is hidden, then removed
        assert killed.leftovers == ["checkpoints/.step-00000002.old"]


@pytest.mark.slow
@pytest.mark.parametrize(("kill", "resumed_from"), SLOW)
def test_more_kills_resume_to_the_same_result(faults, single, kill, resumed_from):
    assert kill_and_resume(*single, kill).resumed_from == resumed_from


@pytest.mark.slow
def test_random_kills_in_a_row(faults, single):
    job, reference = single
    delays = [reference.work_seconds * share for share in (0.3, 0.5, 0.8)]
    episode = job.episode("random", [{"kill_after": delay} for delay in delays])
    assert episode.kills and all(k.problems == [] for k in episode.kills), episode
    assert episode.problems == [], episode


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "rank"),
    [(f"{OPTIMIZER_FILE}:2", 0), ("backward:9", 1)],
    ids=["rank-0-writing-a-checkpoint", "rank-1-in-a-backward-pass"],
)
def test_a_torchrun_job_with_a_killed_rank_resumes_to_the_same_result(faults, tmp_path, kill, rank):
    job, reference = campaign(faults, tmp_path, 2)
    kill_and_resume(job, reference, kill, rank)
