"""Generation: greedy parity with transformers' `generate`, batching, sampling, stopping."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers
from torch.testing import assert_close

from olmoe import SamplingParams
from olmoe.generation import (
    apply_repetition_penalty,
    generate_tokens,
    next_tokens,
    plan_new_tokens,
    process_logits,
    prompt_positions,
    top_k_filter,
    top_p_filter,
)
from tests.conftest import tiny_model
from tests.parity import reference_from

PROMPTS = [[5, 17, 42, 7, 99, 3], [8, 9], [77, 12, 61, 30]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny random olmoe model and transformers' copy of it, loaded from olmoe's save."""
    ours = tiny_model(seed=3, eos_token_id=None)  # no eos unless a test asks for one
    ref = reference_from(ours, tmp_path_factory.mktemp("tiny"), attn_implementation=None)
    return ours, ref


def left_pad(prompts, pad=1):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference_generate(ref, ids, mask=None, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ref.generate(ids, attention_mask=mask, do_sample=False, **kwargs)


# ---------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers_single_prompt(pair, prompt):
    ours, ref = pair
    ids = torch.tensor([prompt])
    mine = ours.generate(ids, max_new_tokens=24)
    theirs = reference_generate(ref, ids, max_new_tokens=24)
    assert mine.shape == (1, len(prompt) + 24)
    assert torch.equal(mine, theirs)


def test_greedy_matches_transformers_left_padded_batch(pair):
    ours, ref = pair
    ids, mask = left_pad(PROMPTS)
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=20)
    theirs = reference_generate(ref, ids, mask, max_new_tokens=20)
    assert torch.equal(mine, theirs)


def test_each_sequence_stops_at_its_own_eos_like_transformers(pair):
    ours, ref = pair
    ids, mask = left_pad(PROMPTS)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=20)
    new = free[:, ids.shape[1] :]
    # An eos that the first sequence reaches early and the others later or never.
    eos = int(new[0, 3])
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos)
    theirs = reference_generate(ref, ids, mask, max_new_tokens=20, eos_token_id=eos)
    assert torch.equal(mine, theirs)
    first = mine[0, ids.shape[1] :].tolist()
    stop = first.index(eos)
    assert all(t == ours.config.pad_token_id for t in first[stop + 1 :])
    assert mine.shape[1] <= free.shape[1]


def test_model_card_defaults_max_length_counts_the_prompt(pair):
    ours, ref = pair
    ids = torch.tensor([PROMPTS[0]])
    mine = ours.generate(ids, max_length=15)
    theirs = reference_generate(ref, ids, max_length=15)
    assert mine.shape[1] == 15
    assert torch.equal(mine, theirs)
    assert ours.generate(ids).shape[1] == 20  # transformers' default length


def test_batch_generates_what_each_prompt_generates_alone(pair):
    ours, _ = pair
    ids, mask = left_pad(PROMPTS)
    batch = ours.generate(ids, attention_mask=mask, max_new_tokens=16)
    for row, prompt in enumerate(PROMPTS):
        alone = ours.generate(torch.tensor([prompt]), max_new_tokens=16)
        assert batch[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_one_dimensional_prompt_and_list_input(pair):
    ours, _ = pair
    a = ours.generate(torch.tensor(PROMPTS[1]), max_new_tokens=4)
    b = ours.generate([PROMPTS[1]], max_new_tokens=4)
    assert a.shape == (1, 6) and torch.equal(a, b)


# ---------------------------------------------------------------------------- sampling
def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(pair):
    ours, _ = pair
    ids = torch.tensor([PROMPTS[0]])

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return ours.generate(
            ids,
            max_new_tokens=30,
            do_sample=True,
            temperature=1.5,
            generator=gen,
        )

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


def test_top_k_one_equals_greedy(pair):
    ours, _ = pair
    ids, mask = left_pad(PROMPTS)
    greedy = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    sampled = ours.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=True,
        top_k=1,
        temperature=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(greedy, sampled)


def test_greedy_with_repetition_penalty_matches_transformers(pair):
    ours, ref = pair
    ids = torch.tensor([PROMPTS[0]])
    mine = ours.generate(ids, max_new_tokens=20, repetition_penalty=1.8)
    theirs = reference_generate(ref, ids, max_new_tokens=20, repetition_penalty=1.8)
    assert torch.equal(mine, theirs)
    plain = ours.generate(ids, max_new_tokens=20)
    assert not torch.equal(mine, plain)


def test_top_k_filter_on_crafted_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 9.0, 0.0, 1.0]])
    out = top_k_filter(logits, 2)
    inf = -math.inf
    assert out.tolist() == [[inf, 5.0, inf, 4.0, inf], [inf, inf, 9.0, inf, 1.0]]
    assert torch.equal(top_k_filter(logits, 10), logits)  # k beyond the vocabulary keeps all


def test_top_p_filter_on_crafted_logits():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()

    def kept(p):
        return torch.isfinite(top_p_filter(logits, p))[0].tolist()

    assert kept(0.5) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]
    assert kept(0.01) == [True, False, False, False]  # the most probable always stays
    # and it agrees with transformers' warper on random logits
    random_logits = torch.randn(4, 50)
    reference = transformers.TopPLogitsWarper(0.6)(None, random_logits.clone())
    assert torch.equal(torch.isfinite(top_p_filter(random_logits, 0.6)), torch.isfinite(reference))


def test_repetition_penalty_on_crafted_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[0, 1, 1]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]
    reference = transformers.RepetitionPenaltyLogitsProcessor(2.0)(seen, logits.clone())
    assert_close(apply_repetition_penalty(logits, seen, 2.0), reference)


def test_process_logits_order_matches_transformers():
    logits = torch.randn(3, 40)
    seen = torch.randint(0, 40, (3, 6))
    params = SamplingParams(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3
    )
    reference = logits.clone()
    for processor in (
        transformers.RepetitionPenaltyLogitsProcessor(1.3),
        transformers.TemperatureLogitsWarper(0.7),
        transformers.TopKLogitsWarper(10),
        transformers.TopPLogitsWarper(0.8),
    ):
        reference = processor(seen, reference)
    assert_close(process_logits(logits, params, seen), reference)


def test_sampling_draws_only_kept_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(200, 1)
    params = SamplingParams(do_sample=True, top_k=2)
    drawn = next_tokens(logits, params, generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 2}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_sampling_settings_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(do_sample=True, **kwargs)


# ---------------------------------------------------------------------------- lengths
def test_prompt_longer_than_the_context_window_is_refused(pair):
    ours, _ = pair
    window = ours.config.max_position_embeddings
    with pytest.raises(ValueError, match="context window"):
        ours.generate(torch.ones(1, window, dtype=torch.long), max_new_tokens=1)


def test_generation_stops_at_the_context_window(pair):
    ours, _ = pair
    window = ours.config.max_position_embeddings
    ids = torch.tensor([PROMPTS[0]])
    with pytest.warns(UserWarning, match="context window"):
        out = ours.generate(ids, max_new_tokens=window)
    assert out.shape[1] == window


def test_plan_new_tokens_rules():
    assert plan_new_tokens(5, 100, max_length=64) == 59
    assert plan_new_tokens(5, 100, max_length=64, max_new_tokens=3) == 3  # max_new_tokens wins
    assert plan_new_tokens(5, 100) == 15
    with pytest.raises(ValueError, match="max_length"):
        plan_new_tokens(5, 100, max_length=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        plan_new_tokens(5, 100, max_new_tokens=0)


def test_prompt_positions_count_from_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert prompt_positions(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]


def test_generate_tokens_reports_each_finished_sequence(pair):
    ours, _ = pair
    ids, mask = left_pad(PROMPTS)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=10)
    eos = int(free[1, ids.shape[1] + 2])
    steps = list(generate_tokens(ours, ids, 10, mask, eos_token_id=eos, pad_token_id=1))
    finished_at = [next((i for i, s in enumerate(steps) if s.finished[r]), None) for r in range(3)]
    assert finished_at[1] is not None and finished_at[1] <= 2
    assert steps[finished_at[1]].tokens[1] == eos
