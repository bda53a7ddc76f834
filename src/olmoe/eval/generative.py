"""Generative tasks end to end: prompts, batched generation, resuming, scoring, results.

`evaluate_generative` returns one results entry per task, shaped like the multiple-choice
tasks' (`primary_score`, `primary_metric`, `n`, `formats`, `provenance`), with the single format
"generate" and the generation settings used; a code task while code execution is off gets
`skipped` instead (with `sandbox.EXECUTION_OFF_NOTE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from olmoe.errors import UsageError
from olmoe.eval import generative_metrics as gm
from olmoe.eval import sandbox, scoring
from olmoe.eval.batch_generation import Done, Job, job_seed, run_jobs
from olmoe.eval.generative_tasks import (
    GenerationSettings,
    GenerativeTask,
    Item,
    chat_prompt,
    limit_items,
    load_generative_task,
    pass_at_ks,
)
from olmoe.eval.prediction_log import PredictionLog, fingerprint

FORMAT = "generate"
LOG_VERSION = 1  # part of every line's fingerprint: bump when the lines' meaning changes
# What of the model's description decides its generations (not where it ran).
_MODEL_KEYS = ("name", "revision", "config_sha256", "dtype", "quantize")


@dataclasses.dataclass(frozen=True)
class Overrides:
    """The user's generation settings; None keeps each task's reference value."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    samples: int | None = None
    stop: tuple[str, ...] | None = None

    def apply(self, settings: GenerationSettings, window: int) -> GenerationSettings:
        """The settings a task runs with on a model of `window` tokens."""
        changed = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        settings = dataclasses.replace(settings, **changed)
        if self.max_new_tokens is None and settings.max_new_tokens >= window:
            # A short-window model (the quickstart's 256 tokens) cannot hold MATH's 1,024-token
            # budget: half the window answers, half holds the (left-cut) prompt.
            settings = dataclasses.replace(settings, max_new_tokens=window // 2)
        if settings.samples > 1 and settings.temperature == 0:
            raise UsageError(
                f"--samples {settings.samples} needs --temperature above 0: greedy decoding "
                "writes the same answer every time"
            )
        return settings


@dataclasses.dataclass
class _Plan:
    task: GenerativeTask
    items: list[Item]
    settings: GenerationSettings
    fingerprint: str
    prompts: dict[int, list[int]]  # doc_id -> prompt tokens
    prompt_hashes: dict[int, str]


def evaluate_generative(
    model,
    tokenizer,
    tasks: Sequence[str | GenerativeTask],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    chat: bool = False,
    overrides: Overrides | None = None,
    seed: int = 0,
    generations_file: str | None = None,
    progress: bool = True,
    keep_predictions: bool = False,
    model_info: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Generate and score `tasks` (names from GENERATIVE_TASKS, or loaded tasks). With
    `generations_file`, problems already answered there (same model, same settings) are not
    generated again and new answers are appended as they finish."""
    from tqdm.auto import tqdm

    overrides = overrides or Overrides()
    loaded = [t if isinstance(t, GenerativeTask) else load_generative_task(t) for t in tasks]
    model_key = {k: (model_info or {}).get(k) for k in _MODEL_KEYS}
    window = model.config.max_position_embeddings
    skipped = {t.name for t in loaded if t.family.is_code and not sandbox.execution_enabled()}
    options = {"limit": limit, "chat": chat, "seed": seed, "model_key": model_key}
    plans = [
        _plan(task, tokenizer, overrides.apply(task.settings, window), window, **options)
        for task in loaded
        if task.name not in skipped
    ]
    log = PredictionLog(generations_file) if generations_file else None
    answers: dict[tuple[str, int], list[str]] = {}
    try:
        jobs = []
        for plan in plans:
            name = plan.task.name
            if log is not None:
                log.check(name, plan.fingerprint)
            for item in plan.items:
                record = log.get(name, item.doc_id) if log is not None else None
                # A prompt that changed (other task data) is answered again.
                if record and record.get("prompt_sha256") == plan.prompt_hashes[item.doc_id]:
                    answers[(name, item.doc_id)] = record["generations"]
                    continue
                jobs.append(_job(plan, item, seed))
        with tqdm(
            total=len(jobs), unit="problem", desc="olmoe eval generate", disable=not progress
        ) as bar:

            def finished(done: Done) -> None:
                plan, item = done.job.key
                record = {
                    "task": plan.task.name,
                    "doc_id": item.doc_id,
                    "fingerprint": plan.fingerprint,
                    "prompt_sha256": plan.prompt_hashes[item.doc_id],
                    "generations": done.texts,
                    "finish_reasons": done.finish_reasons,
                }
                if log is not None:
                    log.append(record)
                answers[(plan.task.name, item.doc_id)] = done.texts
                bar.set_postfix_str(plan.task.name)
                bar.update(1)

            run_jobs(model, tokenizer, jobs, batch_size, finished)
    finally:
        if log is not None:
            log.close()
    results = {}
    for task in loaded:
        if task.name in skipped:
            note = sandbox.EXECUTION_OFF_NOTE
            results[task.name] = {"skipped": note, "provenance": task.provenance}
    for plan in plans:
        generations = [answers[(plan.task.name, item.doc_id)] for item in plan.items]
        results[plan.task.name] = task_results(
            plan.task, plan.items, generations, plan.settings, chat, keep_predictions
        )
    return {t.name: results[t.name] for t in loaded}


def _plan(task, tokenizer, settings, window, *, limit, chat, seed, model_key) -> _Plan:
    if settings.max_new_tokens >= window:  # only an explicit --max-new-tokens gets here
        raise UsageError(
            f"{task.name}: --max-new-tokens {settings.max_new_tokens} leaves no room for the "
            f"prompt in the model's {window}-token window"
        )
    items = limit_items(task, limit)
    texts = {
        i.doc_id: chat_prompt(tokenizer, i.prompt, task.answer_prefix) if chat else i.prompt
        for i in items
    }
    backend = tokenizer.backend_tokenizer
    encoded = backend.encode_batch(list(texts.values()), add_special_tokens=False)
    # As lm-eval's generate_until: the prompt loses tokens from its start so that it and the
    # answer fit the window.
    room = window - settings.max_new_tokens
    prompts = {doc_id: e.ids[-room:] for doc_id, e in zip(texts, encoded)}
    hashes = {d: hashlib.sha256(t.encode()).hexdigest()[:16] for d, t in texts.items()}
    print_ = fingerprint(
        {
            "version": LOG_VERSION,
            "model": model_key,
            "settings": dataclasses.asdict(settings),
            "chat": chat,
            "seed": seed,
        }
    )
    return _Plan(task, items, settings, print_, prompts, hashes)


def _job(plan: _Plan, item: Item, seed: int) -> Job:
    settings = plan.settings
    return Job(
        key=(plan, item),
        prompt=plan.prompts[item.doc_id],
        max_new_tokens=settings.max_new_tokens,
        stop=settings.stop,
        temperature=settings.temperature,
        samples=settings.samples,
        seed=job_seed(seed, item.doc_id),
    )


def item_scores(
    task: GenerativeTask, items: Sequence[Item], generations: Sequence[Sequence[str]]
) -> list[dict[str, Any]]:
    """Per problem, every metric in [0, 1]: the mean over samples, or pass@k for code (with
    the sandbox's verdict on each sample)."""
    family = task.family
    if not family.is_code:
        out = []
        for item, samples in zip(items, generations):
            scores = [family.score(text, item.doc) for text in samples]
            out.append({m: sum(s[m] for s in scores) / len(scores) for m in family.metrics})
        return out
    programs = [
        family.program(text, item.doc)
        for item, samples in zip(items, generations)
        for text in samples
    ]
    verdicts = iter(sandbox.run_programs(programs))
    out = []
    for samples in generations:
        statuses = [next(verdicts).status for _ in samples]
        passed = statuses.count("passed")
        n = len(samples)
        scores = {f"pass@{k}": gm.pass_at_k(n, passed, k) for k in pass_at_ks(n)}
        out.append({**scores, "statuses": statuses})
    return out


def _mean_percent(task, items, scores, metric: str, indices: Sequence[int]) -> float:
    """The metric's mean over the items at `indices`, as a percentage: weighted by the units
    each item holds for the family's per-unit metrics (IFEval's instruction-level accuracy is
    the share of all instructions followed)."""
    family = task.family
    if metric not in family.per_unit:
        return gm.mean_percent([scores[i][metric] for i in indices])
    weights = [family.units(items[i].doc) for i in indices]
    return 100.0 * sum(scores[i][metric] * w for i, w in zip(indices, weights)) / sum(weights)


def task_results(
    task: GenerativeTask,
    items: Sequence[Item],
    generations: Sequence[Sequence[str]],
    settings: GenerationSettings,
    chat: bool,
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """One task's results entry from its problems' generations."""
    scores = item_scores(task, items, generations)
    metrics = [m for m in scores[0] if m != "statuses"]
    result: dict[str, Any] = {"primary_metric": task.family.primary_metric, "n": len(items)}
    if task.macro_average:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group, []).append(i)
        per_group = {
            g: {**{m: _mean_percent(task, items, scores, m, idx) for m in metrics}, "n": len(idx)}
            for g, idx in groups.items()
        }
        result["metrics"] = {
            m: scoring.macro_average({g: v[m] for g, v in per_group.items()}) for m in metrics
        }
        result["groups"] = per_group
    else:
        everything = range(len(items))
        result["metrics"] = {m: _mean_percent(task, items, scores, m, everything) for m in metrics}
    result["primary_score"] = result["metrics"][task.family.primary_metric]
    if keep_predictions:
        result["predictions"] = [
            {"doc_id": item.doc_id, "generations": list(texts), "scores": score}
            for item, texts, score in zip(items, generations, scores)
        ]
    generation = {**dataclasses.asdict(settings), "chat": chat}
    if settings != task.settings:  # overridden, or the budget cut to fit the window
        generation["reference"] = dataclasses.asdict(task.settings)
    return {
        "primary_score": result["primary_score"],
        "primary_format": FORMAT,
        "primary_metric": result["primary_metric"],
        "n": len(items),
        "formats": {FORMAT: result},
        "generation": generation,
        "provenance": task.provenance,
    }
