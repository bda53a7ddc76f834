"""Instruction following (`--tasks ifeval:FILE`): hand-written prompts in IFEval's format with
responses we control — ones that follow every instruction score 100%, ones that break them 0%,
a mixed set scores the hand-worked strict/loose, prompt/instruction-level accuracies — the
file's mistakes, the missing extra, and `olmoe eval` end to end on a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from olmoe import cli
from olmoe.errors import DataError, UsageError
from olmoe.eval.generative import task_results
from olmoe.eval.generative_tasks import load_generative_task
from tests.eval.helpers import small_model

ROWS = [
    {
        "key": 1,
        "prompt": "Describe a cat without commas.",
        "instruction_id_list": ["punctuation:no_comma"],
        "kwargs": [{}],
    },
    {
        "key": 2,
        "prompt": "Name a fruit, mention apple, and give it a title in double angular brackets.",
        "instruction_id_list": ["keywords:existence", "detectable_format:title"],
        "kwargs": [{"keywords": ["apple"]}, {}],
    },
    {
        "key": 3,
        "prompt": "List two things as bullets, in at least 5 words, ending with a question.",
        "instruction_id_list": [
            "detectable_format:number_bullet_lists",
            "length_constraints:number_words",
            "startend:end_checker",
        ],
        # IFEval's file fills every argument an instruction does not take with None.
        "kwargs": [
            {"num_bullets": 2, "keywords": None},
            {"relation": "at least", "num_words": 5},
            {"end_phrase": "Any other questions?"},
        ],
    },
]
FOLLOWED = [
    "A cat is soft and small and it purrs.",
    "<<Fruit>>\nI like an apple.",
    "* red apples are tasty\n* green pears are crisp\nAny other questions?",
]
BROKEN = ["A cat, soft, small.", "Bananas.", "Nothing."]
METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="IFEval's checkers come with lm-eval, an optional extra: pip install 'olmoe[lmeval]'",
)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def data(tmp_path):
    return _write(tmp_path / "input_data.jsonl", ROWS)


def _metrics(data, responses):
    task = load_generative_task(f"ifeval:{data}")
    entry = task_results(task, task.items, [[r] for r in responses], task.settings, chat=False)
    return entry, entry["formats"]["generate"]["metrics"]


@needs_lm_eval
def test_followed_instructions_score_100_and_broken_ones_0(data):
    entry, followed = _metrics(data, FOLLOWED)
    assert followed == {m: 100.0 for m in METRICS}
    assert entry["primary_metric"] == "prompt_level_loose_acc" and entry["n"] == 3
    _, broken = _metrics(data, BROKEN)
    assert broken == {m: 0.0 for m in METRICS}


@needs_lm_eval
def test_hand_worked_strict_and_loose_accuracies(data):
    responses = [
        "Sure, here it is:\nA cat is soft.",  # a comma in the first line only: loose passes
        FOLLOWED[1],  # both instructions
        "* red apples are tasty\n* green pears are crisp",  # 2 of 3: no end phrase
    ]
    _, metrics = _metrics(data, responses)
    # Prompt level: strict [0, 1, 0], loose [1, 1, 0]. Instruction level, over all 6
    # instructions: strict 0 + 2 + 2, loose 1 + 2 + 2.
    assert metrics == pytest.approx(
        {
            "prompt_level_strict_acc": 100 / 3,
            "prompt_level_loose_acc": 200 / 3,
            "inst_level_strict_acc": 400 / 6,
            "inst_level_loose_acc": 500 / 6,
        }
    )


@needs_lm_eval
@pytest.mark.parametrize(
    "change, message",
    [
        ({"instruction_id_list": ["ifbench:made_up"]}, "know no instruction"),
        ({"kwargs": []}, "one mapping per instruction"),
        ({"kwargs": [{"no_such_argument": 3}]}, "cannot take"),
        ({"instruction_id_list": "punctuation:no_comma"}, "non-empty list"),
    ],
)
def test_file_mistakes_are_data_errors(tmp_path, change, message):
    path = _write(tmp_path / "bad.jsonl", [ROWS[0] | change])
    with pytest.raises(DataError, match=message):
        load_generative_task(f"ifeval:{path}")


@needs_lm_eval
def test_missing_sentence_data_is_refused_before_generating(tmp_path, monkeypatch):
    import nltk

    def find(resource, *args, **kwargs):
        raise LookupError(resource)

    monkeypatch.setattr(nltk.data, "find", find)  # as offline, where the download failed
    row = ROWS[0] | {
        "instruction_id_list": ["length_constraints:number_sentences"],
        "kwargs": [{"relation": "less than", "num_sentences": 3}],
    }
    path = _write(tmp_path / "sentences.jsonl", [row])
    with pytest.raises(DataError, match="nltk.downloader punkt_tab"):
        load_generative_task(f"ifeval:{path}")
    load_generative_task(f"ifeval:{_write(tmp_path / 'other.jsonl', ROWS)}")  # not needed


def test_bare_ifeval_asks_for_the_file_and_a_missing_file_is_named(tmp_path, capsys):
    assert cli.main(["eval", "model", "--tasks", "ifeval"]) == 1
    assert "ifeval:PATH/input_data.jsonl" in capsys.readouterr().err
    assert cli.main(["eval", "model", "--tasks", f"ifeval:{tmp_path}/none.jsonl"]) == 1
    assert "no IFEval data file at" in capsys.readouterr().err


def test_without_lm_eval_the_error_names_the_extra(data, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.tasks.ifeval", None)  # as if not installed
    with pytest.raises(UsageError, match=r"pip install 'olmoe\[lmeval\]'"):
        load_generative_task(f"ifeval:{data}")
    # The command line says so before it looks for the model.
    assert cli.main(["eval", "no-such-model", "--tasks", f"ifeval:{data}"]) == 1
    assert "pip install 'olmoe[lmeval]'" in capsys.readouterr().err


@needs_lm_eval
@pytest.mark.usefixtures("one_torch_thread")
def test_olmoe_eval_runs_ifeval_end_to_end(data, tmp_path_factory, tmp_path, capsys):
    checkpoint = tmp_path_factory.mktemp("tiny-vocab")
    small_model(max_position_embeddings=256).save_pretrained(checkpoint)
    out = tmp_path / "results.json"
    code = cli.main([
        "eval", str(checkpoint), "--tasks", f"ifeval:{data}", "--max-new-tokens", "4",
        "--dtype", "fp32", "--output", str(out), "--predictions", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    [(name, entry)] = json.loads(out.read_text())["tasks"].items()
    assert name == f"ifeval:{data}" and entry["n"] == 3
    assert set(entry["formats"]["generate"]["metrics"]) == set(METRICS)
    assert entry["generation"]["max_new_tokens"] == 4
    assert entry["generation"]["reference"]["max_new_tokens"] == 1280
    assert name in capsys.readouterr().out
