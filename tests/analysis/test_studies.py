"""Routing analysis: each statistic on hand-built routings, the collector against full router
logits of a tiny model, the saved counts format, the plots and `olmoe analyze`."""

from __future__ import annotations

import itertools
import json
import shutil

import matplotlib.image
import numpy as np
import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe.analysis import (
    ChunkRouting,
    Corpus,
    RoutingCounts,
    coactivation,
    collect_routing,
    corpus_tokens,
    expert_shares,
    load_statistics,
    plots,
    preferred_tokens,
    router_saturation,
    studies,
    vocabulary_specialization,
)
from olmoe.cli import main
from olmoe.errors import InputError
from olmoe.tokenizer import Tokenizer
from tests.conftest import tiny_model


def fake_counts(experts, input_ids=None, entropy=None, vocab_size=100, num_experts=None,
                trace=False, vocabulary=False) -> RoutingCounts:  # fmt: skip
    """Counts of a hand-built routing: `experts` (T, L, K), most probable first."""
    experts = np.asarray(experts)
    tokens, layers, k = experts.shape
    input_ids = np.arange(tokens) % vocab_size if input_ids is None else np.asarray(input_ids)
    counts = RoutingCounts(layers, num_experts or int(experts.max()) + 1, k, vocab_size)
    if trace:
        counts.keep_trace()
    if vocabulary:
        counts.track_vocabulary(["input", "gold"])
    next_ids = np.r_[input_ids[1:], -1]
    counts.update(
        ChunkRouting(
            input_ids=input_ids,
            next_ids=next_ids,
            predicted_ids=None,
            experts=experts,
            entropy=np.zeros((tokens, layers)) if entropy is None else np.asarray(entropy),
        )
    )
    return counts


def random_routing(rng, tokens, layers, num_experts, k) -> np.ndarray:
    return np.stack([rng.permutation(num_experts)[:k] for _ in range(tokens * layers)]).reshape(
        tokens, layers, k
    )


# ---------------------------------------------------------------------------- saturation
def test_saturation_of_identical_routing_is_one():
    rng = np.random.default_rng(0)
    experts = random_routing(rng, 500, 3, 16, 4)
    a, b = fake_counts(experts, trace=True), fake_counts(experts, trace=True)
    for k in (1, 2, 4):
        np.testing.assert_array_equal(router_saturation(a, b, k), np.ones(3))


def test_saturation_of_independent_random_routers_is_k_over_e():
    rng = np.random.default_rng(1)
    E, K, T = 16, 4, 20_000
    a = fake_counts(random_routing(rng, T, 2, E, K), num_experts=E, trace=True)
    b = fake_counts(random_routing(rng, T, 2, E, K), num_experts=E, trace=True)
    # The per-token overlap is hypergeometric, standard deviation below 1: over 20,000 tokens
    # the mean is within 0.01 of k/E with overwhelming probability.
    for k in (1, K):
        np.testing.assert_allclose(router_saturation(a, b, k), k / E, atol=0.01)


def test_saturation_counts_set_overlap_not_order():
    early = np.array([[[0, 1, 2]], [[3, 4, 5]]])  # (T=2, L=1, K=3)
    final = np.array([[[2, 0, 7]], [[5, 6, 7]]])  # token 0 shares {0, 2}, token 1 shares {5}
    a = fake_counts(early, num_experts=8, trace=True)
    b = fake_counts(final, num_experts=8, trace=True)
    np.testing.assert_allclose(router_saturation(a, b, 3), [(2 + 1) / (2 * 3)])
    np.testing.assert_allclose(router_saturation(a, b, 1), [0.0])  # top-1s 0 vs 2, 3 vs 5
    np.testing.assert_allclose(router_saturation(a, b, 2), [(1 + 0) / (2 * 2)])


def test_saturation_refuses_different_tokens_and_missing_traces():
    experts = np.zeros((4, 1, 2), int) + [0, 1]
    a = fake_counts(experts, input_ids=[1, 2, 3, 4], trace=True)
    b = fake_counts(experts, input_ids=[1, 2, 3, 5], trace=True)
    with pytest.raises(InputError, match="same tokens"):
        router_saturation(a, b, 1)
    with pytest.raises(InputError, match="keep_trace"):
        router_saturation(fake_counts(experts), a, 1)


# ---------------------------------------------------------------------------- co-activation
def test_coactivation_counts_all_pairs_of_a_tokens_experts():
    experts = np.array([[[0, 1, 2]], [[0, 1, 3]], [[2, 0, 3]]])  # (T=3, L=1, K=3)
    counts = fake_counts(experts, num_experts=4)
    expected_pairs = np.zeros((4, 4))
    for row in experts[:, 0]:
        for i, j in itertools.permutations(row, 2):
            expected_pairs[i, j] += 1
    np.testing.assert_array_equal(counts.pair_counts[0], expected_pairs)
    np.testing.assert_array_equal(counts.expert_counts[0], [3, 2, 2, 2])
    matrix = coactivation(counts)[0]
    assert matrix[0, 1] == pytest.approx(2 / 3)  # expert 0 chosen 3 times, with 1 twice
    assert matrix[1, 0] == pytest.approx(2 / 2)  # expert 1 chosen twice, both times with 0
    assert matrix[2, 3] == pytest.approx(1 / 2)  # the pair (2, 3) is not adjacent in token 2
    # The release script's variant only sees neighbours in the logit order: (2, 0), (0, 3).
    adjacent = coactivation(counts, adjacent=True)[0]
    assert adjacent[2, 3] == 0 and adjacent[0, 3] == pytest.approx(1 / 3)
    assert adjacent[0, 2] == pytest.approx(1 / 3)  # all pairs: 2 / 3 (tokens 0 and 2)
    assert matrix[0, 2] == pytest.approx(2 / 3)


def test_coactivation_of_an_unused_expert_is_zero_not_nan():
    counts = fake_counts(np.array([[[0, 1]]]), num_experts=3)
    matrix = coactivation(counts)[0]
    assert np.isfinite(matrix).all() and (matrix[2] == 0).all()


# ---------------------------------------------------------------------------- domains, load
def test_expert_shares_sum_to_k_per_token_and_top1_to_one():
    rng = np.random.default_rng(2)
    counts = fake_counts(random_routing(rng, 300, 2, 8, 3), num_experts=8)
    np.testing.assert_allclose(expert_shares(counts).sum(axis=1), [3, 3])
    np.testing.assert_allclose(expert_shares(counts, top1=True).sum(axis=1), [1, 1])
    first = np.bincount(
        random_routing(np.random.default_rng(2), 300, 2, 8, 3)[:, 1, 0], minlength=8
    )
    np.testing.assert_allclose(expert_shares(counts, top1=True)[1], first / 300)


def test_load_statistics_on_a_known_routing():
    # Layer 0: expert 0 takes 3 of 4 tokens' top-1 slots; layer 1 perfectly balanced.
    experts = np.array([[[0], [0]], [[0], [1]], [[0], [2]], [[1], [3]]])  # (T=4, L=2, K=1)
    entropy = np.full((4, 2), np.log(4.0))
    stats = load_statistics(fake_counts(experts, entropy=entropy, num_experts=4))
    np.testing.assert_array_equal(stats["tokens_per_expert"], [[3, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(stats["max_over_mean"], [3.0, 1.0])
    np.testing.assert_allclose(stats["min_over_mean"], [0.0, 1.0])
    layer0 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    np.testing.assert_allclose(stats["load_entropy"], [layer0, np.log(4)])
    np.testing.assert_allclose(stats["router_entropy"], [np.log(4), np.log(4)])


# ---------------------------------------------------------------------------- vocabulary
def test_vocabulary_specialization_of_a_router_by_token_id_is_one():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 20, size=2000)
    experts = np.stack([ids % 8, (ids + 3) % 8], axis=-1)[:, None, :]  # (T, L=1, K=2)
    counts = fake_counts(experts, input_ids=ids, vocab_size=20, num_experts=8, vocabulary=True)
    for top1 in (True, False):
        assert vocabulary_specialization(counts, "input", top1)[0] == pytest.approx(1.0)
    # By the gold next token (independent of the input) the same router is not specialised.
    assert vocabulary_specialization(counts, "gold", True)[0] < 0.5


def test_vocabulary_specialization_by_hand():
    # Token 5 seen 10 times: 6 to expert 1, 4 to expert 2 -> 0.6. Token 6 seen 12 times, always
    # expert 3 -> 1.0. Token 7 seen 3 times (under min_count) is left out.
    ids = [5] * 10 + [6] * 12 + [7] * 3
    top1 = [1] * 6 + [2] * 4 + [3] * 12 + [0, 1, 2]
    experts = np.array(top1)[:, None, None]
    counts = fake_counts(experts, input_ids=ids, vocab_size=10, num_experts=4, vocabulary=True)
    assert vocabulary_specialization(counts, "input", min_count=10)[0] == pytest.approx(0.8)
    assert np.isnan(vocabulary_specialization(counts, "input", min_count=13)[0])
    preferred = preferred_tokens(counts, layer=0, min_count=10)
    assert preferred[3] == [(6, 1.0, 12)]
    assert preferred[1] == [(5, 0.6, 6)] and preferred[0] == []


# ---------------------------------------------------------------------------- the collector
def reference_counts(model, chunks: list[torch.Tensor]):
    """Counts computed the slow way from the full router logits of each chunk."""
    config = model.config
    L, E, K = config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    expert_counts, pairs, entropy = np.zeros((L, E)), np.zeros((L, E, E)), np.zeros(L)
    occurrences = {}
    with torch.no_grad():
        for chunk in chunks:
            logits = model(chunk[None], output_router_logits=True).router_logits
            for layer, layer_logits in enumerate(logits):
                p = torch.softmax(layer_logits.double(), dim=-1)
                entropy[layer] += -(p * p.log()).sum().item()
                for position, row in enumerate(layer_logits):
                    chosen = torch.topk(row, K).indices.tolist()
                    for i in chosen:
                        expert_counts[layer, i] += 1
                        key = (layer, int(chunk[position]), i)
                        occurrences[key] = occurrences.get(key, 0) + 1
                    for i, j in itertools.permutations(chosen, 2):
                        pairs[layer, i, j] += 1
    return expert_counts, pairs, entropy, occurrences


def test_collector_counts_equal_counts_from_full_router_logits():
    model = tiny_model(num_experts=8, num_experts_per_tok=3)
    tokens = np.random.default_rng(4).integers(0, model.config.vocab_size, size=150)
    counts = collect_routing(
        model, tokens, chunk_length=32, batch_size=2, vocabulary=True, progress=False
    )
    chunks = [torch.from_numpy(tokens[i : i + 32]) for i in range(0, 150, 32)]
    expert_counts, pairs, entropy, occurrences = reference_counts(model, chunks)
    assert counts.tokens == 150
    np.testing.assert_array_equal(counts.expert_counts, expert_counts)
    np.testing.assert_array_equal(counts.pair_counts, pairs)
    np.testing.assert_allclose(counts.entropy_sum, entropy, rtol=1e-5)
    V, E = counts.vocab_size, counts.num_experts
    keys, hits = counts.vocabulary["input"].topk.items()
    collected = {
        (int(k // (V * E)), int(k // E % V), int(k % E)): int(n) for k, n in zip(keys, hits)
    }
    assert collected == occurrences
    np.testing.assert_array_equal(
        counts.vocabulary["input"].occurrences, np.bincount(tokens, minlength=V)
    )
    # Gold next tokens: every position but the last of each chunk (5 chunks).
    assert counts.vocabulary["gold"].occurrences.sum() == 150 - 5
    predicted = counts.vocabulary["predicted"].occurrences.sum()
    assert predicted == 150


def test_collector_refuses_foreign_token_ids_and_overlong_chunks():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        collect_routing(model, np.array([1, 2, 10_000]), chunk_length=8, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        collect_routing(model, np.arange(10), chunk_length=1000, progress=False)


def test_counts_file_round_trip(tmp_path):
    model = tiny_model()
    tokens = np.random.default_rng(5).integers(0, 128, size=100)
    counts = collect_routing(
        model, tokens, chunk_length=40, vocabulary=True, keep_trace=True, progress=False
    )
    path = counts.save(tmp_path / "counts.npz")
    loaded = RoutingCounts.load(path)
    assert loaded.tokens == counts.tokens == 100
    for name in ("expert_counts", "top1_counts", "pair_counts", "adjacent_pair_counts"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(counts, name))
    np.testing.assert_array_equal(loaded.trace, counts.trace)
    assert loaded.trace.shape == (100, 2, 2)
    np.testing.assert_array_equal(loaded.trace_ids, tokens)
    for kind in ("input", "gold", "predicted"):
        np.testing.assert_allclose(
            vocabulary_specialization(loaded, kind, min_count=1),
            vocabulary_specialization(counts, kind, min_count=1),
        )
    assert [p.name for p in tmp_path.iterdir()] == ["counts.npz"]  # no partial file left


# ---------------------------------------------------------------------------- corpora, plots
def test_corpus_specs_and_token_files(tmp_path):
    assert Corpus.parse("books=/data/books.txt") == Corpus("books", "/data/books.txt")
    assert Corpus.parse("stdlib-code") == Corpus("stdlib-code", "stdlib-code")
    assert Corpus.parse("corpus/wiki.jsonl.gz").name == "wiki.jsonl"
    with pytest.raises(InputError, match="NAME=SOURCE"):
        Corpus.parse("=x")
    np.save(tmp_path / "tokens.npy", np.arange(50, dtype=np.uint16))
    tokens = corpus_tokens(str(tmp_path / "tokens.npy"), tokenizer=None, max_tokens=20)
    np.testing.assert_array_equal(tokens, np.arange(20))


def test_corpus_tokens_of_documents_end_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("def f():\n    return 1\n")
    (tmp_path / "b.txt").write_text("Hello world.")
    tokenizer = Tokenizer.olmo()
    tokens = corpus_tokens(str(tmp_path), tokenizer, max_tokens=1000)
    expected = [*tokenizer.encode("def f():\n    return 1\n"), 50279]
    expected += [*tokenizer.encode("Hello world."), 50279]
    assert tokens.tolist() == expected


def png_shape(path) -> tuple[int, int]:
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image[..., :3].std() > 0  # something is drawn
    return image.shape[:2]


def test_every_study_writes_json_csv_and_readable_pngs(tmp_path):
    rng = np.random.default_rng(6)
    experts = random_routing(rng, 400, 4, 8, 2)
    counts = fake_counts(experts, num_experts=8, vocab_size=30, trace=True, vocabulary=True,
                         input_ids=rng.integers(0, 30, size=400))  # fmt: skip
    reports = [
        studies.saturation_report(counts, counts),
        studies.coactivation_report(counts, top_experts=6),
        studies.domains_report({"a": counts, "b": counts}),
        studies.vocabulary_report(counts, min_count=5),
        studies.load_report(counts),
    ]
    for report in reports:
        written = studies.write_report(report, tmp_path)
        assert json.loads((tmp_path / f"{report['study']}.json").read_text()) == json.loads(
            json.dumps(report)
        )
        assert (tmp_path / f"{report['study']}.csv").read_text().count("\n") > 1
        assert studies.summary(report)
        for path in (p for p in written if p.suffix == ".png"):
            height = 4.5 if report["study"] in ("saturation", "coactivation", "vocabulary") else 4.0
            assert png_shape(path) == (int(height * plots.DPI), int(plots.WIDTH * plots.DPI))
    assert sorted(p.name for p in tmp_path.glob("domains-*.png")) == sorted(
        f"domains-layer{layer}{suffix}.png" for layer in (0, 1, 3) for suffix in ("", "-top1")
    )
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    assert reports[0]["saturation"]["2"] == [1.0] * 4


def test_saturation_series_is_each_revisions_saturation_against_the_final(tmp_path):
    rng = np.random.default_rng(7)
    final_experts = random_routing(rng, 300, 3, 8, 2)
    halfway = final_experts.copy()
    halfway[::2] = random_routing(rng, 150, 3, 8, 2)  # half the tokens routed afresh
    final = fake_counts(final_experts, num_experts=8, trace=True)
    early = {
        "step1-tokens0B": fake_counts(random_routing(rng, 300, 3, 8, 2), num_experts=8, trace=True),
        "step2-tokens0B": fake_counts(halfway, num_experts=8, trace=True),
        "step3-tokens0B": final,
    }
    report = studies.saturation_series_report(early, final)
    assert report["revisions"] == list(early) and report["steps"] == [1, 2, 3]
    for index, counts in enumerate(early.values()):  # each point is the single-pair study's
        single = studies.saturation_report(counts, final)["saturation"]
        assert [series[index] for series in report["saturation"].values()] == list(single.values())
    means = [np.mean(values) for values in report["saturation"]["2"]]
    assert means[0] < means[1] < means[2] == 1.0
    written = studies.write_report(report, tmp_path)
    assert sorted(p.name for p in written) == [
        "saturation_series.csv", "saturation_series.json", "saturation_series.png"
    ]  # fmt: skip
    assert png_shape(tmp_path / "saturation_series.png") == (450, 1000)
    rows = (tmp_path / "saturation_series.csv").read_text().splitlines()
    assert rows[0] == "revision,step,layer,top1,top2" and len(rows) == 1 + 3 * 3
    assert len(studies.summary(report).splitlines()) == 1 + 3
    # Names without a step (a hub's main, a commit) are drawn in the order given.
    unnamed = studies.saturation_series_report({"early": early["step1-tokens0B"], "main": final},
                                               final)  # fmt: skip
    assert unnamed["steps"] == [None, None]
    assert png_shape(studies.write_report(unnamed, tmp_path / "unnamed")[-1]) == (450, 1000)


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(vocab_size=50304, eos_token_id=50279, max_position_embeddings=128)
    OlmoeForCausalLM(config).save_pretrained(directory)
    return directory


def test_analyze_command_writes_the_study(vocab_model, tmp_path, capsys):
    corpus = tmp_path / "text"
    corpus.mkdir()
    (corpus / "one.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    argv = ["analyze", "domains", str(vocab_model), "--data", f"fox={corpus}", "--data",
            "docs=stdlib-docstrings", "--max-tokens", "300", "--chunk-length", "64",
            "--out", str(out), "--dtype", "fp32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "domains.json").read_text())
    assert list(report["domains"]) == ["fox", "docs"]
    assert report["domains"]["docs"]["tokens"] == 300
    np.testing.assert_allclose(np.sum(report["domains"]["fox"]["shares"], axis=1), 2.0)
    assert (out / "counts-fox.npz").is_file() and (out / "domains-layer1.png").is_file()
    assert "fox" in capsys.readouterr().out

    saturation = ["analyze", "saturation", str(vocab_model), "--against", str(vocab_model),
                  "--max-tokens", "100", "--chunk-length", "64", "--out", str(tmp_path / "sat"),
                  "--data", str(corpus), "--quiet"]  # fmt: skip
    assert main(saturation) == 0
    assert json.loads((tmp_path / "sat" / "saturation.json").read_text())["saturation"]["2"] == [
        1.0,
        1.0,
    ]


def test_analyze_command_errors_are_one_line(vocab_model, tmp_path, capsys):
    assert main(["analyze", "load", str(vocab_model), "--data", str(tmp_path / "nope")]) == 1
    error = capsys.readouterr().err
    assert "does not exist" in error and error.count("\n") == 1
    assert main(["analyze", "load", str(vocab_model), "--chunk-length", "4096"]) == 1
    assert "context" in capsys.readouterr().err


def test_analyze_saturation_over_a_runs_revisions(vocab_model, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(vocab_model, run)  # the final model, revision main
    shutil.copytree(vocab_model, run / "revisions" / "step2-tokens0B")  # its last revision
    torch.manual_seed(1)
    config = OlmoeConfig.from_pretrained(vocab_model)
    OlmoeForCausalLM(config).save_pretrained(run / "revisions" / "step1-tokens0B")
    corpus = tmp_path / "fox.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    argv = ["analyze", "saturation", str(run), "--revisions", "step1-tokens0B,step2-tokens0B",
            "--against", str(run), "--against-revision", "main", "--data", str(corpus),
            "--max-tokens", "100", "--chunk-length", "64", "--dtype", "fp32", "--quiet",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "saturation_series.json").read_text())
    assert report["revisions"] == ["step1-tokens0B", "step2-tokens0B"]
    assert report["steps"] == [1, 2] and report["tokens"] == 100
    assert report["saturation"]["2"][1] == [1.0, 1.0]  # the last revision is the final model
    assert min(report["saturation"]["2"][0]) < 1.0
    assert (out / "saturation_series.png").is_file()
    for name in ("step1-tokens0B", "step2-tokens0B", "final"):
        assert (out / f"counts-{name}.npz").is_file()
    assert "step1-tokens0B" in capsys.readouterr().out
    assert main([*argv, "--revision", "main"]) == 1
    error = capsys.readouterr().err
    assert "--revisions" in error and error.count("\n") == 1
