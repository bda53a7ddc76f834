"""The log-probability runner against a direct computation, and a planted oracle model that
must score 100 on every task format."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from olmoe.eval import evaluate
from olmoe.eval.runner import _Row, _rows, _shared_prefix_groups, encode_requests, score_requests
from olmoe.eval.tasks import Request, load_task
from olmoe.generation import generate
from tests.conftest import tiny_model

VOCAB = 50304  # the OLMo tokenizer's ids fit


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab_size=VOCAB, eos_token_id=50279, max_position_embeddings=4096).float()


LONG = "A long preamble about geography and history that the window will cut. " * 3
REQUESTS = [
    Request("The capital of France is", " Paris"),
    Request("The capital of France is", " a large city in Europe"),
    Request("The capital of France is", " Lyon, surely"),
    Request("Answer:", " Paris"),
    Request("Answer:", " a large city in Europe"),
    Request(LONG + "Question: which river?\nAnswer:", " the Seine"),
    Request(LONG + "Question: which river?\nAnswer:", " the Rhône, which flows south"),
    Request("Fill in: the cat sat on the mat", " and slept."),
    Request("Fill in: the dog sat on the mat", " and slept."),
]


def direct_logprobs(model, tokenizer, requests, max_length):
    """One full forward per request, log-softmax over every position: the plain definition."""
    out = []
    for e in encode_requests(tokenizer, requests, max_length):
        ids = list(e.context + e.continuation)
        with torch.no_grad():
            logp = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
        n = len(e.continuation)
        positions = range(len(ids) - 1 - n, len(ids) - 1)
        out.append((sum(float(logp[p, ids[p + 1]]) for p in positions), n))
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    "strategy, max_length, batch_size",
    [("packed", 2048, 4), ("packed", 20, 1), ("flat", 2048, 1), ("flat", 20, 4)],
)
def test_runner_matches_direct_computation(model, tokenizer, strategy, max_length, batch_size):
    expected = direct_logprobs(model, tokenizer, REQUESTS, max_length)
    got = score_requests(model, tokenizer, REQUESTS, batch_size, max_length, strategy)
    assert [n for _, n in got] == [n for _, n in expected]
    torch.testing.assert_close(
        torch.tensor([lp for lp, _ in got]), torch.tensor([lp for lp, _ in expected]),
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("strategy", ["packed", "flat"])
def test_greedy_flags_match_the_most_likely_tokens(model, tokenizer, strategy):
    # A continuation made of the model's own greedy tokens (it must tokenise back to them),
    # beside the other requests, whose flags come from a direct argmax.
    context = tokenizer.encode("The capital of France is", add_special_tokens=False)
    with torch.no_grad():
        best = generate(model, torch.tensor([context]), max_new_tokens=3)[0, len(context) :]
    greedy = Request("The capital of France is", tokenizer.decode(best.tolist()))
    assert tokenizer.encode(greedy.continuation, add_special_tokens=False) == best.tolist()
    requests = [*REQUESTS, greedy]
    expected = []
    for e in encode_requests(tokenizer, requests, 2048):
        ids = list(e.context + e.continuation)
        with torch.no_grad():
            best_next = model(torch.tensor([ids[:-1]])).logits[0].argmax(-1)
        n = len(e.continuation)
        expected.append(best_next[-n:].tolist() == list(e.continuation))
    got = score_requests(model, tokenizer, requests, 4, 2048, strategy, greedy=True)
    assert [g for _, _, g in got] == expected and expected[-1]
    plain = score_requests(model, tokenizer, requests, 4, 2048, strategy)
    assert [(lp, n) for lp, n, _ in got] == plain


def test_truncation_changes_the_scores(model, tokenizer):
    # The long requests lose context at max_length 20, so their scores change; the short ones
    # (already within the window) do not. A runner ignoring max_length fails this.
    full = score_requests(model, tokenizer, REQUESTS, 4, 2048)
    cut = score_requests(model, tokenizer, REQUESTS, 4, 20)
    assert full[0] == pytest.approx(cut[0])
    assert full[5][0] != pytest.approx(cut[5][0])


def test_bad_requests_are_clear_errors(model, tokenizer):
    with pytest.raises(ValueError, match="empty context"):
        score_requests(model, tokenizer, [Request("", " x")])
    with pytest.raises(ValueError, match="no tokens"):
        score_requests(model, tokenizer, [Request("Q:", "")])
    with pytest.raises(ValueError, match="does not fit"):
        score_requests(model, tokenizer, [Request("Q:", " a b c d e f")], max_length=3)


def test_duplicate_requests_are_scored_once_and_counted(model, tokenizer):
    requests = REQUESTS + REQUESTS[3:5]
    done = []
    got = score_requests(model, tokenizer, requests, 4, progress=done.append)
    assert got[-2:] == got[3:5]
    assert sum(done) == len(requests)


# ---------------------------------------------------------------------------- shared prefixes
def real_requests(tokenizer, questions_per_task=6):
    """The first questions of real tasks in both formats (ARC-Challenge's cloze with its
    unconditional lines, WinoGrande's partial scoring, two MMLU subjects), and a window that cuts
    the longest of their contexts from the left."""
    requests = []
    for name in ("arc_challenge", "winogrande", "mmlu:anatomy+virology"):
        for fmt in load_task(name).formats:
            taken = {}
            for q in fmt.questions:
                if taken.get(q.group, 0) < questions_per_task:
                    taken[q.group] = taken.get(q.group, 0) + 1
                    requests += [*q.choices, *(q.unconditional or ())]
    lengths = sorted(
        len(e.context) + len(e.continuation) for e in encode_requests(tokenizer, requests)
    )
    return requests, lengths[int(0.9 * len(lengths))]  # a tenth of the requests get cut


def test_shared_prefix_groups_on_real_records(tokenizer):
    requests, max_length = real_requests(tokenizer)
    encoded = encode_requests(tokenizer, requests, max_length)
    groups = _shared_prefix_groups(_rows(encoded, "packed"))
    shared = [(n, rows) for n, rows in groups if n]
    # One group per format of each task and MMLU subject (the fixed shots), minus those whose
    # every context was cut.
    assert len(shared) >= 6
    for n, rows in shared:
        assert len(rows) >= 2 and all(n < len(r.context) for r in rows)
        assert len({r.context[:n] for r in rows}) == 1
    alone = [r for n, rows in groups if not n for r in rows]
    cut = {e.context for e in encoded if len(e.context) + len(e.continuation) == max_length + 1}
    assert cut and cut <= {r.context for r in alone}  # cut mid-shot: they share no prefix
    assert sum(len(rows) for _, rows in groups) == len(_rows(encoded, "packed"))


def test_shared_prefix_groups_keep_the_long_prefix():
    base = tuple(range(1000, 1200))
    rows = [_Row(base + (i, 5, 6), [(i, (7,))]) for i in range(4)]
    # Sharing only 70 of the group's 200 tokens, sorted before and after the group; sharing
    # nothing.
    rows += [_Row(base[:70] + (1,) * 50, [(9, (7,))]), _Row(base[:70] + (2000,), [(9, (7,))])]
    rows.append(_Row((3,) * 100, [(8, (7,))]))
    groups = {len(members): n for n, members in _shared_prefix_groups(rows)}
    assert groups == {4: 200, 3: 0}


@pytest.mark.parametrize("batch_size", [3, 8])
def test_shared_prefix_matches_flat_on_real_records(model, tokenizer, batch_size):
    requests, max_length = real_requests(tokenizer, questions_per_task=3)
    flat = score_requests(model, tokenizer, requests, batch_size, max_length, "flat")
    packed = score_requests(model, tokenizer, requests, batch_size, max_length, "packed")
    assert [n for _, n in packed] == [n for _, n in flat]
    torch.testing.assert_close(
        torch.tensor([lp for lp, _ in packed], dtype=torch.float64),
        torch.tensor([lp for lp, _ in flat], dtype=torch.float64),
        rtol=1e-5, atol=1e-4,
    )  # fmt: skip


# ---------------------------------------------------------------------------- oracle
class _Base(torch.nn.Module):
    """Hidden state at a position = the sum, over the positions it may attend to, of a random
    vector per (token id, position): a signature of exactly what the position can see. It
    follows the runner's masks, positions and KV cache, so a packing bug breaks the oracle."""

    def __init__(self, embed, rope):
        super().__init__()
        self.embed, self.rope = embed, rope

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, cache_position=None):  # fmt: skip
        b, length = input_ids.shape
        offset = 0
        if past_key_values is not None:
            offset = (
                past_key_values.get_seq_length()
                if cache_position is None
                else int(cache_position[0])
            )
        if position_ids is None:  # as the model: positions follow the cache
            position_ids = (offset + torch.arange(length)).expand(b, length)
        contrib = self.embed[input_ids] * self.rope[position_ids]  # (B, L, D)
        keys = contrib
        if past_key_values is not None:
            keys = past_key_values.update(0, contrib[:, None], contrib[:, None], cache_position)[0][
                :, 0
            ]
        if attention_mask is None:
            allowed = torch.arange(keys.shape[1]) <= (offset + torch.arange(length))[:, None]
            allowed = allowed.expand(b, length, keys.shape[1])
        else:
            allowed = attention_mask[:, 0]
        return SimpleNamespace(last_hidden_state=allowed.double() @ keys)


class Oracle(torch.nn.Module):
    """Puts a logit of 1000 on the gold next token after every prefix of a gold request (found
    by its signature), 0 elsewhere."""

    def __init__(self, tokenizer, gold, max_length):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        embed = torch.randn(VOCAB, 16, generator=g, dtype=torch.float64)
        rope = torch.randn(4096, 16, generator=g, dtype=torch.float64)
        self.config = SimpleNamespace(num_hidden_layers=1, max_position_embeddings=4096)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the runner looks for the device
        self.model = _Base(embed, rope)
        keys, nexts = [], []
        for e in encode_requests(tokenizer, gold, max_length):
            ids = list(e.context + e.continuation)
            prefixes = (embed[ids] * rope[: len(ids)]).cumsum(0)
            for t in range(len(e.context) - 1, len(ids) - 1):
                keys.append(prefixes[t])
                nexts.append(ids[t + 1])
        self.keys, self.nexts = torch.stack(keys), torch.tensor(nexts)

    def forward_hidden(self, input_ids=None, **kwargs):
        return self.model(input_ids, **kwargs)

    def logits_from_hidden(self, hidden):
        distance, nearest = torch.cdist(
            hidden.double(), self.keys, compute_mode="donot_use_mm_for_euclid_dist"
        ).min(-1)
        logits = torch.zeros(len(hidden), VOCAB)
        hit = distance < 1e-6
        logits[hit.nonzero()[:, 0], self.nexts[nearest[hit]]] = 1000.0
        return logits


ORACLE_TASKS = [
    "arc_challenge",
    "hellaswag",
    "winogrande",
    "boolq",
    "mmlu:abstract_algebra+anatomy",
]


def decidable(question, tokenizer):
    """False when another choice's tokens are a prefix of the gold choice's (" 2" against
    " 24"): any model scoring summed log-probabilities then ties them at best, oracle or not."""
    encoded = encode_requests(tokenizer, question.choices, 2048)
    gold = encoded[question.label].context + encoded[question.label].continuation
    for i, e in enumerate(encoded):
        tokens = e.context + e.continuation
        if i != question.label and gold[: len(tokens)] == tokens:
            return False
    return True


@pytest.mark.parametrize("strategy", ["packed", pytest.param("flat", marks=pytest.mark.slow)])
def test_oracle_scores_100_in_both_formats(tokenizer, strategy):
    limit, max_length = 12, 2048
    tasks, gold = [], []
    for name in ORACLE_TASKS:
        task = load_task(name)
        formats = []
        for fmt in task.formats:
            taken, kept = {}, []
            for q in fmt.questions:  # the first `limit` (per MMLU subject) that are decidable
                if taken.get(q.group, 0) < limit and decidable(q, tokenizer):
                    taken[q.group] = taken.get(q.group, 0) + 1
                    kept.append(q)
            assert len(kept) == limit * len(taken)
            gold += [q.choices[q.label] for q in kept]
            formats.append(dataclasses.replace(fmt, questions=tuple(kept)))
        tasks.append(dataclasses.replace(task, formats=tuple(formats)))
    oracle = Oracle(tokenizer, gold, max_length)
    results = evaluate(
        oracle, tokenizer, tasks, batch_size=5, strategy=strategy, progress=False, model_info={}
    )
    for name, task in results["tasks"].items():
        for fmt, scores in task["formats"].items():
            assert scores["primary_score"] == 100.0, (name, fmt, scores["metrics"])
            assert scores["metrics"]["acc_raw"] == 100.0
        assert task["primary_score"] == 100.0
