"""Incremental decoding through the KV cache gives the logits of one full forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from olmoe import KVCache
from tests.conftest import tiny_model
from tests.parity import reference_from

TOL = dict(atol=1e-5, rtol=1e-5)


def decode_step_by_step(
    model, ids, prompt_length, attention_mask=None, position_ids=None, cache=None
):
    """Prefill `prompt_length` tokens, then feed the rest one at a time; return all logits."""
    with torch.no_grad():

        def window(t, end, start=0):
            return None if t is None else t[:, start:end]

        out = model(
            ids[:, :prompt_length],
            attention_mask=window(attention_mask, prompt_length),
            position_ids=window(position_ids, prompt_length),
            past_key_values=cache,
            use_cache=True,
        )
        logits, cache = [out.logits], out.past_key_values
        for t in range(prompt_length, ids.shape[1]):
            out = model(
                ids[:, t : t + 1],
                attention_mask=window(attention_mask, t + 1),
                position_ids=window(position_ids, t + 1, t),
                past_key_values=cache,
                use_cache=True,
            )
            logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(
    "overrides",
    [{}, {"num_key_value_heads": 1}, {"rope_scaling": {"type": "linear", "factor": 3.0}}],
)
def test_incremental_decoding_equals_full_forward(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
    for prompt_length in (1, 4):
        stepped, cache = decode_step_by_step(model, ids, prompt_length)
        assert_close(stepped, full, **TOL)
        assert cache.get_seq_length() == ids.shape[1]


def test_left_padded_batch_decoding_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(2, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=position_ids).logits
    stepped, _ = decode_step_by_step(model, ids, 6, attention_mask=mask, position_ids=position_ids)
    real = mask.bool()
    assert_close(stepped[real], full[real], **TOL)


def test_cached_decoding_matches_reference_cache(tmp_path):
    """Also against transformers' own cached decoding, prompt then three steps."""
    model = tiny_model()
    ref = reference_from(model, tmp_path, attn_implementation=None)
    ids = torch.randint(0, 128, (2, 8))
    ours, _ = decode_step_by_step(model, ids, 5)
    with torch.no_grad():
        out = ref(ids[:, :5], use_cache=True)
        theirs, cache = [out.logits], out.past_key_values
        for t in range(5, 8):
            out = ref(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            theirs.append(out.logits)
            cache = out.past_key_values
    assert_close(ours, torch.cat(theirs, dim=1), **TOL)


def test_preallocated_cache_never_reallocates():
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 10))
    cache = KVCache(model.config.num_hidden_layers, capacity=10)
    with torch.no_grad():
        model(ids[:, :3], past_key_values=cache)
        pointers = [k.data_ptr() for k in cache.keys]
        for t in range(3, 10):
            model(ids[:, t : t + 1], past_key_values=cache)
    assert [k.data_ptr() for k in cache.keys] == pointers
    assert cache.keys[0].shape[2] == 10


def test_growing_cache_doubles():
    cache = KVCache(1)
    pointers = set()
    for _ in range(33):
        cache.update(0, torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
        pointers.add(cache.keys[0].data_ptr())
    assert cache.get_seq_length() == 33
    assert len(pointers) <= 7  # 1, 2, 4, 8, 16, 32, 64: amortised, not one per token
    keys, values = cache.layer(0)
    assert keys.shape == values.shape == (1, 2, 33, 4)


def test_cache_position_rewrites_a_step():
    """Writing at an explicit cache position replaces that step, as a retried step does."""
    model = tiny_model()
    ids = torch.randint(0, 128, (1, 6))
    other = ids.clone()
    other[0, 5] = (ids[0, 5] + 1) % 128
    with torch.no_grad():
        expected = model(other).logits[:, -1]
        cache = model(ids).past_key_values  # all six tokens cached
        got = model(other[:, 5:], past_key_values=cache, cache_position=torch.tensor([5])).logits[
            :, -1
        ]
    assert_close(got, expected, **TOL)
    assert cache.get_seq_length() == 6


def test_legacy_tuple_cache_round_trip():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        legacy = model(ids[:, :6]).past_key_values.to_legacy()
        assert len(legacy) == model.config.num_hidden_layers
        got = model(ids[:, 6:], past_key_values=legacy).logits[:, -1]
    assert_close(got, full, **TOL)


def test_crop_and_reorder():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        cache = model(ids).past_key_values
        cache.crop(4)
        assert cache.get_seq_length() == 4
        cropped_next = model(ids[:, 4:5], past_key_values=cache).logits
        assert_close(cropped_next, model(ids[:, :5]).logits[:, -1:], **TOL)
        cache.reorder(torch.tensor([1]))
        swapped = model(ids[1:, 5:6], past_key_values=cache).logits
        assert_close(swapped, model(ids[1:]).logits[:, -1:], **TOL)


def test_use_cache_false_returns_no_cache():
    model = tiny_model()
    out = model(torch.randint(0, 128, (1, 4)), use_cache=False)
    assert out.past_key_values is None


def test_update_writes_exactly_the_given_positions_consecutive_or_not():
    cache = KVCache(1, capacity=8)
    keys = torch.arange(2 * 4 * 3, dtype=torch.float32).view(1, 2, 4, 3)
    cache.update(0, keys, -keys, torch.arange(4))  # consecutive: a plain copy
    new = torch.full((1, 2, 3, 3), 100.0)
    new[:, :, 1] = 200.0
    cache.update(0, new, -new, torch.tensor([5, 1, 6]))  # scattered: each where it is told
    got, got_values = cache.layer(0)
    assert cache.get_seq_length() == 7 and got.shape == (1, 2, 7, 3)
    assert torch.equal(got[:, :, [0, 2, 3]], keys[:, :, [0, 2, 3]])
    assert (got[:, :, 5] == 100).all() and (got[:, :, 1] == 200).all()
    written = [0, 1, 2, 3, 5, 6]  # position 4 was never written
    assert (got[:, :, 6] == 100).all() and torch.equal(
        got_values[:, :, written], -got[:, :, written]
    )
