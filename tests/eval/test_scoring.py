"""OLMES metrics on crafted log-probabilities, checked against values computed by hand."""

import math

import pytest

from olmoe.errors import ConfigError
from olmoe.eval.scoring import (
    ChoiceScore,
    accuracy,
    available_metrics,
    best_format,
    choice_value,
    macro_average,
    predict,
)


def scores(*rows):
    return [ChoiceScore(*row) for row in rows]


# Three choices whose winners differ by metric:
#   " A cat"  (6 chars, 2 tokens): -6.0 raw, -3.0 per token, -1.0 per char;  uncond -5.0 -> -1.0
#   " dog"    (4 chars, 1 token):  -5.0 raw, -5.0 per token, -1.25 per char; uncond -1.0 -> -4.0
#   " bird!!" (7 chars, 3 tokens): -6.3 raw, -2.1 per token, -0.9 per char;  uncond -6.0 -> -0.3
CRAFTED = scores(
    (-6.0, 2, " A cat", -5.0),
    (-5.0, 1, " dog", -1.0),
    (-6.3, 3, " bird!!", -6.0),
)


@pytest.mark.parametrize(
    "metric, expected",
    [("acc_raw", 1), ("acc_per_token", 2), ("acc_per_char", 2), ("acc_uncond", 2)],
)
def test_each_metric_picks_its_own_winner(metric, expected):
    assert predict(metric, CRAFTED) == expected


def test_values_match_hand_computation():
    assert choice_value("acc_raw", CRAFTED[0]) == -6.0
    assert choice_value("acc_per_token", CRAFTED[2]) == pytest.approx(-2.1)
    # The leading space counts: " dog" is 4 characters, so -5 / 4, not -5 / 3.
    assert choice_value("acc_per_char", CRAFTED[1]) == pytest.approx(-1.25)
    assert choice_value("acc_uncond", CRAFTED[0]) == pytest.approx(-1.0)  # -6 - (-5)
    # Bytes, not characters: "é" is two UTF-8 bytes.
    assert choice_value("acc_per_byte", ChoiceScore(-4.0, 1, " é", None)) == pytest.approx(-4 / 3)


def test_per_char_counts_leading_space_changes_the_answer():
    # Without the space: -3/2 = -1.5 vs -7/5 = -1.4 -> choice 1; with it: -1.0 vs -7/6 -> choice 0.
    pair = scores((-3.0, 1, " ab"), (-7.0, 3, " abcde"))
    assert predict("acc_per_char", pair) == 0
    assert predict("acc_raw", pair) == 0


def test_pmi_subtracts_unconditional_logprob():
    # Raw prefers the common answer; PMI the one the question made much more likely.
    pair = scores((-2.0, 1, " yes", -1.0), (-3.0, 1, " maybe", -8.0))
    assert predict("acc_raw", pair) == 0
    assert predict("acc_uncond", pair) == 1  # -1 vs +5


def test_partial_scoring_is_raw_on_the_shared_continuation():
    # WinoGrande: same continuation after two contexts, no normalisation, so raw decides even
    # though the per-token values would agree.
    pair = scores((-4.0, 2, " went home."), (-3.5, 2, " went home."))
    assert predict("acc_raw", pair) == 1


def test_ties_go_to_the_first_choice():
    assert predict("acc_raw", scores((-1.0, 1, " a"), (-1.0, 1, " b"))) == 0


def test_uncond_needs_unconditional_scores():
    plain = scores((-1.0, 1, " a"), (-2.0, 1, " b"))
    assert "acc_uncond" not in available_metrics(plain)
    assert "acc_uncond" in available_metrics(CRAFTED)
    with pytest.raises(ValueError, match="unconditional"):
        predict("acc_uncond", plain)
    with pytest.raises(ConfigError, match="unknown metric"):
        predict("acc_best", plain)


def test_accuracy_is_a_percentage():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 75.0
    with pytest.raises(ValueError):
        accuracy([0], [0, 1])


def test_best_format_takes_the_higher_score():
    assert best_format({"mc": 41.0, "rc": 62.1}) == "rc"
    assert best_format({"mc": 70.2, "rc": 69.9}) == "mc"
    assert best_format({"mc": 50.0, "rc": 50.0}) == "mc"  # a tie keeps the first


def test_macro_average_weights_groups_equally():
    # Micro average over 4 + 1 questions would be (4*100 + 1*0) / 5 = 80; MMLU's is 50.
    assert macro_average({"big": 100.0, "small": 0.0}) == 50.0
    assert math.isclose(macro_average({"a": 25.0, "b": 50.0, "c": 60.0}), 45.0)
    with pytest.raises(ValueError):
        macro_average({})
