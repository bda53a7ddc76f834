"""Inputs and float64 formulas shared by the engine's tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmoe.moe import route


def bf16(*shape, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).bfloat16()


def moe_formula(x, gate_up, down, indices, weights):
    """float64 experts, the activation rounded to bf16 where the kernel rounds it."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, e, weight, act in _expert_activations(x, gate_up, indices, weights):
        out[t] += weight * (down[e].double() @ act.bfloat16().double())
    return out


def _expert_activations(x, gate_up, indices, weights):
    """(token, expert, routing weight, float64 SiLU activation) for every routing slot."""
    inter = gate_up.shape[1] // 2
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            gate_up_out = gate_up[e].double() @ x[t].double()
            yield t, e, weights[t, k].double(), F.silu(gate_up_out[:inter]) * gate_up_out[inter:]


def activation_rounding_slack(x, gate_up, down, indices, weights):
    """How far one bf16 rounding step of an expert activation moves each output (T, H): the
    kernel sums gate/up in float32, which may round a few activations to the neighbouring bf16
    value of moe_formula's. A missing or wrong product term moves an output about 2^8 times
    further."""
    slack = torch.zeros(x.shape, dtype=torch.float64)
    for t, e, weight, act in _expert_activations(x, gate_up, indices, weights):
        step = torch.ldexp(torch.ones_like(act), torch.frexp(act).exponent - 8)
        slack[t] += weight.abs() * (down[e].double().abs() * step).amax(dim=1)
    return slack


def random_routing(tokens, experts, top_k, seed, only=None):
    """Router output for random logits; `only` restricts the choice to those experts."""
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed))
    if only is not None:
        blocked = torch.ones(experts, dtype=torch.bool)
        blocked[only] = False
        logits = logits.masked_fill(blocked, -1e4)
    return route(logits.bfloat16(), top_k)
