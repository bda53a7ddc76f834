"""The OLMoE paper's design switches (olmoe.config.DESIGN_SWITCHES): token dropping and expert
choice against hand-worked examples, the shared expert and dense layers against their formulas,
and every switch saved and loaded back exactly."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from olmoe import OlmoeConfig, OlmoeForCausalLM
from olmoe.config import DESIGN_SWITCHES
from olmoe.errors import ConfigError, InputError
from olmoe.moe import (
    OlmoeSparseMoeBlock,
    RouterOutput,
    capacity_mask,
    expert_capacity,
    expert_choice,
    grouped_experts,
)
from tests.conftest import randomize, tiny_model

SWITCHED = {
    "shared_expert": {"shared_expert_intermediate_size": 12},
    "shared_expert_weighted": {"shared_expert_intermediate_size": 12,
                               "shared_expert_weighted": True},
    "token_dropping": {"moe_dropless": False, "moe_capacity_factor": 1.0},
    "expert_choice": {"moe_routing": "expert_choice"},
    "expert_choice_batch": {"moe_routing": "expert_choice", "expert_choice_group": "batch"},
    "no_qk_norm": {"qk_norm": False},
    "layernorm": {"norm_type": "nonparametric_layernorm"},
    "dense_layer": {"mlp_only_layers": [1], "dense_intermediate_size": 20},
    "dense_model": {"mlp_only_layers": [0, 1]},
}  # fmt: skip


def expert_output(block: OlmoeSparseMoeBlock, e: int, x: torch.Tensor) -> torch.Tensor:
    """down_e(silu(gate_e x) * up_e x) in float64."""
    gate_up, down = block.experts.gate_up_proj[e].double(), block.experts.down_proj[e].double()
    inter = down.shape[-1]
    x = x.double()
    return down @ (F.silu(gate_up[:inter] @ x) * (gate_up[inter:] @ x))


def mlp_output(mlp, x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    gate, up, down = (getattr(mlp, n).weight.double() for n in ("gate_proj", "up_proj", "down_proj"))
    return F.silu(x @ gate.T) * (x @ up.T) @ down.T


def block(seed=0, **overrides) -> OlmoeSparseMoeBlock:
    torch.manual_seed(seed)
    return randomize(OlmoeSparseMoeBlock(OlmoeConfig.tiny(**overrides)), seed, std=0.3)


# ---------------------------------------------------------------------------- token dropping
def test_capacity_keeps_each_experts_first_slots_in_token_order():
    """4 tokens, 4 experts, top-2, capacity factor 1.0: capacity int(1.0 * 2 * 4 / 4) = 2.
    Expert 0 is chosen by token 0 (slot 0), token 1 (slot 0), token 2 (slot 0) and token 3
    (slot 1): it keeps tokens 0 and 1 and drops the slots of tokens 2 and 3. Experts 1, 2, 3
    are within capacity."""
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0]])
    assert expert_capacity(tokens=4, top_k=2, num_experts=4, factor=1.0) == 2
    kept = capacity_mask(indices, num_experts=4, capacity=2)
    assert kept.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    assert capacity_mask(indices, 4, capacity=1).tolist() == [
        [True, True], [False, True], [False, False], [True, False]
    ]  # fmt: skip


def test_capacity_zero_means_dropless():
    assert expert_capacity(tokens=1, top_k=8, num_experts=64, factor=1.25) == 0  # a decode step
    b = block(moe_dropless=False)
    with torch.no_grad():
        _, routing = b(torch.randn(1, 1, 32))
    assert routing.kept is None and routing.dropped == 0


def test_dropped_slots_add_nothing_and_are_counted():
    b = block(moe_dropless=False, moe_capacity_factor=0.5, num_experts=4, num_experts_per_tok=2)
    x = torch.randn(1, 12, 32)
    with torch.no_grad():
        y, routing = b(x)
    capacity = int(0.5 * 2 * 12 / 4)
    assert routing.kept is not None and routing.dropped > 0
    assert (torch.bincount(routing.top_k_indices[routing.kept], minlength=4) <= capacity).all()
    assert routing.dropped == int((~routing.kept).sum())
    expected = torch.zeros(12, 32, dtype=torch.float64)
    for t in range(12):
        for slot in range(2):
            if routing.kept[t, slot]:
                e = int(routing.top_k_indices[t, slot])
                weight = routing.top_k_weights[t, slot].double()
                expected[t] += weight * expert_output(b, e, x[0, t])
    assert_close(y[0].double(), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- expert choice
def test_expert_choice_by_hand():
    """One sequence of 4 tokens, 2 experts, K = 1: each expert takes (1 * 4) // 2 = 2 tokens,
    those with the highest probability for it. Token 1 is taken by both, token 3 by none."""
    probs_e0 = torch.tensor([0.9, 0.6, 0.2, 0.45])
    logits = torch.stack([probs_e0.log(), (1 - probs_e0).log()], dim=-1)  # softmax gives them back
    routing = expert_choice(logits, top_k=1, group_size=4)
    # expert 0: tokens 0 (0.9) and 1 (0.6); expert 1: tokens 2 (0.8) and 3 (0.55)
    assert routing.expert_mask.tolist() == [[True, False], [True, False], [False, True],
                                            [False, True]]  # fmt: skip
    logits[1] = torch.tensor([0.5, 0.5]).log()  # token 1 now 0.5 / 0.5
    logits[3] = torch.tensor([0.1, 0.9]).log()
    routing = expert_choice(logits, top_k=1, group_size=4)
    # expert 0: 0.9 (t0), 0.5 (t1); expert 1: 0.9 (t3), 0.8 (t2)
    assert routing.expert_mask[:, 0].tolist() == [True, True, False, False]
    assert routing.expert_mask[:, 1].tolist() == [False, False, True, True]
    assert routing.tokens_per_expert.tolist() == [2, 2]
    assert routing.top_k_indices is None and routing.slots_per_token == 1.0


def test_expert_choice_output_and_groups():
    """y_t = sum over the experts that took t of p_te * expert_e(x_t); per-sequence groups pick
    within each sequence, the batch group over all tokens."""
    for group in ("sequence", "batch"):
        b = block(moe_routing="expert_choice", expert_choice_group=group, num_experts=4,
                  num_experts_per_tok=2)  # fmt: skip
        x = torch.randn(2, 6, 32)
        with torch.no_grad():
            y, routing = b(x)
        mask = routing.expert_mask.view(2, 6, 4)
        if group == "sequence":
            assert (mask.sum(dim=1) == (2 * 6) // 4).all()  # per sequence and expert
        else:
            assert (mask.sum(dim=(0, 1)) == (2 * 12) // 4).all()
        flat = x.reshape(12, 32)
        expected = torch.zeros(12, 32, dtype=torch.float64)
        for t, e in routing.expert_mask.nonzero().tolist():
            expected[t] += routing.probs[t, e].double() * expert_output(b, e, flat[t])
        assert_close(y.reshape(12, 32).double(), expected, atol=1e-5, rtol=1e-5)


def test_expert_choice_cannot_generate():
    model = tiny_model(moe_routing="expert_choice")
    with pytest.raises(InputError, match="expert choice"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2)


# ---------------------------------------------------------------------------- shared and dense
@pytest.mark.parametrize("weighted", [False, True])
def test_shared_expert_adds_to_the_routed_sum(weighted):
    b = block(shared_expert_intermediate_size=12, shared_expert_weighted=weighted)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        y, routing = b(x)
        routed = grouped_experts(x[0], routing, b.experts.gate_up_proj, b.experts.down_proj)
    shared = mlp_output(b.shared_expert, x[0])
    k = b.gate.top_k
    expected = shared / (k + 1) + routed.double() * k / (k + 1) if weighted else shared + routed
    assert_close(y[0].double(), expected.double(), atol=1e-5, rtol=1e-5)


def test_dense_layers_run_an_mlp_and_return_no_routing():
    model = tiny_model(num_hidden_layers=3, mlp_only_layers=[0, 2], dense_intermediate_size=20)
    dense = model.model.layers[0]
    assert not hasattr(dense.mlp, "experts") and dense.mlp.gate_proj.weight.shape == (20, 32)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        out = model(ids, output_routing=True, output_hidden_states=True)
        assert len(out.routing) == 1  # layer 1 only
        h = out.hidden_states[0]
        rotary = model.model.rotary_emb(torch.arange(7)[None], h.dtype)
        attn, _ = dense.self_attn(dense.input_layernorm(h), rotary, None, None, torch.arange(7),
                                  False)  # fmt: skip
        mid = h + attn
    expected = mid.double() + mlp_output(dense.mlp, dense.post_attention_layernorm(mid))
    assert_close(out.hidden_states[1].double(), expected, atol=1e-5, rtol=1e-5)
    assert model.config.moe_layer_indices == [1]


def test_default_dense_width_keeps_the_active_compute():
    config = OlmoeConfig.tiny(mlp_only_layers=[0])
    assert config.dense_width == config.num_experts_per_tok * config.intermediate_size


# ---------------------------------------------------------------------------- norms and init
def test_no_qk_norm_and_layernorm_have_no_such_weights():
    names = dict(tiny_model(qk_norm=False).named_parameters())
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    model = tiny_model(norm_type="nonparametric_layernorm")
    assert not any("norm" in n for n, _ in model.named_parameters())
    x = torch.randn(2, 3, 32) * 3 + 1
    normed = model.model.norm(x)
    assert_close(normed.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    assert_close(normed.var(-1, unbiased=False), torch.ones(2, 3), atol=1e-3, rtol=0)


def test_init_is_truncated_unless_asked_for_a_plain_normal():
    def largest(cutoff):
        torch.manual_seed(0)
        model = OlmoeForCausalLM(OlmoeConfig.tiny(vocab_size=4096, init_cutoff_factor=cutoff))
        return float(model.model.embed_tokens.weight.detach().abs().max()) / 0.02

    assert largest(3.0) <= 3.0 and largest(2.0) <= 2.0
    assert largest(None) > 3.5  # 131k normal draws: beyond 3.5 std is near certain


# ---------------------------------------------------------------------------- config and files
def test_released_config_json_has_no_switches():
    written = OlmoeConfig.olmoe_1b_7b().to_dict()
    assert not set(DESIGN_SWITCHES) & set(written)
    changed = OlmoeConfig.tiny(qk_norm=False, moe_dropless=False).to_dict()
    assert changed["qk_norm"] is False and changed["moe_dropless"] is False
    assert "moe_capacity_factor" not in changed  # still its default


@pytest.mark.parametrize("variant", SWITCHED)
def test_switches_save_and_load_exactly(variant, tmp_path):
    model = tiny_model(**SWITCHED[variant])
    with pytest.warns(UserWarning, match="transformers' OlmoeForCausalLM cannot represent"):
        model.save_pretrained(tmp_path)
    loaded = OlmoeForCausalLM.from_pretrained(tmp_path)
    for name in DESIGN_SWITCHES:
        assert getattr(loaded.config, name) == getattr(model.config, name), name
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        out = model(ids, labels=ids, output_routing=True)
    assert torch.isfinite(out.loss)


def test_released_design_saves_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_model(init_cutoff_factor=None).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["init_cutoff_factor"] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe_routing": "switch"}, "moe_routing must be one of"),
        ({"norm_type": "layernorm"}, "norm_type must be one of"),
        ({"mlp_only_layers": [2]}, "mlp_only_layers must be a list of layer indices"),
        ({"shared_expert_intermediate_size": -1}, "shared_expert_intermediate_size"),
        ({"moe_capacity_factor": -1}, "moe_capacity_factor"),
        ({"init_cutoff_factor": 0}, "init_cutoff_factor"),
    ],
)
def test_bad_switches_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        OlmoeConfig.tiny(**overrides)


def test_router_output_select_keeps_the_switch_fields():
    routing = RouterOutput(torch.zeros(3, 2), torch.full((3, 2), 0.5), None, None,
                           expert_mask=torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool))
    picked = routing.select(torch.tensor([True, False, True]))
    assert picked.tokens_per_expert.tolist() == [1, 1]  # fmt: skip
