"""Run tasks through a model and gather OLMES's scores, the JSON results and the table."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from olmoe import engine
from olmoe.errors import ConfigError, DataError
from olmoe.eval import scoring
from olmoe.eval.chat_tasks import MMLU_CHAT, load_mmlu_chat
from olmoe.eval.generative_tasks import GenerativeTask, is_generative_name
from olmoe.eval.runner import DEFAULT_MAX_LENGTH, score_requests
from olmoe.eval.tasks import Question, Task, TaskFormat, load_task

RESULTS_FORMAT = "olmoe-eval/1"


def describe_model(model, name: str | None = None, revision: str | None = None) -> dict:
    """What identifies the model in the results: where it came from and a hash of its config."""
    config = json.dumps(model.config.to_dict(), sort_keys=True)
    first = next(model.parameters())
    return {
        "name": name,
        "revision": revision,
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
    }


def limit_questions(fmt: TaskFormat, limit: int | None) -> list[Question]:
    """The first `limit` questions (of each group, for tasks whose questions have groups, such
    as MMLU's subjects), or all."""
    if limit is None:
        return list(fmt.questions)
    taken: dict[str | None, int] = {}
    kept = []
    for question in fmt.questions:
        if taken.get(question.group, 0) < limit:
            taken[question.group] = taken.get(question.group, 0) + 1
            kept.append(question)
    return kept


def score_format(
    questions: Sequence[Question], scores: Sequence[tuple[float, int]]
) -> list[list[scoring.ChoiceScore]]:
    """Pair the flat request scores (each question's choices, then its unconditional lines)
    back with their questions."""
    out, at = [], 0
    for q in questions:
        n = len(q.choices)
        cond = scores[at : at + n]
        at += n
        uncond = [None] * n
        if q.unconditional is not None:
            uncond = [s[0] for s in scores[at : at + n]]
            at += n
        out.append(
            [
                scoring.ChoiceScore(lp, tokens, r.continuation, u)
                for (lp, tokens), r, u in zip(cond, q.choices, uncond)
            ]
        )
    return out


def format_results(
    task: Task,
    fmt: TaskFormat,
    questions: Sequence[Question],
    choice_scores: Sequence[Sequence[scoring.ChoiceScore]],
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Every available metric of one format; per group (MMLU subject) too where questions have
    groups, and the macro average of the groups as the format's score when the task asks for
    it (else the mean over questions)."""
    metrics = scoring.available_metrics([s for scores in choice_scores for s in scores])
    if fmt.primary_metric not in metrics:
        raise DataError(
            f"{task.name} ({fmt.name}) reports {fmt.primary_metric}, which its requests cannot "
            "give (no unconditional lines)"
        )
    predictions = {m: [scoring.predict(m, s) for s in choice_scores] for m in metrics}
    labels = [q.label for q in questions]
    result: dict[str, Any] = {"primary_metric": fmt.primary_metric, "n": len(questions)}
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        if q.group is not None:
            groups.setdefault(q.group, []).append(i)
    per_group = {
        g: {
            **{
                m: scoring.accuracy([predictions[m][i] for i in idx], [labels[i] for i in idx])
                for m in metrics
            },
            "n": len(idx),
        }
        for g, idx in groups.items()
    }
    if task.macro_average:
        result["metrics"] = {
            m: scoring.macro_average({g: v[m] for g, v in per_group.items()}) for m in metrics
        }
    else:
        result["metrics"] = {m: scoring.accuracy(predictions[m], labels) for m in metrics}
    if per_group:
        result["groups"] = per_group
    result["primary_score"] = result["metrics"][fmt.primary_metric]
    if keep_predictions:
        result["predictions"] = [
            {
                "doc_id": q.doc_id,
                "label": q.label,
                "predicted": {m: predictions[m][i] for m in metrics},
                "logprobs": [s.logprob for s in choice_scores[i]],
            }
            for i, q in enumerate(questions)
        ]
    return result


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str | Task],
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    strategy: str = "packed",
    progress: bool = True,
    keep_predictions: bool = False,
    model_info: dict | None = None,
    generation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score `tasks` (names, task files or `Task`s) in both OLMES formats and return the results
    (docs/evaluation.md shows their shape). Accuracies are percentages; each task's
    `primary_score` is the better format's primary metric, as OLMES reports it. The model runs
    on the CPU engine where it applies (olmoe.engine).

    Generative tasks (names in GENERATIVE_TASKS, "ifeval:FILE", or `GenerativeTask`s) are
    generated and scored by `olmoe.eval.generative.evaluate_generative`, which `generation`
    passes keyword arguments to (chat, overrides, seed, generations_file)."""
    from tqdm.auto import tqdm

    engine.apply(model)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    # A model trained on shorter sequences sees no more than its own window.
    max_length = min(max_length, getattr(model.config, "max_position_embeddings", max_length))
    started = time.perf_counter()
    generative, loaded, names = [], [], []  # names in the order asked for
    for task in tasks:
        if _is_generative(task):
            generative.append(task)
            names.append(getattr(task, "name", task))
        else:
            loaded.append(_load(task, tokenizer))
            names.append(loaded[-1].name)
    if len(set(names)) != len(names):
        raise ConfigError(f"a task is listed twice: {names}")
    plan = []
    for task in loaded:
        for fmt in task.formats:
            questions = limit_questions(fmt, limit)
            requests = [r for q in questions for r in (*q.choices, *(q.unconditional or ()))]
            plan.append((task, fmt, questions, requests))
    bar = tqdm(
        total=sum(len(p[3]) for p in plan),
        unit="req",
        desc="olmoe eval",
        disable=not (progress and plan),
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        for task, fmt, questions, requests in plan:
            bar.set_postfix_str(f"{task.name} {fmt.name}")
            scores = score_requests(
                model, tokenizer, requests, batch_size, max_length, strategy, bar.update
            )
            entry = results.setdefault(task.name, {"formats": {}, "provenance": task.provenance})
            entry["formats"][fmt.name] = format_results(
                task, fmt, questions, score_format(questions, scores), keep_predictions
            )
    finally:
        bar.close()
    for name, entry in results.items():
        primary = {f: r["primary_score"] for f, r in entry["formats"].items()}
        best = scoring.best_format(primary)
        entry.update(
            primary_format=best,
            primary_metric=entry["formats"][best]["primary_metric"],
            primary_score=primary[best],
            n=entry["formats"][best]["n"],
        )
        results[name] = {
            k: entry[k]
            for k in (
                "primary_score",
                "primary_format",
                "primary_metric",
                "n",
                "formats",
                "provenance",
            )
        }
    if generative:
        from olmoe.eval.generative import evaluate_generative

        results.update(
            evaluate_generative(
                model,
                tokenizer,
                generative,
                limit=limit,
                batch_size=batch_size,
                progress=progress,
                keep_predictions=keep_predictions,
                model_info=model_info if model_info is not None else describe_model(model),
                **(generation or {}),
            )
        )
    results = {name: results[name] for name in names}  # in the order asked for
    return {
        "format": RESULTS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model_info if model_info is not None else describe_model(model),
        "settings": {
            "limit": limit,
            "batch_size": batch_size,
            "max_length": max_length,
            "strategy": strategy,
            "standard": "OLMES v0.1 (5-shot, MC and RC formats, the better one reported)",
        },
        "tasks": results,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _load(task: str | Task, tokenizer) -> Task:
    if isinstance(task, Task):
        return task
    if task == MMLU_CHAT:  # its prompts are rendered with the model's chat template
        return load_mmlu_chat(tokenizer)
    return load_task(task)


def _is_generative(task: str | Task | GenerativeTask) -> bool:
    if isinstance(task, GenerativeTask):
        return True
    return isinstance(task, str) and is_generative_name(task)


def results_table(results: dict[str, Any]) -> str:
    """One line per task: its OLMES primary score, the format and metric it came from, and the
    number of questions; the other format's score in the last column."""
    header = ("task", "format", "metric", "score", "n", "other format")
    lines = [header]
    for name, task in results["tasks"].items():
        if "skipped" in task:
            lines.append((name, "-", "-", "-", "0", task["skipped"]))
            continue
        others = [
            f"{f} {r['primary_metric']} {r['primary_score']:.1f}"
            for f, r in task["formats"].items()
            if f != task["primary_format"]
        ]
        lines.append(
            (
                name,
                task["primary_format"],
                task["primary_metric"],
                f"{task['primary_score']:.1f}",
                str(task["n"]),
                ", ".join(others),
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    right = {3, 4}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in lines
    )
