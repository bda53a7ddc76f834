"""Training to a time budget (`train.max_minutes`): the run times its own first steps and sets
`max_steps` to the number of steps that fits, once, so that from then on the schedule is a
pure function of the step again (and a resumed run keeps it)."""

from __future__ import annotations

import statistics

CALIBRATION_STEPS = 10  # steps timed before deciding
WARMUP_STEPS = 2  # of those, the first ones allocate and compile: not counted


def typical_step_seconds(step_seconds: list[float]) -> float:
    """The median time of the timed steps after the warm-up ones."""
    return statistics.median(step_seconds[WARMUP_STEPS:] or step_seconds)


def steps_that_fit(budget_seconds: float, spent_seconds: float, per_step: float) -> int:
    """How many more steps of `per_step` seconds fit in what is left of the budget."""
    return max(0, int((budget_seconds - spent_seconds) // per_step))
