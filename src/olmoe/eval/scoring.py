"""OLMES's multiple-choice metrics, from the summed log-probabilities of each choice.

Every metric picks the choice with the highest value and counts the question right when that is
the gold choice; ties go to the first choice, as OLMES's `list.index(max(...))` does:

- acc_raw:       sum log p(continuation | context)
- acc_per_token: the same, divided by the continuation's token count
- acc_per_char:  divided by its character count, the leading space included (OLMES; the older
                 in-loop evaluator and lm-evaluation-harness leave the space out)
- acc_per_byte:  divided by its UTF-8 byte count (the choice with the fewest bits per byte)
- acc_uncond:    minus sum log p(continuation | "Answer:") — PMI, subtracted in log space

All accuracies are percentages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from olmoe.errors import ConfigError

METRICS = ("acc_raw", "acc_per_token", "acc_per_char", "acc_per_byte", "acc_uncond")


@dataclasses.dataclass(frozen=True)
class ChoiceScore:
    logprob: float  # summed over the continuation's tokens
    num_tokens: int
    continuation: str
    uncond_logprob: float | None = None  # the same continuation after the unconditional prompt


def choice_value(metric: str, score: ChoiceScore) -> float:
    """The number `metric` maximises over a question's choices."""
    if metric == "acc_raw":
        return score.logprob
    if metric == "acc_per_token":
        return score.logprob / max(score.num_tokens, 1)
    if metric == "acc_per_char":
        return score.logprob / max(len(score.continuation), 1)
    if metric == "acc_per_byte":
        return score.logprob / max(len(score.continuation.encode("utf-8")), 1)
    if metric == "acc_uncond":
        if score.uncond_logprob is None:
            raise ValueError("acc_uncond needs the unconditional log-probability of every choice")
        return score.logprob - score.uncond_logprob
    raise ConfigError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")


def predict(metric: str, scores: Sequence[ChoiceScore]) -> int:
    """The index of the chosen answer: the first of the highest values."""
    values = [choice_value(metric, s) for s in scores]
    return values.index(max(values))


def available_metrics(scores: Sequence[ChoiceScore]) -> tuple[str, ...]:
    """The metrics a question's scores support (acc_uncond only with unconditional scores)."""
    if all(s.uncond_logprob is not None for s in scores):
        return METRICS
    return tuple(m for m in METRICS if m != "acc_uncond")


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of no questions")
    return 100.0 * sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def macro_average(scores: Mapping[str, float]) -> float:
    """The unweighted mean over groups (MMLU: over its subjects, not over questions)."""
    if not scores:
        raise ValueError("macro average of no groups")
    return sum(scores.values()) / len(scores)


def best_format(primary: Mapping[str, float]) -> str:
    """OLMES reports the better of the formats; on a tie the first listed wins."""
    if not primary:
        raise ValueError("no formats to choose from")
    return max(primary, key=lambda name: primary[name])
