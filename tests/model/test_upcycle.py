"""Sparse upcycling: a dense model's MLP copied into every expert."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe.cli import main
from olmoe.errors import InputError
from olmoe.upcycle import upcycle
from tests.conftest import randomize


def dense_model(seed=0, **overrides) -> OlmoeForCausalLM:
    """A tiny dense OLMo: every layer an MLP of width 24, OLMo's norms, no QK-norm."""
    torch.manual_seed(seed)
    config = OlmoeConfig.tiny(mlp_only_layers=[0, 1], dense_intermediate_size=24,
                              norm_type="nonparametric_layernorm", qk_norm=False, **overrides)
    return randomize(OlmoeForCausalLM(config), seed).eval()  # fmt: skip


def test_upcycled_model_computes_the_dense_function():
    """Renormalised top-k, no noise: the K chosen experts are one MLP whose weights sum to 1."""
    dense = dense_model()
    moe = upcycle(dense, num_experts=4, top_k=2, norm_topk_prob=True)
    assert moe.config.moe_layer_indices == [0, 1] and moe.config.intermediate_size == 24
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
        routing = moe(ids, output_routing=True).routing
    assert all(r.tokens_per_expert.sum() == 2 * 18 for r in routing)
    experts = moe.model.layers[0].mlp.experts
    mlp = dense.model.layers[0].mlp
    for e in range(4):
        assert torch.equal(experts.gate_up_proj[e, :24], mlp.gate_proj.weight)
        assert torch.equal(experts.gate_up_proj[e, 24:], mlp.up_proj.weight)
        assert torch.equal(experts.down_proj[e], mlp.down_proj.weight)
    router = moe.model.layers[0].mlp.gate.weight
    assert 0.01 < float(router.detach().std()) < 0.03  # normal(0, 0.02)


def test_without_renormalisation_the_output_is_scaled_by_the_top_k_mass():
    dense = dense_model()
    moe = upcycle(dense, num_experts=4, top_k=2)
    with torch.no_grad():
        logits = moe(torch.randint(0, 128, (1, 5))).logits
    assert torch.isfinite(logits).all()
    assert not moe.config.norm_topk_prob


def test_noise_replaces_about_that_fraction_of_each_expert():
    dense = dense_model()
    moe = upcycle(dense, num_experts=4, top_k=2, noise=0.5, seed=1)
    copied = torch.cat([dense.model.layers[1].mlp.gate_proj.weight,
                        dense.model.layers[1].mlp.up_proj.weight])  # fmt: skip
    stacked = moe.model.layers[1].mlp.experts.gate_up_proj
    kept = (stacked == copied).float().mean(dim=(1, 2))  # per expert
    assert ((kept > 0.4) & (kept < 0.6)).all()
    assert not torch.equal(stacked[0], stacked[1])  # each expert its own noise


def test_shared_expert_and_dense_every():
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(num_hidden_layers=4, mlp_only_layers=[0, 1, 2, 3],
                              dense_intermediate_size=24)  # fmt: skip
    dense = randomize(OlmoeForCausalLM(config)).eval()
    moe = upcycle(dense, num_experts=4, top_k=2, shared_expert=True, dense_every=2)
    assert moe.config.mlp_only_layers == [1, 3] and moe.config.moe_layer_indices == [0, 2]
    assert torch.equal(moe.model.layers[1].mlp.up_proj.weight,
                       dense.model.layers[1].mlp.up_proj.weight)  # fmt: skip
    shared = moe.model.layers[0].mlp.shared_expert
    assert torch.equal(shared.down_proj.weight, dense.model.layers[0].mlp.down_proj.weight)


def test_an_moe_model_is_refused():
    torch.manual_seed(0)
    with pytest.raises(InputError, match="starts from a dense model"):
        upcycle(OlmoeForCausalLM(OlmoeConfig.tiny()), num_experts=4, top_k=2)


def test_command_line_writes_a_checkpoint_training_continues_from(tmp_path, capsys):
    dense = dense_model()
    dense.save_pretrained(tmp_path / "dense")
    out = tmp_path / "moe"
    code = main(["upcycle", str(tmp_path / "dense"), str(out), "--experts", "4", "--top-k", "2",
                 "--norm-topk-prob"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0 and "parameters" in err
    assert "olmoe: note: transformers' OlmoeForCausalLM cannot represent" in err  # one line
    moe = OlmoeForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    assert main(["upcycle", str(tmp_path / "dense"), str(out), "--experts", "4",
                 "--top-k", "2"]) == 1  # OUT not empty  # fmt: skip
