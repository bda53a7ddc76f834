"""Training to a time budget: the steps that fit, decided once from the run's own timings."""

from __future__ import annotations

import itertools
import json
import types

import pytest

from olmoe.errors import ConfigError
from olmoe.train import budget, load_config, state, train
from olmoe.train import trainer as trainer_module
from tests.train.test_run import _config_file, _steps


def test_the_typical_step_leaves_out_the_warm_up_steps():
    assert budget.typical_step_seconds([9.0, 7.0, 1.0, 3.0, 2.0]) == 2.0
    assert budget.typical_step_seconds([9.0]) == 9.0  # too few to leave any out


@pytest.mark.parametrize(("spent", "expected"), [(0.0, 20), (12.0, 12), (29.5, 0), (45.0, 0)])
def test_steps_that_fit_in_what_is_left(spent, expected):
    assert budget.steps_that_fit(30.0, spent, per_step=1.5) == expected


@pytest.fixture
def half_second_steps(monkeypatch):
    """Every training step takes exactly half a second by the trainer's clock."""
    ticks = itertools.count()  # calls alternate: a step's start (0.0), its end (0.5)
    clock = types.SimpleNamespace(perf_counter=lambda: 0.5 * (next(ticks) % 2))
    monkeypatch.setattr(trainer_module, "time", clock)


def test_a_budget_lowers_max_steps_once_and_a_resume_keeps_it(tmp_path, half_second_steps):
    config_path = _config_file(tmp_path, tmp_path / "run")
    # 7 seconds at 0.5 s a step: 10 timed steps (5 s), then 4 more fit
    config = load_config(config_path, ["--train.max_minutes=0.1166667", "--train.max_steps=100"])
    result = train(config, progress=False)
    assert result.step == 14
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    (decision,) = [r for r in log if "max_steps" in r]
    assert decision == {"step": 10, "max_steps": 14, "step_seconds": 0.5}
    steps = _steps(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 15))
    assert steps[-1]["lr"] == pytest.approx(1.0e-2 * 0.1)  # the cosine ends at step 14
    checkpoint = tmp_path / "run" / "checkpoints" / state.checkpoint_name(14)
    saved = state.read_state(checkpoint)
    assert saved["budget_max_steps"] == 14 and saved["train_seconds"] == pytest.approx(7.0)
    again = train(config, resume=checkpoint, progress=False)
    assert again.step == 14  # the decision holds: no new calibration, no more steps


def test_a_budget_never_raises_max_steps(tmp_path, half_second_steps):
    config = load_config(
        _config_file(tmp_path, tmp_path / "run"), ["--train.max_minutes=10", "--train.max_steps=12"]
    )
    assert train(config, progress=False).step == 12


def test_a_budget_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_minutes must be > 0"):
        load_config(_config_file(tmp_path, tmp_path / "run"), ["--train.max_minutes=0"])
