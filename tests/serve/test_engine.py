"""The continuous-batching engine in-process: exact greedy parity with `generate` whatever shares
the batch, batch-independent seeded sampling, routing telemetry, cancellation, the queue bound."""

from __future__ import annotations

import threading

import pytest
import torch

from olmoe.errors import InputError
from olmoe.generation import SamplingParams
from olmoe.moe import route
from olmoe.serve import engine as engine_module
from olmoe.serve.engine import Engine, QueueFull, Request
from tests.conftest import tiny_model
from tests.serve.engines import model_of, submit

PROMPTS = [[5, 17, 42, 7, 99, 3], [8, 9], [77, 12, 61, 30], list(range(3, 40)), [100]]
SAMPLE = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95)


def expected_greedy(model, prompt, new):
    return model.generate(torch.tensor([prompt]), max_new_tokens=new)[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_equals_generate_while_sequences_join_and_leave(engine_factory, dtype):
    """Five prompts of different lengths and budgets through three rows: sequences leave at
    different steps, waiting ones join mid-flight, rows get moved, the cache grows; every output
    is `generate`'s."""
    model = model_of(dtype)
    budgets = [30, 7, 19, 40, 25]  # the 37-token prompt outgrows the first 64 cache columns
    engine = engine_factory(model, max_batch_size=3)
    first = [submit(engine, p, n) for p, n in zip(PROMPTS[:2], budgets[:2])]
    rest = [submit(engine, p, n) for p, n in zip(PROMPTS[2:], budgets[2:])]
    for prompt, budget, got in zip(PROMPTS, budgets, first + rest):
        got.wait()
        assert got.tokens[0] == expected_greedy(model, prompt, budget)
        assert got.finish == ["length"]
    assert engine.stats.decode_steps < sum(budgets) - len(budgets)  # rows did share steps
    assert engine.cache.capacity == 128  # and the cache grew while they ran


def test_eos_finishes_with_stop(engine_factory):
    model = model_of(torch.float32)
    prompt = PROMPTS[0]
    free = expected_greedy(model, prompt, 10)
    model.config.eos_token_id = free[4]  # the fifth greedy token now ends the sequence
    engine = engine_factory(model)
    got = submit(engine, prompt, 10).wait()
    assert got.tokens[0] == free[: free.index(free[4]) + 1]
    assert got.finish == ["stop"]


def test_seeded_sampling_does_not_depend_on_the_batch(engine_factory):
    model = model_of(torch.float32)
    alone = submit(engine_factory(model), PROMPTS[0], 20, params=SAMPLE, seed=11).wait()
    crowded = engine_factory(model, max_batch_size=4)
    others = [submit(crowded, p, 20, params=SAMPLE) for p in PROMPTS[1:3]]
    shared = submit(crowded, PROMPTS[0], 20, params=SAMPLE, seed=11)
    others.append(submit(crowded, PROMPTS[3], 5, params=SAMPLE, seed=11))
    assert shared.wait().tokens == alone.tokens
    other_seed = submit(crowded, PROMPTS[0], 20, params=SAMPLE, seed=12).wait()
    assert other_seed.tokens != alone.tokens
    for other in others:
        other.wait()


def test_n_choices_share_the_prompt_and_draw_independently(engine_factory):
    model = model_of(torch.float32)
    engine = engine_factory(model, max_batch_size=4)
    got = submit(engine, PROMPTS[1], 15, params=SAMPLE, seed=5, n=3).wait()
    assert len({tuple(t) for t in got.tokens}) == 3
    # choice i is the request seeded with seed + i
    again = submit(engine, PROMPTS[1], 15, params=SAMPLE, seed=6).wait()
    assert again.tokens[0] == got.tokens[1]
    with pytest.raises(ValueError, match="batch size"):
        submit(engine, PROMPTS[1], 5, n=5)


# ---------------------------------------------------------------------------- telemetry
def test_routing_is_the_models_own_routing_of_each_producing_position(engine_factory):
    model = model_of(torch.float32)
    config = model.config
    engine = engine_factory(model, max_batch_size=2)
    other = submit(engine, PROMPTS[3], 9)  # shares the batch, at another length
    got = submit(engine, PROMPTS[0], 12, return_routing=True).wait()
    other.wait()
    tokens = got.tokens[0]
    assert len(got.experts[0]) == len(tokens)
    full = torch.tensor([PROMPTS[0] + tokens])
    with torch.no_grad():
        router_logits = model(full, output_router_logits=True).router_logits
    # token i was produced at position len(prompt) - 1 + i
    positions = torch.arange(len(tokens)) + len(PROMPTS[0]) - 1
    want = torch.stack(
        [
            route(
                logits[positions], config.num_experts_per_tok, config.norm_topk_prob
            ).top_k_indices
            for logits in router_logits
        ],
        dim=1,
    )  # (tokens, layers, K)
    assert got.experts[0] == want.tolist()
    assert other.experts == [[]]  # only asked-for routing is returned


def test_logprobs_are_the_models_log_softmax_at_each_producing_position(engine_factory):
    model = model_of(torch.float32)
    engine = engine_factory(model, max_batch_size=2)
    other = submit(engine, PROMPTS[3], 9)  # shares the batch, at another length
    outputs = []
    done = threading.Event()

    def sink(out):
        outputs.append(out)
        if out.finish_reason:
            done.set()

    engine.submit(Request(PROMPTS[0], 8, sink, params=SAMPLE, seed=1, logprobs=3))
    assert done.wait(60)
    other.wait()
    tokens = [o.token for o in outputs]
    with torch.no_grad():
        logits = model(torch.tensor([PROMPTS[0] + tokens])).logits[0]
    expected = torch.log_softmax(logits[len(PROMPTS[0]) - 1 : -1], dim=-1)  # (tokens, V)
    got = torch.tensor([o.logprob for o in outputs])
    torch.testing.assert_close(got, expected[torch.arange(8), torch.tensor(tokens)])
    for out, row in zip(outputs, expected):
        top = row.topk(3)
        assert [t for t, _ in out.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in out.top_logprobs]), top.values)


def test_prompt_logprobs_in_chunks_equal_one_forward(engine_factory, monkeypatch):
    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_CHUNK", 3)  # several chunks and a tail
    model = model_of(torch.float32)
    engine = engine_factory(model)
    outputs = []
    done = threading.Event()

    def sink(out):
        outputs.append(out)
        done.set()

    prompt = PROMPTS[3][:11]
    engine.submit(Request(prompt, 0, sink, logprobs=2, prompt_logprobs=True))
    assert done.wait(60)
    (out,) = outputs
    assert out.token is None and out.finish_reason == "length"
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    assert out.prompt_logprobs[0] == (None, [])
    got = torch.tensor([lp for lp, _ in out.prompt_logprobs[1:]])
    torch.testing.assert_close(got, logprobs.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0])
    tops = [[t for t, _ in top] for _, top in out.prompt_logprobs[1:]]
    assert tops == logprobs.topk(2).indices.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_load_counts_every_token_in_every_layer(engine_factory, dtype):
    """bf16 runs the decode kernels: they must still hand back router logits."""
    model = model_of(dtype)
    engine = engine_factory(model, max_batch_size=2)
    got = [submit(engine, p, 6, return_routing=True) for p in PROMPTS[:3]]
    for g in got:
        g.wait()
        assert len(g.experts[0]) == 6
        assert all(len(layer) == model.config.num_experts_per_tok for layer in g.experts[0][-1])
    loads = engine.stats.expert_tokens
    assert loads.shape == (model.config.num_hidden_layers, model.config.num_experts)
    fed = sum(len(p) for p in PROMPTS[:3]) + 3 * 5  # prompts, then every token but the last
    assert loads.sum(dim=1).tolist() == [fed * model.config.num_experts_per_tok] * len(loads)


# ---------------------------------------------------------------------------- lifecycle
def test_cancel_frees_the_row_and_the_queue_is_bounded(engine_factory):
    model = model_of(torch.float32)
    engine = engine_factory(model, max_batch_size=1, max_queue=1)
    started = threading.Event()
    request = Request(PROMPTS[0], 120, lambda out: started.set())
    engine.submit(request)
    assert started.wait(60)
    waiting = submit(engine, PROMPTS[1], 5)  # queued behind the running one
    with pytest.raises(QueueFull):
        submit(engine, PROMPTS[2], 5)
    request.cancel()
    assert waiting.wait().tokens[0] == expected_greedy(model, PROMPTS[1], 5)
    assert engine.stats.cancelled == 1
    assert engine.stats.running == 0


def test_stop_finishes_the_accepted_work_first(engine_factory):
    model = model_of(torch.float32)
    engine = Engine(model, None, max_batch_size=1)
    got = [submit(engine, p, 8) for p in PROMPTS[:3]]
    engine.start()
    assert engine.alive
    engine.stop()
    assert not engine.alive
    assert [g.wait().tokens[0] for g in got] == [expected_greedy(model, p, 8) for p in PROMPTS[:3]]
    with pytest.raises(QueueFull, match="shutting down"):
        submit(engine, PROMPTS[0], 3)


def test_an_expert_choice_model_is_refused():
    with pytest.raises(InputError, match="expert choice"):
        Engine(tiny_model(moe_routing="expert_choice"), tokenizer=None)


def test_a_model_with_dense_layers_serves_and_counts_its_moe_layers():
    model = tiny_model(num_hidden_layers=3, mlp_only_layers=[1])
    engine = Engine(model, tokenizer=None)
    assert engine.stats.expert_tokens.shape == (2, model.config.num_experts)
