"""The MoE block against float64 formulas: routing, dropless dispatch, both GEMM paths, the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

import olmoe.moe
from olmoe import OlmoeConfig, OlmoeForCausalLM, route, switch_aux_loss
from olmoe.moe import OlmoeSparseMoeBlock, grouped_linear
from tests.conftest import randomize


def moe_reference_float64(block: OlmoeSparseMoeBlock, x: torch.Tensor, norm: bool) -> torch.Tensor:
    """y_t = sum over t's top-k experts e of p_te * down_e(silu(gate_e x_t) * up_e x_t), where
    p is the softmax over all experts (renormalised over the top-k only if `norm`)."""
    x = x.double()
    w_router = block.gate.weight.double()
    gate_up, down = block.experts.gate_up_proj.double(), block.experts.down_proj.double()
    inter = down.shape[-1]
    probs = torch.softmax(x @ w_router.T, dim=-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top = torch.topk(probs[t], block.gate.top_k)
        weights = top.values / top.values.sum() if norm else top.values
        for weight, e in zip(weights, top.indices):
            g, u = gate_up[e, :inter] @ x[t], gate_up[e, inter:] @ x[t]
            out[t] += weight * (down[e] @ (F.silu(g) * u))
    return out


def make_block(seed=0, **overrides) -> OlmoeSparseMoeBlock:
    torch.manual_seed(seed)
    return randomize(OlmoeSparseMoeBlock(OlmoeConfig.tiny(**overrides)), seed, std=0.3)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("intermediate", [16, 6])  # 6: rows grouped_mm cannot take -> fallback
def test_block_matches_float64_formula(norm, intermediate):
    block = make_block(norm_topk_prob=norm, intermediate_size=intermediate)
    x = torch.randn(3, 5, block.gate.weight.shape[1])
    with torch.no_grad():
        y, routing = block(x)
    expected = moe_reference_float64(block, x.reshape(-1, x.shape[-1]), norm)
    assert_close(y.reshape(-1, x.shape[-1]).double(), expected, atol=1e-5, rtol=1e-5)
    assert routing.top_k_indices.shape == (15, block.gate.top_k)


def test_empty_experts_are_skipped_and_correct():
    """Route every token to experts 0 and 1 only: the other experts get no rows at all."""
    block = make_block(num_experts=8, num_experts_per_tok=2)
    with torch.no_grad():
        block.gate.weight[2:] = 0.0  # experts 2..7 get logit 0 from every token ...
        block.gate.weight[:2] = torch.rand(2, block.gate.weight.shape[1]) + 0.1
    x = torch.rand(9, block.gate.weight.shape[1]) + 0.1  # ... while 0 and 1 get positive logits
    with torch.no_grad():
        y, routing = block(x[None])
    assert set(routing.top_k_indices.unique().tolist()) <= {0, 1}
    assert_close(y[0].double(), moe_reference_float64(block, x, False), atol=1e-5, rtol=1e-5)


def test_route_softmax_over_all_experts_without_renormalisation():
    logits = torch.randn(10, 8)
    routing = route(logits, top_k=3)
    # weight = exp(logit - logsumexp(all logits)): the full-softmax probability itself
    expected = torch.exp(
        torch.gather(logits.double(), 1, routing.top_k_indices)
        - torch.logsumexp(logits.double(), -1, keepdim=True)
    )
    assert_close(routing.top_k_weights.double(), expected, atol=1e-7, rtol=1e-6)
    assert (routing.top_k_weights.sum(-1) < 1).all()
    assert torch.equal(routing.top_k_indices, torch.topk(logits, 3).indices)
    normalised = route(logits, top_k=3, norm_topk_prob=True)
    assert_close(normalised.top_k_weights.sum(-1), torch.ones(10))


def test_route_softmax_runs_in_float32_for_bf16_logits():
    logits = torch.randn(4, 64).bfloat16()
    routing = route(logits, top_k=8)
    assert routing.top_k_weights.dtype == torch.bfloat16
    expected = torch.softmax(logits.float(), -1).gather(1, routing.top_k_indices)
    assert torch.equal(routing.top_k_weights, expected.bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_linear_both_paths_agree(dtype):
    weight = torch.randn(4, 16, 32, dtype=dtype)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 32, dtype=dtype)
    expected = torch.cat([x[:3] @ weight[0].T, x[3:8] @ weight[2].T, x[8:] @ weight[3].T])
    got = grouped_linear(x, weight, counts)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close(got.float(), expected.float(), **tol)
    # width 30 breaks grouped_mm's 16-byte row alignment, so this takes the fallback path
    x_odd, w_odd = x[:, :30].contiguous(), weight[:, :, :30].contiguous()
    expected_odd = torch.cat(
        [x_odd[:3] @ w_odd[0].T, x_odd[3:8] @ w_odd[2].T, x_odd[8:] @ w_odd[3].T]
    )
    assert_close(grouped_linear(x_odd, w_odd, counts).float(), expected_odd.float(), **tol)


def test_grouped_linear_fallback_matches_formula():
    weight = torch.randn(3, 5, 7, dtype=torch.float64)  # float64 and width 7: fallback path
    counts = torch.tensor([2, 0, 4])
    x = torch.randn(6, 7, dtype=torch.float64)
    expected = torch.cat([x[:2] @ weight[0].T, x[2:] @ weight[2].T])
    assert_close(grouped_linear(x, weight, counts), expected)


def test_gradients_match_float64_autograd():
    """Backward through the grouped GEMM (a plain .sum() loss gives it an expanded gradient)."""
    block = make_block()
    x = torch.randn(7, block.gate.weight.shape[1], requires_grad=True)
    block(x[None])[0].sum().backward()
    double = make_block().double()
    x64 = x.detach().double().requires_grad_()
    double(x64[None])[0].sum().backward()
    assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-4)
    for (name, p), p64 in zip(block.named_parameters(), double.parameters()):
        assert_close(p.grad.double(), p64.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_experts_run_in_bfloat16_under_autocast_with_float32_gradients():
    """Autocast has no rule for grouped_mm, so the experts cast themselves, as F.linear is cast:
    bf16 products, float32 gradients for the float32 weights, the float64 result within bf16."""
    block = make_block()
    x = torch.randn(7, block.gate.weight.shape[1])
    seen = []

    def spy(a, b, counts):
        seen.append((a.dtype, b.dtype))
        return grouped_linear(a, b, counts)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = block.gate(x)
        y = olmoe.moe.grouped_experts(
            x, routing, block.experts.gate_up_proj, block.experts.down_proj, linear=spy
        )[None]
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen)
    y.float().sum().backward()
    assert block.experts.gate_up_proj.grad.dtype == torch.float32
    expected = moe_reference_float64(block, x, False)
    assert_close(y[0].double(), expected, atol=2e-2, rtol=2e-2)


def test_switch_aux_loss_matches_reference_and_formula():
    logits = tuple(torch.randn(12, 8) for _ in range(3))
    routing = [route(z, 2) for z in logits]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for attention_mask in (None, mask):
        ours = switch_aux_loss(routing, 8, attention_mask)
        theirs = load_balancing_loss_func(logits, 8, 2, attention_mask)
        assert_close(ours, theirs)
    # float64 formula without mask: E * sum_e (share of tokens choosing e) * (mean prob of e)
    stacked = torch.cat(logits).double()
    probs = torch.softmax(stacked, -1)
    chosen = F.one_hot(torch.topk(probs, 2).indices, 8).sum(1).double()  # (T, E)
    expected = 8 * (chosen.mean(0) * probs.mean(0)).sum()
    assert_close(switch_aux_loss(routing, 8).double(), expected)


def test_initialisation_is_truncated_normal():
    torch.manual_seed(0)
    config = OlmoeConfig.tiny(hidden_size=64, vocab_size=512, attention_bias=True)
    model = OlmoeForCausalLM(config)
    std = config.initializer_range
    for name, param in model.named_parameters():
        if "norm" in name:
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            assert param.abs().max() <= 3 * std, name
            if param.numel() > 4000:  # enough samples for the spread to be tight
                # a normal cut at 3 std has std 0.9866 * std
                assert abs(param.std().item() / std - 0.9866) < 0.05, name
