"""Instruction following, IFEval: `--tasks ifeval:FILE`, with the prompts from the user's file.

No package on the index ships IFEval's prompts (lm-eval downloads google/IFEval at run time;
`ifeval`-like packages are absent), so the prompts come from a file in IFEval's own format,
`input_data.jsonl`: one JSON object per line with

    key                  an id
    prompt               the text the model answers
    instruction_id_list  the verifiable instructions, e.g. ["punctuation:no_comma"]
    kwargs               one mapping of arguments per instruction (None values are dropped)

The checkers are Google's IFEval code as lm-evaluation-harness 0.4.13 ships it
(`lm_eval.tasks.ifeval`, Apache-2.0, the optional extra `olmoe[lmeval]`): its `process_results`
scores each response, so the four accuracies are lm-eval's own. Strict: the response as written;
loose: the response also counts if it follows the instruction once its first or last line, or
its asterisks, are removed. Prompt-level: every instruction of the prompt followed; instruction-
level: the share of all instructions followed. The primary metric is prompt-level loose
accuracy, the number AI2 reports (IFBench's README; Tulu). Generation follows lm-eval's
ifeval.yaml: greedy, no stop sequence but the end of text, up to 1,280 new tokens.

Checker modules are imported on first use: lm-eval's ifeval module asks NLTK for its punkt_tab
data at import (offline it prints an error and goes on; only `length_constraints:
number_sentences` needs that data, and a file that uses it is refused before anything is
generated when the data is missing).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from olmoe.errors import DataError, UsageError
from olmoe.eval.generative_tasks import (
    IFEVAL,
    Family,
    GenerationSettings,
    GenerativeTask,
    Item,
)

METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
INSTRUCTION_LEVEL = ("inst_level_strict_acc", "inst_level_loose_acc")
# The one checker that needs data beyond the package: NLTK's sentence tokenizer.
SENTENCES = "length_constraints:number_sentences"
PUNKT = "punkt_tab"
SETTINGS = GenerationSettings(max_new_tokens=1280, stop=())  # lm-eval's ifeval.yaml
REFERENCE = (
    "IFEval (Zhou et al. 2023) as lm-evaluation-harness 0.4.13 scores it: "
    "lm_eval/tasks/ifeval/utils.py process_results"
)
_MISSING_EXTRA = (
    "--tasks ifeval scores with IFEval's checkers as lm-evaluation-harness ships them: "
    "pip install 'olmoe[lmeval]'"
)


def _checkers():
    """lm-eval's IFEval scorer and its instruction registry."""
    try:
        from lm_eval.tasks.ifeval import instructions_registry, utils
    except ImportError as exc:
        raise UsageError(f"{_MISSING_EXTRA} ({exc})") from None
    return utils.process_results, instructions_registry.INSTRUCTION_DICT


def score(response: str, doc: Mapping[str, Any]) -> dict[str, float]:
    """The four accuracies of one response, each in [0, 1] (instruction-level ones as the share
    of the prompt's instructions followed; `units` weighs them)."""
    process_results, _ = _checkers()
    out = process_results(dict(doc), [response])
    return {
        m: (sum(out[m]) / len(out[m]) if m in INSTRUCTION_LEVEL else float(out[m]))
        for m in METRICS
    }


FAMILY = Family(
    metrics=METRICS,
    primary_metric="prompt_level_loose_acc",
    score=score,
    per_unit=INSTRUCTION_LEVEL,
    units=lambda doc: len(doc["instruction_id_list"]),
    reference=REFERENCE,
)


def load_ifeval(name: str) -> GenerativeTask:
    """The task "ifeval:FILE": FILE's prompts, checked against lm-eval's instruction registry
    before anything is generated."""
    if name == IFEVAL:
        raise UsageError(
            "--tasks ifeval: IFEval's prompts ship with no package olmoe can use; pass your copy "
            "in IFEval's format as --tasks ifeval:PATH/input_data.jsonl"
        )
    path = Path(name.split(":", 1)[1]).expanduser()
    if not path.is_file():
        raise UsageError(f"--tasks {name}: no IFEval data file at {path}")
    _, known = _checkers()
    docs = read_ifeval(path, known)
    if any(SENTENCES in doc["instruction_id_list"] for doc in docs):
        _check_sentence_data()
    items = [Item(i, doc["prompt"], doc) for i, doc in enumerate(docs)]
    provenance = {
        "files": [str(path)],
        "format": "IFEval input_data.jsonl (key, prompt, instruction_id_list, kwargs)",
        "metric_reference": REFERENCE,
        "checkers": "lm_eval.tasks.ifeval (Apache-2.0)",
    }
    return GenerativeTask(
        name=name,
        family=FAMILY,
        items=tuple(items),
        settings=SETTINGS,
        answer_prefix="",
        macro_average=False,
        provenance=provenance,
    )


def _check_sentence_data() -> None:
    """Fail before generating, not when scoring, if NLTK's sentence data is missing."""
    import nltk

    try:
        nltk.data.find(f"tokenizers/{PUNKT}")
    except LookupError:
        raise DataError(
            f"IFEval's {SENTENCES} checker needs NLTK's {PUNKT} data, which is not installed "
            f"(lm-eval's download of it failed): python -m nltk.downloader {PUNKT}"
        ) from None


def read_ifeval(path: Path, known: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The records of an IFEval file, each checked: the four fields, one kwargs mapping per
    instruction, and only instructions the checkers know."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{where} is not JSON ({exc})") from None
            records.append(_checked(record, where, known))
    if not records:
        raise DataError(f"{path} holds no IFEval prompts")
    return records


def _checked(record: Any, where: str, known: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with key, prompt, ...")  # noqa: TRY004
    missing = [f for f in ("key", "prompt", "instruction_id_list", "kwargs") if f not in record]
    if missing:
        raise DataError(f"{where}: the record has no field(s) {missing}")
    ids, kwargs = record["instruction_id_list"], record["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(f"{where}: instruction_id_list must be a non-empty list of ids")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"{where}: kwargs must hold one mapping per instruction ({len(ids)})")
    if not all(isinstance(k, dict) for k in kwargs):
        raise DataError(f"{where}: each kwargs entry must be a mapping")
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise DataError(
            f"{where}: IFEval's checkers know no instruction {unknown} (IFBench's and other "
            "benchmarks' own instructions need their own checkers)"
        )
    for instruction_id, arguments in zip(ids, kwargs):
        # As lm-eval's scorer builds each checker: None arguments dropped. Wrong ones fail here,
        # before anything is generated, rather than after.
        try:
            known[instruction_id](instruction_id).build_description(
                **{k: v for k, v in arguments.items() if v}
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: {instruction_id} cannot take {arguments} ({exc})") from None
    return record
