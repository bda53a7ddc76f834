"""Parity with the reference: transformers' OlmoeForCausalLM, float32, tiny random models.

Weights always cross through our checkpoint code: saved by olmoe and loaded by transformers, or
saved by transformers and loaded by olmoe.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch.testing import assert_close

from olmoe import OlmoeForCausalLM
from tests.conftest import randomize, tiny_model
from tests.parity import TOL, assert_outputs_match, reference_config, reference_from, run_both

VARIANTS = {
    "base": {},
    "gqa": {"num_key_value_heads": 2},
    "mqa": {"num_key_value_heads": 1},
    "clip_qkv": {"clip_qkv": 0.3},
    "norm_topk_prob": {"norm_topk_prob": True},
    "rope_linear": {"rope_scaling": {"type": "linear", "factor": 2.0}},
    # max_position_embeddings below the sequence length, so the dynamic base actually grows
    "rope_dynamic": {
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "max_position_embeddings": 8,
    },
    "tied_embeddings": {"tie_word_embeddings": True},
    "attention_bias": {"attention_bias": True},
    "top1_of_4": {"num_experts": 4, "num_experts_per_tok": 1},
    "rope_theta": {"rope_theta": 500000.0},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_matches_reference(variant, tmp_path):
    ours = tiny_model(**VARIANTS[variant])
    ref = reference_from(ours, tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 12))
    mine, theirs = run_both(ours, ref, input_ids=ids, labels=ids)
    assert_outputs_match(mine, theirs)


def test_loading_reference_checkpoint_matches(tmp_path):
    """The reverse direction: transformers saves, olmoe loads."""
    torch.manual_seed(0)
    config = reference_config(num_key_value_heads=2, clip_qkv=1.5)
    ref = randomize(transformers.OlmoeForCausalLM(config)).eval()
    ref.config._attn_implementation = "eager"
    ref.save_pretrained(tmp_path)
    ours = OlmoeForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 128, (3, 9))
    mine, theirs = run_both(ours, ref, input_ids=ids, labels=ids)
    assert_outputs_match(mine, theirs)


def test_sdpa_path_matches_reference_sdpa(tmp_path):
    """Without output_attentions we use fused SDPA; so does the reference by default."""
    ours = tiny_model(num_key_value_heads=2)
    ours.save_pretrained(tmp_path)
    ref = transformers.OlmoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, **TOL)


def test_padded_batch_with_attention_mask(tmp_path):
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    ids = torch.randint(2, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, :1] = 0
    ids[mask == 0] = ours.config.pad_token_id
    for position_ids in (None, (mask.cumsum(-1) - 1).clamp(min=0)):
        mine, theirs = run_both(
            ours, ref, input_ids=ids, attention_mask=mask, position_ids=position_ids
        )
        assert_outputs_match(mine, theirs, labels=False)
    # the padding really is masked: changing padded tokens changes no real position's logits
    other = ids.clone()
    other[mask == 0] = 7
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).logits
        b = ours(other, attention_mask=mask).logits
    assert_close(a[mask.bool()], b[mask.bool()], **TOL)
    assert not torch.allclose(a[~mask.bool()], b[~mask.bool()])


def test_padded_aux_loss_ignores_padding(tmp_path):
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    ids = torch.randint(2, 128, (2, 8))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    labels = ids.masked_fill(mask == 0, -100)
    mine, theirs = run_both(ours, ref, input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(mine.aux_loss, theirs.aux_loss, **TOL)
    assert_close(mine.loss, theirs.loss, **TOL)
    unmasked = ours(ids, output_router_logits=True).aux_loss
    assert not torch.allclose(unmasked, mine.aux_loss)


@pytest.mark.parametrize("keep", [1, 3, torch.tensor([0, 4, 5])])
def test_num_logits_to_keep(keep, tmp_path):
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        mine = ours(ids, num_logits_to_keep=keep).logits
        theirs = ref(ids, logits_to_keep=keep).logits
        full = ours(ids).logits
    assert_close(mine, theirs, **TOL)
    expected = full[:, keep] if isinstance(keep, torch.Tensor) else full[:, -keep:]
    assert_close(mine, expected, **TOL)
    assert_close(ours(ids, logits_to_keep=keep).logits, mine, **TOL)  # transformers 5's name


def test_inputs_embeds(tmp_path):
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    embeds = torch.randn(2, 7, ours.config.hidden_size)
    mine, theirs = run_both(ours, ref, inputs_embeds=embeds)
    assert_outputs_match(mine, theirs, labels=False)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        by_ids = ours(ids).logits
        by_embeds = ours(inputs_embeds=ours.get_input_embeddings()(ids)).logits
    assert_close(by_ids, by_embeds, atol=0, rtol=0)


def test_gradients_match_reference(tmp_path):
    """Training stands on the backward pass: grouped-GEMM experts included."""
    ours = tiny_model(num_key_value_heads=2).train()
    ref = reference_from(ours, tmp_path).train()
    ids = torch.randint(0, 128, (2, 9))
    for model in (ours, ref):
        model(ids, labels=ids, output_router_logits=True).loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, ref_params[name].grad, **TOL, msg=name)


def test_return_dict_false_gives_reference_tuple(tmp_path):
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        mine = ours(ids, labels=ids, use_cache=False, return_dict=False)
        theirs = ref(ids, labels=ids, use_cache=False, return_dict=False)
    assert len(mine) == len(theirs) == 2  # (loss, logits)
    for a, b in zip(mine, theirs):
        assert_close(a, b, **TOL)


def test_bfloat16_as_close_to_float32_as_the_reference_in_bfloat16(tmp_path):
    """bf16 rounding through random tiny layers costs a few percent on its own, so the bound is
    the reference's own bf16 error, not a fixed number."""
    ours = tiny_model()
    ref = reference_from(ours, tmp_path)
    ref_bf16 = transformers.OlmoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = ref(ids).logits
        theirs = ref_bf16(ids).logits.float()
        got = OlmoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)(ids).logits.float()

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert got.dtype == torch.float32 and relative(theirs, expected) < 0.1
    assert relative(got, expected) <= 1.1 * relative(theirs, expected) + 1e-3
    assert relative(got, theirs) < 1e-2


def test_attention_dropout_only_in_training():
    model = tiny_model(attention_dropout=0.5)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        eval_a, eval_b = model(ids).logits, model(ids).logits
        assert torch.equal(eval_a, eval_b)
        model.train()
        for output_attentions in (False, True):
            train = model(ids, output_attentions=output_attentions).logits
            assert not torch.allclose(train, eval_a)


# ---------------------------------------------------------------------------- dense OLMo
def olmo_config(**overrides) -> transformers.OlmoConfig:
    """transformers' config of a tiny dense OLMo (the OLMo-1B-0724 family's shape, scaled)."""
    settings = dict(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
                    eos_token_id=0, clip_qkv=0.5)  # fmt: skip
    return transformers.OlmoConfig(**{**settings, **overrides})


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2, "clip_qkv": None}])
def test_dense_olmo_both_directions(overrides, tmp_path):
    """transformers' OlmoForCausalLM saves, olmoe loads; olmoe saves, transformers loads: the
    same logits, hidden states and attention probabilities, and the same files."""
    torch.manual_seed(0)
    ref = randomize(transformers.OlmoForCausalLM(olmo_config(**overrides))).eval()
    ref.config._attn_implementation = "eager"
    ref.save_pretrained(tmp_path / "theirs")
    ours = OlmoeForCausalLM.from_pretrained(tmp_path / "theirs")
    assert ours.config.is_dense_olmo and ours.config.dense_width == 40
    ids = torch.randint(0, 128, (2, 11))
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        mine, theirs = ours(ids, labels=ids, **kwargs), ref(ids, labels=ids, **kwargs)
    assert_close(mine.logits, theirs.logits, **TOL)
    assert_close(mine.loss, theirs.loss, **TOL)
    for name in ("hidden_states", "attentions"):
        for a, b in zip(getattr(mine, name), getattr(theirs, name), strict=True):
            assert_close(a, b, **TOL)

    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["model_type"] == "olmo" and written["intermediate_size"] == 40
    back = transformers.OlmoForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    with torch.no_grad():
        assert_close(back(ids).logits, theirs.logits, **TOL)
    assert sorted(load_file(tmp_path / "ours" / "model.safetensors")) == sorted(
        load_file(tmp_path / "theirs" / "model.safetensors")
    )
