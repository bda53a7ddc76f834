"""Prompt prefixes kept by the engine: which prefix is found, what is evicted, and that a prompt
prefilled past a kept prefix continues as a whole prefill does."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from olmoe.cache import KVCache
from olmoe.serve.prefixes import MIN_SHARED_TOKENS, PrefixCache, copy_prefix
from tests.conftest import tiny_model
from tests.serve.engines import model_of, submit

SHARED = list(range(10, 10 + 2 * MIN_SHARED_TOKENS))  # the few-shot examples, say


def cache_of(length: int) -> KVCache:
    cache = KVCache(1)
    cache.update(0, torch.arange(length, dtype=torch.float32).view(1, 1, length, 1),
                 torch.zeros(1, 1, length, 1))  # fmt: skip
    return cache


def test_the_longest_shared_prefix_is_found_and_the_last_token_left_to_compute():
    prefixes = PrefixCache(max_tokens=1000)
    short, long = SHARED[:MIN_SHARED_TOKENS], SHARED + [1, 2]
    prefixes.add(short, cache_of(len(short)))
    prefixes.add(long, cache_of(len(long)))
    assert prefixes.longest_prefix(SHARED + [1, 3])[0] == len(SHARED) + 1
    assert prefixes.longest_prefix(long)[0] == len(long) - 1  # the same prompt again
    assert prefixes.longest_prefix(SHARED[: MIN_SHARED_TOKENS - 1] + [0] * 50) == (0, None)
    assert prefixes.reused_tokens == len(SHARED) + 1 + len(long) - 1


def test_the_least_recently_used_prompts_go_first_when_the_budget_is_full():
    prompts = [[p] + SHARED for p in range(4)]
    prefixes = PrefixCache(max_tokens=3 * len(prompts[0]))  # room for three
    for prompt in prompts[:3]:
        prefixes.add(prompt, cache_of(len(prompt)))
    assert prefixes.longest_prefix(prompts[0] + [7])[0] == len(prompts[0])  # used: kept
    prefixes.add(prompts[3], cache_of(len(prompts[3])))  # over the budget: prompt 1 goes
    assert prefixes.longest_prefix(prompts[1] + [7]) == (0, None)
    assert prefixes.longest_prefix(prompts[0] + [7])[0] == len(prompts[0])
    prefixes.add(list(range(3 * len(prompts[0]) + 1)), cache_of(1))  # larger than all: not kept
    assert prefixes.longest_prefix(prompts[2] + [7])[0] == len(prompts[2])


def test_prefilling_past_a_copied_prefix_gives_the_whole_prefill_s_logits():
    model = tiny_model(seed=2).float().eval()
    prompt = torch.tensor([SHARED + [5, 6, 7]])
    length, shared = prompt.shape[1], len(SHARED)
    with torch.no_grad():
        whole = KVCache(model.config.num_hidden_layers)
        expected = model(prompt, past_key_values=whole, use_cache=True).logits[:, -1]
        first = KVCache(model.config.num_hidden_layers)
        model(prompt[:, :shared], past_key_values=first, use_cache=True)
        cache = copy_prefix(first, shared, capacity=length)
        got = model(prompt[:, shared:], past_key_values=cache, use_cache=True,
                    cache_position=torch.arange(shared, length)).logits[:, -1]  # fmt: skip
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for layer in range(model.config.num_hidden_layers):
        assert_close(cache.layer(layer), whole.layer(layer), rtol=1e-5, atol=1e-6)


def test_the_engine_reuses_a_kept_prefix_and_generates_what_it_would_without(engine_factory):
    prompts = [SHARED + [5, 6], SHARED + [7], SHARED + [7]]
    plain = engine_factory(model_of(torch.float32))
    kept = engine_factory(model_of(torch.float32), prefix_cache_tokens=1000)
    for prompt in prompts:  # one at a time, so that each finds the one before
        expected = submit(plain, prompt, 8).wait().tokens
        assert submit(kept, prompt, 8, return_routing=True).wait().tokens == expected
    assert kept.prefixes.reused_tokens == 2 * len(SHARED)  # the last token is computed
    assert plain.prefixes is None
