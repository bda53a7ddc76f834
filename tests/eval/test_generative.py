"""Generative tasks: oracles per task (gold answers score 100, wrong ones 0), the prompts as
OLMES writes them, chat prompts, the engine-driven generation, the generations file, and
`olmoe eval --tasks <generative>` end to end on a tiny random model, resumed after Ctrl-C."""

import json

import pytest
import torch

from olmoe import cli
from olmoe.errors import DataError, UsageError
from olmoe.eval import generative
from olmoe.eval.batch_generation import Job, cut_at_stop, run_jobs
from olmoe.eval.generative import Overrides, evaluate_generative, item_scores
from olmoe.eval.generative_tasks import (
    GENERATIVE_TASKS,
    GenerationSettings,
    chat_prompt,
    limit_items,
    load_generative_task,
)
from olmoe.eval.prediction_log import PredictionLog
from olmoe.eval.sandbox import EXECUTION_OFF_NOTE
from olmoe.generation import generate
from olmoe.tokenizer import Tokenizer

CODE_TASKS = ["humaneval", "mbpp"]
TEXT_TASKS = [name for name, spec in GENERATIVE_TASKS.items() if spec.family not in CODE_TASKS]
# Wrong answers: no number (GSM8K), no final answer (MATH), a span no gold holds (QA), a
# program that fails its tests (code).
WRONG = {"humaneval": "    return None\n", "mbpp": "def unrelated():\n    return 0\n"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _oracle(name, items=None):
    task = load_generative_task(name)
    items = list(task.items) if items is None else items
    metric = task.family.primary_metric
    gold = item_scores(task, items, [[task.family.gold(i.doc)] for i in items])
    wrong = item_scores(task, items, [[WRONG.get(name, "zzqx")] for _ in items])
    return task, items, [s[metric] for s in gold], wrong


# ---------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("name", TEXT_TASKS)
def test_gold_answers_score_100_and_wrong_ones_0(name):
    task, items, gold, wrong = _oracle(name)
    if name == "drop":
        # One generated string is one span (as in lm-eval): items whose every gold answer has
        # several spans cannot be matched exactly, only in part.
        multi = [all(len(spans) > 1 for spans in i.doc["answers"]) for i in items]
        assert sum(multi) == 32
        assert all(g == 1 for g, m in zip(gold, multi) if not m)
        assert all(0 < g < 1 for g, m in zip(gold, multi) if m)
    else:
        assert gold == [1.0] * len(items), name
    assert all(value == 0 for scores in wrong for value in scores.values()), name


@pytest.mark.parametrize("name", CODE_TASKS)
def test_canonical_solutions_pass_and_wrong_programs_fail(name):
    task = load_generative_task(name)
    _, _, gold, wrong = _oracle(name, list(task.items[:12]))
    assert gold == [1.0] * 12
    assert [s["pass@1"] for s in wrong] == [0.0] * 12
    assert {s["statuses"][0] for s in wrong} == {"failed"}


@pytest.mark.slow
@pytest.mark.parametrize("name", CODE_TASKS)
def test_every_canonical_solution_passes(name):
    _, items, gold, _ = _oracle(name)
    assert gold == [1.0] * len(items)


def test_pass_at_k_over_samples():
    task = load_generative_task("humaneval")
    item = task.items[0]
    samples = [task.family.gold(item.doc)] + [WRONG["humaneval"]] * 9
    (scores,) = item_scores(task, [item], [samples])
    assert scores["pass@1"] == pytest.approx(0.1)
    assert scores["pass@10"] == 1.0 and "pass@100" not in scores
    assert scores["statuses"] == ["passed"] + ["failed"] * 9


def test_math_is_macro_averaged_over_subjects():
    task = load_generative_task("minerva_math")
    items = limit_items(task, 2)
    assert len(items) == 14 and len({i.group for i in items}) == 7
    # Right on the first algebra item only: algebra scores 50, the other subjects 0.
    generations = [[task.family.gold(items[0].doc)]] + [["zzqx"]] * 13
    result = generative.task_results(task, items, generations, task.settings, chat=False)
    assert result["formats"]["generate"]["groups"]["algebra"]["exact_match"] == 50.0
    assert result["primary_score"] == pytest.approx(50.0 / 7)


# ---------------------------------------------------------------------------- prompts
def test_naturalqs_prompt_is_olmes_five_shot():
    item = load_generative_task("naturalqs").items[0]
    assert item.prompt == (
        "Question: which side of the white house is the front\nAnswer: North\n\n"
        "Question: who's hosting the super bowl in 2019\nAnswer: Atlanta, Georgia\n\n"
        "Question: what is the origin of the name cynthia\nAnswer: Greek\n\n"
        'Question: who is the guy who voiced disney channel\nAnswer: "Buzz" Brainard, Cameron\n\n'
        "Question: what is the size of the angles of an equilateral triangle\nAnswer: 60°\n\n"
        "Question: who is playing halftime show super bowl 2018\nAnswer:"
    )


def test_gsm8k_prompt_is_the_eight_shot_chain_of_thought():
    task = load_generative_task("gsm8k")
    prompt = task.items[0].prompt
    assert prompt.startswith(
        "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove "
        "today. After they are done, there will be 21 trees. How many trees did the grove "
        "workers plant today?\nAnswer: There are 15 trees originally. Then there were 21 trees "
        "after some more were planted. So there must have been 21 - 15 = 6. So the answer is "
        "6.\n\n"
    )
    assert prompt.endswith(
        "\n\nQuestion: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every "
        "morning and bakes muffins for her friends every day with four. She sells the remainder "
        "at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she "
        "make every day at the farmers' market?\nAnswer:"
    )
    assert prompt.count("Question:") == 9  # 8 shots, then the question
    assert task.settings == GenerationSettings(512, ("Question:", "</s>", "<|im_end|>", "\n\n"))
    assert len(task.items) == 1319  # the whole test split


def test_triviaqa_is_zero_shot_on_the_olmes_sample():
    task = load_generative_task("triviaqa")
    assert len(task.items) == 1000
    assert task.items[0].prompt == (
        "Question: Cryos, the worlds largest sperm bank, recently announced that they will no "
        "longer accept donations from guys with what physical characteristic?\nAnswer:"
    )
    assert "Redhead" in task.items[0].doc["answers"]


def test_chat_prompt_puts_the_answer_prefix_in_the_assistant_turn(tokenizer):
    task = load_generative_task("humaneval")
    doc = task.items[0].doc
    assert chat_prompt(tokenizer, task.items[0].prompt, task.answer_prefix) == (
        f"<|endoftext|><|user|>\n{doc['prompt'].strip()}\n<|assistant|>\n"
        "Here is the completed function:\n\n```python\n"
    )
    assert chat_prompt(tokenizer, "Question: 1+1?\nAnswer:", "") == (
        "<|endoftext|><|user|>\nQuestion: 1+1?\nAnswer:\n<|assistant|>\n"
    )


@pytest.mark.parametrize("name", GENERATIVE_TASKS)
def test_every_prompt_ends_with_its_answer_prefix(name):
    task = load_generative_task(name)
    assert task.answer_prefix and all(i.prompt.endswith(task.answer_prefix) for i in task.items)


def test_chat_prompt_opens_the_assistant_turn_with_answer(tokenizer):
    task = load_generative_task("gsm8k")
    prompt = task.items[0].prompt
    assert chat_prompt(tokenizer, prompt, task.answer_prefix) == (
        f"<|endoftext|><|user|>\n{prompt.removesuffix('Answer:').strip()}\n<|assistant|>\nAnswer:"
    )
    with pytest.raises(DataError, match="does not end with its answer prefix"):
        chat_prompt(tokenizer, "Question: 1+1?", "Answer:")


def test_cut_at_stop_takes_the_first_stop_sequence():
    assert cut_at_stop(" 42\n\nQuestion: more", ("Question:", "\n\n")) == " 42"
    assert cut_at_stop("no stop here", ("\n\n",)) == "no stop here"


# ---------------------------------------------------------------------------- generation
def test_engine_generations_equal_greedy_generate(model, tokenizer):
    prompts = [tokenizer.backend_tokenizer.encode(t).ids for t in ("Hello there", "2 + 2 =")]
    done = []
    jobs = [Job(i, p, max_new_tokens=6, stop=()) for i, p in enumerate(prompts)]
    run_jobs(model, tokenizer, jobs, batch_size=2, on_done=done.append)
    assert sorted(d.job.key for d in done) == [0, 1]
    for d in done:
        prompt = torch.tensor([prompts[d.job.key]])
        expected = generate(model, prompt, max_new_tokens=6)[0, prompt.shape[1] :]
        assert d.texts == [tokenizer.decode(expected.tolist(), skip_special_tokens=True)]
        assert d.finish_reasons == ["length"]


def test_sampling_several_answers_is_seeded(model, tokenizer):
    def answers(seed):
        out = evaluate_generative(
            model, tokenizer, ["naturalqs"], limit=1, progress=False, keep_predictions=True,
            overrides=Overrides(max_new_tokens=4, temperature=1.0, samples=3), seed=seed,
        )  # fmt: skip
        return out["naturalqs"]["formats"]["generate"]["predictions"][0]["generations"]

    first = answers(0)
    assert len(first) == 3 and len(set(first)) > 1
    assert answers(0) == first and answers(1) != first


def test_greedy_decoding_refuses_several_samples():
    with pytest.raises(UsageError, match="--temperature above 0"):
        Overrides(samples=2).apply(GenerationSettings(8, ()), window=64)


def test_a_short_window_halves_the_reference_budget_but_not_the_users():
    reference = GenerationSettings(1024, ("\n\n",))
    assert Overrides().apply(reference, window=256).max_new_tokens == 128
    assert Overrides().apply(reference, window=2048).max_new_tokens == 1024
    assert Overrides(max_new_tokens=300).apply(reference, window=256).max_new_tokens == 300


# ---------------------------------------------------------------------------- generations file
def test_log_drops_a_cut_off_last_line_and_refuses_other_settings(tmp_path):
    path = tmp_path / "gen.jsonl"
    line = {"task": "gsm8k", "doc_id": 0, "fingerprint": "a", "generations": ["x"]}
    path.write_text(json.dumps(line) + '\n{"task": "gsm8k", "doc')
    with PredictionLog(path) as log:
        assert log.get("gsm8k", 0)["generations"] == ["x"] and log.get("gsm8k", 1) is None
        log.check("gsm8k", "a")
        with pytest.raises(UsageError, match="another model or other settings"):
            log.check("gsm8k", "b")
        log.append({**line, "doc_id": 1})
    assert [json.loads(t)["doc_id"] for t in path.read_text().splitlines()] == [0, 1]
    path.write_text("not json\n")
    with pytest.raises(UsageError, match="line 1 .* not an olmoe generation record"):
        PredictionLog(path)


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    directory = tmp_path_factory.mktemp("tiny-vocab")
    model.save_pretrained(directory)  # no tokenizer files: the OLMo tokenizer is used
    return directory


def _eval(checkpoint, tmp_path, *extra):
    return cli.main([
        "eval", str(checkpoint), "--tasks", "gsm8k,humaneval", "--limit", "2",
        "--max-new-tokens", "8", "--dtype", "fp32", "--no-progress", "--predictions",
        "--output", str(tmp_path / "results.json"), "--generations", str(tmp_path / "gen.jsonl"),
        *extra,
    ])  # fmt: skip


def test_cli_generates_scores_and_resumes_after_an_interruption(
    checkpoint, tmp_path, monkeypatch, capsys
):
    real_run_jobs = generative.run_jobs
    generated = []

    def interrupted_after_one(model, tokenizer, jobs, batch_size, on_done):
        def once(done):
            on_done(done)
            raise KeyboardInterrupt

        real_run_jobs(model, tokenizer, jobs, batch_size, once)

    monkeypatch.setattr(generative, "run_jobs", interrupted_after_one)
    assert _eval(checkpoint, tmp_path) == 130
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "results.json").exists()

    def counting(model, tokenizer, jobs, batch_size, on_done):
        generated.extend(job.key[1].doc_id for job in jobs)
        real_run_jobs(model, tokenizer, jobs, batch_size, on_done)

    monkeypatch.setattr(generative, "run_jobs", counting)
    assert _eval(checkpoint, tmp_path) == 0
    assert len(generated) == 3  # the fourth answer came from the file
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[1:]] == [
        ["gsm8k", "generate", "exact_match"], ["humaneval", "generate", "pass@1"]
    ]  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    records = [json.loads(t) for t in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for name in ("gsm8k", "humaneval"):
        entry = results["tasks"][name]
        assert entry["n"] == 2 and entry["generation"]["max_new_tokens"] == 8
        assert entry["generation"]["chat"] is False
        predictions = entry["formats"]["generate"]["predictions"]
        logged = {r["doc_id"]: r["generations"] for r in records if r["task"] == name}
        assert {p["doc_id"]: p["generations"] for p in predictions} == logged

    # A rerun that resumes from a complete file generates nothing and agrees with itself.
    generated.clear()
    assert _eval(checkpoint, tmp_path / "again") == 0
    fresh = json.loads((tmp_path / "again" / "results.json").read_text())
    for name in ("gsm8k", "humaneval"):
        assert (
            fresh["tasks"][name]["formats"]["generate"]["predictions"]
            == results["tasks"][name]["formats"]["generate"]["predictions"]
        )
    # Other settings with the same file are refused, not mixed in.
    assert _eval(checkpoint, tmp_path, "--max-new-tokens", "9") == 1
    assert "another model or other settings" in capsys.readouterr().err


def test_cli_overrides_the_reference_settings(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = cli.main([
        "eval", str(checkpoint), "--tasks", "naturalqs", "--limit", "1", "--dtype", "fp32",
        "--no-progress", "--output", str(out), "--max-new-tokens", "3", "--stop", '["\\n", "Q:"]',
        "--temperature", "0.5", "--samples", "2", "--seed", "7",
    ])  # fmt: skip
    assert code == 0
    generation = json.loads(out.read_text())["tasks"]["naturalqs"]["generation"]
    assert generation == {
        "max_new_tokens": 3, "stop": ["\n", "Q:"], "temperature": 0.5, "samples": 2,
        "chat": False,
        "reference": {
            "max_new_tokens": 50, "stop": ["Question:", "Q:", "\n\n"], "temperature": 0.0,
            "samples": 1,
        },
    }  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", str(checkpoint), "--tasks", "naturalqs", "--stop", "x"])
    assert exit_info.value.code == 2
    assert "expected a JSON list of non-empty strings" in capsys.readouterr().err


def test_code_tasks_are_skipped_when_execution_is_off(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OLMOE_CODE_EXECUTION", "0")
    assert _eval(checkpoint, tmp_path) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["tasks"]["humaneval"]["skipped"] == EXECUTION_OFF_NOTE
    assert results["tasks"]["gsm8k"]["n"] == 2
    assert EXECUTION_OFF_NOTE in capsys.readouterr().out


def test_chat_is_detected_from_the_checkpoints_own_template(checkpoint, tmp_path, capsys):
    chat = tmp_path / "chat"
    chat.mkdir()
    for path in checkpoint.iterdir():
        (chat / path.name).symlink_to(path)
    tokenizer = Tokenizer.olmo()
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(chat)
    base = tmp_path / "base"  # olmoe saves its Tulu fallback with every checkpoint: not chat
    base.mkdir()
    for path in checkpoint.iterdir():
        (base / path.name).symlink_to(path)
    Tokenizer.olmo().save_pretrained(base)
    for model_dir, flags, expected in [
        (chat, [], True), (chat, ["--no-chat"], False), (base, [], False), (base, ["--chat"], True)
    ]:  # fmt: skip
        out = tmp_path / f"{model_dir.name}{flags}.json"
        code = cli.main([
            "eval", str(model_dir), "--tasks", "naturalqs", "--limit", "1", "--dtype", "fp32",
            "--max-new-tokens", "2", "--no-progress", "--output", str(out), *flags,
        ])  # fmt: skip
        assert code == 0
        assert json.loads(out.read_text())["tasks"]["naturalqs"]["generation"]["chat"] is expected
        kind = "chat" if expected else "base"
        assert f"prompted as a {kind} model" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "gsm9k"], "unknown task 'gsm9k'"),
        (["--tasks", "gsm8k", "--samples", "4"], "needs --temperature above 0"),
        (["--tasks", "gsm8k", "--max-new-tokens", "5000"], "leaves no room for the prompt"),
        (["--tasks", "arc_easy", "--generations", "g.jsonl"], "name one in --tasks"),
    ],
)
def test_cli_mistakes_are_one_line(checkpoint, capsys, args, message):
    assert cli.main(["eval", str(checkpoint), "--no-progress", *args]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("olmoe eval: error:") and message in err
