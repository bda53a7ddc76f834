"""The lm-evaluation-harness bridge: olmoe as lm-eval's model "olmoe", on tasks defined from local
files (lm-eval's own tasks download their data at run time) — multiple choice, rolling
log-likelihood and generate-until — through `olmoe lm-eval` and through Python, with the same
log-likelihoods as `olmoe eval`."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'olmoe[lmeval]'")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from olmoe import cli  # noqa: E402
from olmoe.eval.evaluation import evaluate  # noqa: E402
from olmoe.eval.lm_eval_bridge import OlmoeLM  # noqa: E402
from olmoe.eval.perplexity import sequence_nll  # noqa: E402
from olmoe.generation import generate  # noqa: E402
from tests.eval.helpers import small_model  # noqa: E402

QUESTIONS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "2 + 2 =", "choices": ["3", "4", "five", "22"], "label": 1},
    {"question": "Capital of France?", "choices": ["Paris", "Rome"], "label": 0},
]
# The second text is longer than the 64-token window: it is scored in several windows.
TEXTS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "one two " * 60}]
PROBLEMS = [{"question": "Say hi.", "answer": "hi"}, {"question": "Count to three.", "answer": "1"}]
TASKS = {
    "olmoe_mc": {
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    },
    "olmoe_ppl": {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    },
    "olmoe_gen": {
        "output_type": "generate_until",
        "doc_to_text": "Q: {{question}}\nA:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}
DATA = {"olmoe_mc": QUESTIONS, "olmoe_ppl": TEXTS, "olmoe_gen": PROBLEMS}

WINDOW = 64  # tokens the small model sees: documents longer than it roll
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return small_model(max_position_embeddings=WINDOW)


@pytest.fixture(autouse=True)
def _offline_datasets(tmp_path, monkeypatch):
    # `datasets` reads the local JSON files into a cache of its own: keep it out of ~/.cache.
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return OlmoeLM(model=model, tokenizer=tokenizer, batch_size=2)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """lm-eval task YAMLs (for --include_path), each reading a local JSON-lines file."""
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, config in TASKS.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in DATA[name]), encoding="utf-8")
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            **config,
        }
        (directory / f"{name}.yaml").write_text(json.dumps(task), encoding="utf-8")  # JSON is YAML
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    directory = tmp_path_factory.mktemp("tiny-vocab")
    model.save_pretrained(directory)  # no tokenizer files: the OLMo tokenizer is used
    return directory


def _run(lm, task_dir, tasks):
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
    )


@pytest.fixture
def lm_eval_logging():
    """lm-eval's command line hands its logger a handler on this test's captured stderr, which
    pytest closes afterwards: the handlers are put back as they were."""
    logger = logging.getLogger("lm_eval")
    handlers = list(logger.handlers)
    yield
    logger.handlers[:] = handlers


@pytest.mark.usefixtures("lm_eval_logging")
def test_olmoe_lm_eval_runs_all_three_request_types(checkpoint, task_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        [
            "lm-eval", "--model", "olmoe", "--model_args", f"pretrained={checkpoint},dtype=fp32",
            "--include_path", str(task_dir), "--tasks", "olmoe_mc,olmoe_ppl,olmoe_gen",
            "--batch_size", "2", "--output_path", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    [written] = out.rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    assert 0 <= results["olmoe_mc"]["acc,none"] <= 1
    assert results["olmoe_ppl"]["bits_per_byte,none"] > 0
    assert results["olmoe_gen"]["exact_match,none"] == 0  # a random model says nothing useful
    assert "olmoe_mc" in capsys.readouterr().out  # lm-eval's table


def test_loglikelihoods_equal_olmoe_evals(lm, model, tokenizer, task_dir, tmp_path):
    """The same (context, continuation) requests score the same through lm-eval as through
    `olmoe eval` (a task file with lm-eval's prompt and no shots, cloze format). With the same
    requests (no unconditional lines) and batch size the batches are the same, so the numbers
    are equal; other batches differ in float32 rounding (about 1e-6)."""
    (tmp_path / "task.yaml").write_text(
        json.dumps(
            {
                "name": "same", "data": str(task_dir / "olmoe_mc.jsonl"), "num_shots": 0,
                "formats": ["rc"], "rc_template": "Question: {question}\nAnswer:",
                "unconditional_context": None,
            }
        )
    )  # fmt: skip
    ours = evaluate(model, tokenizer, [str(tmp_path / "task.yaml")], batch_size=2, progress=False,
                    keep_predictions=True)  # fmt: skip
    expected = [p["logprobs"] for p in ours["tasks"]["same"]["formats"]["rc"]["predictions"]]
    samples = sorted(_run(lm, task_dir, ["olmoe_mc"])["samples"]["olmoe_mc"],
                     key=lambda s: s["doc_id"])  # fmt: skip
    got = [[resp[0][0] for resp in s["resps"]] for s in samples]
    assert [len(g) for g in got] == [len(e) for e in expected]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=1e-9, rel=0)


def _direct_logprobs(model, tokens):
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one full forward pass."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens])).logits[0].float().log_softmax(-1)
    return [float(logits[i - 1, t]) for i, t in enumerate(tokens) if i]


def test_is_greedy_follows_the_most_likely_tokens(lm, model, tokenizer):
    context = tokenizer.encode("Hello there", add_special_tokens=False)
    best = generate(model, torch.tensor([context]), max_new_tokens=3)[0, len(context) :]
    continuation = tokenizer.decode(best.tolist())
    # Only a continuation that tokenises back to the same tokens can be checked this way.
    assert tokenizer.encode(continuation, add_special_tokens=False) == best.tolist()
    other = tokenizer.decode([int(best[0]) + 1, *best[1:].tolist()])
    [(greedy_lp, greedy), (_, not_greedy)] = lm.loglikelihood(
        [("Hello there", continuation), ("Hello there", other)], disable_tqdm=True
    )
    assert greedy and not not_greedy
    assert greedy_lp == pytest.approx(sum(_direct_logprobs(model, context + best.tolist())[-3:]))


def test_empty_context_is_the_end_of_text_token(lm, model, tokenizer):
    tokens = tokenizer.encode(" hello world", add_special_tokens=False)
    [(logprob, _)] = lm.loglikelihood([("", " hello world")], disable_tqdm=True)
    eot = tokenizer.eos_token_id
    assert logprob == pytest.approx(sum(_direct_logprobs(model, [eot, *tokens])), abs=1e-5)


def test_rolling_loglikelihood_scores_every_token_once(lm, model, tokenizer):
    short, long = (t["text"] for t in TEXTS)
    [got_short, got_long] = lm.loglikelihood_rolling([(short,), (long,)], disable_tqdm=True)
    eot = tokenizer.eos_token_id
    tokens = [eot, *tokenizer.encode(short, add_special_tokens=False)]
    assert got_short == pytest.approx(sum(_direct_logprobs(model, tokens)), abs=1e-5)
    # Longer than the window: olmoe's sliding windows (tests/eval/test_evaluation.py checks
    # them), half a window of stride, after the same end-of-text token.
    long_tokens = tokenizer.encode(long, add_special_tokens=False)
    assert len(long_tokens) > WINDOW
    window = WINDOW
    assert got_long == -sequence_nll(model, [eot, *long_tokens], window, window // 2)


def test_generate_until_stops_and_respects_the_budget(lm, model, tokenizer):
    prompt = "Q: Say hi.\nA:"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    expected = tokenizer.decode(
        generate(model, torch.tensor([ids]), max_new_tokens=6)[0, len(ids) :].tolist(),
        skip_special_tokens=True,
    )
    stop = expected[2:4]  # a stop sequence the greedy answer holds
    [whole, cut] = lm.generate_until(
        [
            (prompt, {"until": [], "max_gen_toks": 6, "do_sample": False}),
            (prompt, {"until": stop, "max_gen_toks": 6, "temperature": 0.0}),
        ],
        disable_tqdm=True,
    )
    assert whole == expected
    assert cut == expected[: expected.find(stop)]


def test_sampling_follows_do_sample_and_the_seed(lm):
    request = ("Q: Say hi.\nA:", {"until": [], "max_gen_toks": 8, "do_sample": True,
                                  "temperature": 1.0})  # fmt: skip
    first = lm.generate_until([request] * 4, disable_tqdm=True)
    assert len(set(first)) > 1  # each request draws its own numbers
    assert lm.generate_until([request] * 4, disable_tqdm=True) == first
