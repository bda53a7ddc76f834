"""Generative-task scorers on hand-worked cases, each against what its reference harness does."""

import itertools
import math
import random
from fractions import Fraction

import pytest

from olmoe.eval.generative_metrics import (
    _best_matching,
    drop_scores,
    gsm8k_exact_match,
    gsm8k_extract,
    gsm8k_gold,
    last_boxed,
    math_candidates,
    math_exact_match,
    math_gold,
    mean_pass_at_k,
    mean_percent,
    minerva_final_answer,
    normalize_final_answer,
    normalize_squad,
    pass_at_k,
    squad_exact_match,
    squad_f1,
)

# --- GSM8K ---------------------------------------------------------------------------------------

GSM8K_SOLUTION = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"
)


@pytest.mark.parametrize(
    "generation, extracted",
    [
        ("There are 15 trees. 21 - 15 = 6. The answer is 6.", "6"),
        ("She had 32 + 42 = 74. So the answer is 74.", "74"),  # OLMES's shots: "So the answer is"
        # The first "answer is" wins; its pattern ends in any character, so "7." is kept here
        # (and the final period is dropped before comparing).
        ("The answer is 7. Question: Tom has 9 apples", "7."),
        ("The answer is -3.", "-3"),
        ("The answer is 1,234.", "1,234"),
        ("In total she pays $1,234.", "$1,234."),  # no "answer is": the last number
        ("It costs 2.50 dollars", "2.50"),
        ("First 3 then 12 and finally 40", "40"),
        ("Temperatures fell to -5", "-5"),
        ("No digits here.", None),
    ],
)
def test_gsm8k_extracts_the_answer_then_the_last_number(generation, extracted):
    assert gsm8k_extract(generation) == extracted


@pytest.mark.parametrize(
    "generation, gold, correct",
    [
        ("9 * 2 = 18. So the answer is 18.", GSM8K_SOLUTION, True),
        ("9 * 2 = 18. So the answer is 19.", GSM8K_SOLUTION, False),
        ("She makes $18.", "18", True),
        ("In total she pays $1,234.", "#### 1234", True),  # "$", "," and the period go
        ("The answer is 1,234.", "1,234", True),
        ("The answer is -3.", "#### -3", True),
        ("The answer is 3.", "#### -3", False),
        ("The answer is 2.5.", "2.5", True),
        ("The answer is 2.50.", "2.5", False),  # exact match of strings, not of values
        ("I do not know.", "18", False),
        ("The answer is 7. Later 18 appears", "18", False),
    ],
)
def test_gsm8k_exact_match(generation, gold, correct):
    assert gsm8k_exact_match(generation, gold) is correct


def test_gsm8k_gold_is_the_number_after_the_hashes():
    assert gsm8k_gold(GSM8K_SOLUTION) == "18"
    assert gsm8k_gold(" 42 ") == "42"


# --- MATH (Minerva) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("$\\frac{3}{4}$", "\\frac{3}{4}"),
        ("\\frac12", "\\frac{1}{2}"),  # shorthand TeX
        ("\\frac123", "\\frac{1}{2}3"),
        ("\\sqrt2", "\\sqrt{2}"),
        ("100,000", "100000"),
        ("1,2,3", "123"),  # commas go whenever only digits are left, even from a list
        ("x = 5", "5"),  # the right-hand side of the last "="
        ("16 \\text{ inches}", "16"),
        ("5 dollars", "5"),
        ("\\$32", "32"),
        ("10^\\circ", "10"),
        ("\\boxed{7}", "7"),
        ("\\textbf{12}", "12"),
        ("\\text{(B)}", "(B)"),
        ("-\\frac{2}{3}", "-\\frac{2}{3}"),
        ("\\dfrac{1}{2}", "\\dfrac{1}{2}"),  # Minerva leaves \dfrac alone
    ],
)
def test_minerva_normalization(raw, normalized):
    assert normalize_final_answer(raw) == normalized


@pytest.mark.parametrize(
    "text, contents",
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{1} first, then \\boxed{\\sqrt{2}}", "\\sqrt{2}"),  # the last one
        ("\\boxed{{a}+{b}}", "{a}+{b}"),  # braces matched
        ("\\fbox{3}", "3"),
        ("is \\boxed 5$ dollars", "5"),  # "\boxed " runs to the next "$"
        ("\\boxed{never closed", None),
        ("no box at all", None),
    ],
)
def test_last_boxed(text, contents):
    assert last_boxed(text) == contents


@pytest.mark.parametrize(
    "generation, answer",
    [
        ("...\nFinal Answer: The final answer is $16$. I hope it is correct.\n", "$16$"),
        ("Final Answer: The final answer is $16$. ", "$16$"),  # stopped before "I hope..."
        # The pattern wants any character and a space before "I hope it is correct.", which
        # these lack even with the sentence appended (lm-eval gives "[invalidanswer]").
        ("Final Answer: The final answer is $16$.", None),
        ("Final Answer: The final answer is $16$. I hope", None),
        ("The answer is 16.", None),
    ],
)
def test_minerva_final_answer_line(generation, answer):
    assert minerva_final_answer(generation) == answer


MINERVA_GENERATION = (
    "Equating this to 480 pounds, $30n = 480$, so $n = \\boxed{16}$.\n"
    "Final Answer: The final answer is $16$. I hope it is correct."
)


def test_math_candidates_are_the_final_answer_line_then_the_last_box():
    assert math_candidates(MINERVA_GENERATION) == ["16", "16"]
    assert math_candidates("So the result is $\\boxed{\\frac12}$.") == ["\\frac{1}{2}"]
    assert math_candidates("I give up.") == []


@pytest.mark.parametrize(
    "generation, gold, correct",
    [
        (MINERVA_GENERATION, "16", True),
        (MINERVA_GENERATION, "17", False),
        (
            "Final Answer: The final answer is $\\frac12$. I hope it is correct.",
            "\\frac{1}{2}",
            True,
        ),
        ("Thus $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True),
        ("Thus $\\boxed{\\frac{1}{2}}$.", "0.5", False),  # strings, not values (lm-eval: sympy)
        ("Thus $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", False),
        ("The area is $\\boxed{100,000}$ square feet.", "100000", True),
        ("Final Answer: The final answer is $x=3$. I hope it is correct.", "3", True),
        ("Final Answer: The final answer is $5$. I hope it is correct. \\boxed{6}", "6", True),
        ("No answer.", "16", False),
    ],
)
def test_math_exact_match(generation, gold, correct):
    assert math_exact_match(generation, gold) is correct


def test_math_gold_is_the_solutions_last_box():
    solution = "We have $(2)(12) = \\boxed{24}.$"
    assert math_gold(solution) == "24"
    assert math_exact_match(MINERVA_GENERATION.replace("16", "24"), math_gold(solution))


# --- SQuAD-style QA ------------------------------------------------------------------------------


def test_squad_normalization():
    assert normalize_squad("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_squad("An apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_squad("  Theatre  ") == "theatre"  # "the" only as a word


@pytest.mark.parametrize(
    "prediction, golds, em, f1",
    [
        ("The Eiffel Tower", ["Eiffel Tower"], 1.0, 1.0),
        ("eiffel tower.", ["The Eiffel Tower", "Paris"], 1.0, 1.0),
        ("Paris", ["The Eiffel Tower", "Paris"], 1.0, 1.0),  # the best gold counts
        ("Paris, France", ["Paris"], 0.0, 2 * 0.5 * 1.0 / 1.5),
        # 1 of 3 predicted tokens in either gold of 2: precision 1/3, recall 1/2, F1 0.4.
        ("the tower in Paris", ["Eiffel Tower", "Paris, France"], 0.0, 0.4),
        ("Tower Tower", ["Tower"], 0.0, 2 * 0.5 * 1.0 / 1.5),  # tokens counted with repeats
        ("London", ["Paris"], 0.0, 0.0),
        ("", ["Paris"], 0.0, 0.0),
        ("", ["", "  "], 1.0, 1.0),  # no answer against no answer (SQuAD v2.0)
        ("the", ["a"], 1.0, 1.0),  # both normalise to nothing
    ],
)
def test_squad_exact_match_and_f1(prediction, golds, em, f1):
    assert squad_exact_match(prediction, golds) == em
    assert squad_f1(prediction, golds) == pytest.approx(f1)


# --- DROP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction, golds, em, f1",
    [
        ("swedish", [("swedish",)], 1.0, 1.0),
        ("Swedish.", ["swedish"], 1.0, 1.0),
        ("1,000", ["1000"], 1.0, 1.0),  # numbers compared as floats: "1000.0"
        ("2", ["2.0"], 1.0, 1.0),
        ("$5", ["5"], 1.0, 1.0),
        ("the 3 yards", ["3"], 0.0, 0.67),  # {3.0, yards} against {3.0}: F1 2/3
        ("4 yards", ["3 yards"], 0.0, 0.0),  # a gold number must appear in the prediction
        ("Tampa-Bay", ["Tampa Bay"], 1.0, 1.0),  # hyphens split tokens
        # Multi-span answers: spans aligned one to one, averaged over the longer side.
        (["Jason Hanson", "Connor Barth"], [("Connor Barth", "Jason Hanson")], 1.0, 1.0),
        (["Jason Hanson"], [("Connor Barth", "Jason Hanson")], 0.0, 0.5),
        (["Jason Hanson", "Barth", "Calvin"], [("Connor Barth", "Jason Hanson")], 0.0, 0.56),
        ("Jason Hanson", [("Lions",), ("Jason Hanson",)], 1.0, 1.0),  # the best gold
        ("Jason Hanson", [("",), ("Calvin",)], 0.0, 0.0),  # a blank gold is skipped
        ([], [("Calvin",)], 0.0, 0.0),  # no predicted span at all
    ],
)
def test_drop_em_and_f1(prediction, golds, em, f1):
    assert drop_scores(prediction, golds) == (em, f1)


def test_drop_rounds_as_numpy_does():
    # Gold spans {2.0, 7.0} and {tampa, bay, 2.0} align with F1 0.5 and 0.4 over four gold
    # spans: 0.225, which numpy rounds to 0.22 (Python's round gives 0.23).
    prediction = ["Lions 2", "quarter 2"]
    gold = ("7 8.5 3rd", "touchdown", "2 7", "Tampa-Bay 2")
    assert drop_scores(prediction, [gold]) == (0.0, 0.22)


def brute_force_best_total(scores):
    rows, columns = len(scores), len(scores[0])
    if rows <= columns:
        pairings = (zip(range(rows), perm) for perm in itertools.permutations(range(columns), rows))
    else:
        pairings = (
            zip(perm, range(columns)) for perm in itertools.permutations(range(rows), columns)
        )
    return max(sum(scores[i][j] for i, j in pairing) for pairing in pairings)


@pytest.mark.parametrize("shape", [(1, 1), (1, 4), (4, 1), (3, 3), (2, 5), (5, 2), (4, 6), (6, 6)])
def test_the_assignment_is_optimal_and_one_to_one(shape):
    rng = random.Random(sum(shape))
    for _ in range(20):
        # Coarse values make ties, where a wrong algorithm most easily goes astray.
        values = [0.0, 0.25, 0.5, 0.8, 1.0]
        scores = [[rng.choice(values) for _ in range(shape[1])] for _ in range(shape[0])]
        pairs = _best_matching(scores)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs) == min(shape)
        total = sum(scores[i][j] for i, j in pairs)
        assert total == pytest.approx(brute_force_best_total(scores))


# --- pass@k --------------------------------------------------------------------------------------


def pass_at_k_by_binomials(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # float64, fine at these sizes


@pytest.mark.parametrize("k, expected", [(1, 0.3), (5, 1 - 21 / 252)])
def test_pass_at_k_for_ten_samples_three_correct(k, expected):
    # C(7,5) / C(10,5) = 21 / 252: every 5-subset without a correct sample.
    assert pass_at_k(10, 3, k) == pytest.approx(expected, rel=1e-12)
    assert pass_at_k(10, 3, k) == pytest.approx(pass_at_k_by_binomials(10, 3, k), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(10, 0, 1), (10, 10, 5), (10, 7, 5), (20, 1, 10), (5, 2, 5)])
def test_pass_at_k_matches_the_binomial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_binomials(n, c, k), abs=1e-12)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples: some k-subset always passes
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    n, c, k = 2000, 10, 1000  # C(2000, 1000) has about 600 digits
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 6), (5, 2, 0)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_over_problems_in_percent():
    counts = [(10, 3), (10, 0), (10, 10)]
    assert mean_pass_at_k(counts, 1) == pytest.approx(100 * (0.3 + 0 + 1) / 3)
    assert mean_pass_at_k(counts, 5) == pytest.approx(100 * (1 - 21 / 252 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k([(10, 3), (4, 1)], 5)  # a problem with fewer than k samples


def test_mean_percent():
    assert mean_percent([True, False, True, True]) == 75.0
    assert mean_percent([0.5, 1.0]) == 75.0
    with pytest.raises(ValueError):
        mean_percent([])
