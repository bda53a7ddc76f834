"""The learning rate of each optimizer step, a pure function of the step (so a resumed run
needs no scheduler state)."""

from __future__ import annotations

import math

from olmoe.train.config import ScheduleSection


def learning_rate(step: int, peak: float, schedule: ScheduleSection, max_steps: int) -> float:
    """LR for optimizer step `step` (1 = the first update).

    Linear warmup reaches `peak` at step `warmup_steps` (or `warmup_ratio` of `max_steps`);
    then cosine (or linear) decay reaches `final_lr_ratio * peak` at `decay_steps` (default
    `max_steps`) and stays there. OLMoE's
    pretraining: warmup 2,500, cosine to 10%; its annealing stage: linear, no warmup, to 0.
    """
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")  # a caller's bug
    warmup = schedule.warmup_steps
    if schedule.warmup_ratio is not None:
        warmup = round(schedule.warmup_ratio * max_steps)
    if step < warmup:
        return peak * step / warmup
    final = peak * schedule.final_lr_ratio
    if schedule.name == "constant":
        return peak
    decay_end = schedule.decay_steps or max_steps
    if decay_end <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (decay_end - warmup))
    if schedule.name == "cosine":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak + (final - peak) * progress  # linear
