"""MMLU in the chat format (open-instruct's 0-shot chat MMLU): the prompt, the micro average over
questions with per-subject groups and per-subject --limit, and the command line."""

import json

import pytest

from olmoe import cli
from olmoe.eval import evaluate
from olmoe.eval.chat_tasks import load_mmlu_chat
from tests.eval.helpers import small_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mmlu_chat_prompt_is_open_instructs(tokenizer):
    task = load_mmlu_chat(tokenizer)
    (fmt,) = task.formats
    assert len(fmt.questions) == 14042 and not task.macro_average
    first = fmt.questions[0]
    assert first.choices[0].context == (
        "<|endoftext|><|user|>\n"
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:\n<|assistant|>\nThe answer is:"
    )
    assert [c.continuation for c in first.choices] == [" A", " B", " C", " D"]
    assert first.label == 1 and first.group == "abstract_algebra"


def test_mmlu_chat_averages_over_questions_and_limits_per_subject(tokenizer):
    model = small_model()
    results = evaluate(model, tokenizer, ["mmlu_chat"], limit=2, progress=False)
    entry = results["tasks"]["mmlu_chat"]
    scores = entry["formats"]["mc"]
    assert entry["n"] == 2 * 57 and len(scores["groups"]) == 57
    right = sum(g["acc_raw"] * g["n"] / 100 for g in scores["groups"].values())
    assert scores["metrics"]["acc_raw"] == pytest.approx(100 * right / entry["n"])


def test_cli_runs_mmlu_chat_beside_a_generative_task(tmp_path):
    directory = tmp_path / "tiny"
    small_model().save_pretrained(directory)
    out = tmp_path / "results.json"
    code = cli.main([
        "eval", str(directory), "--tasks", "naturalqs,mmlu_chat", "--limit", "1", "--dtype",
        "fp32", "--max-new-tokens", "2", "--no-progress", "--output", str(out),
    ])  # fmt: skip
    assert code == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert list(tasks) == ["naturalqs", "mmlu_chat"]  # in the order asked for
    entry = tasks["mmlu_chat"]
    assert entry["n"] == 57 and entry["provenance"]["num_shots"] == 0
