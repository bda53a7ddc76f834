"""OLMoE's training objective: cross-entropy + lb_coef * load balancing + z_coef * router z-loss.

Both auxiliary losses follow megablocks (the code that trained OLMoE-1B-7B), computed per layer
from the routing the model returns with `output_routing=True`:

    LB_l = E * sum_e f_e * P_e      f_e = share of the T*K routing slots given to expert e (hard
                                    top-k counts, no gradient), P_e = mean full-softmax probability
    LB   = mean over layers of LB_l (its minimum, 1, is perfect balance)
    Z    = sum over layers and tokens of logsumexp(logits)^2 / (L * T [* K])

The released code divides the z-loss by K as well (`z_loss_per_slot=True`, the default here);
the paper's equation and OLMo-core do not. The model's own `aux_loss` output is transformers'
different definition (olmoe.moe.switch_aux_loss: layers pooled, f over tokens, minimum K),
kept for API parity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from olmoe.moe import RouterOutput


def megablocks_lb_loss(routing: Sequence[RouterOutput]) -> torch.Tensor:
    """megablocks' load-balancing loss, averaged over layers. Each entry is one layer's routing
    for the local micro-batch; the result is a float32 scalar with a gradient through P only
    (0 for a model without experts)."""
    per_layer = []
    for layer in routing:
        experts = layer.probs.shape[-1]
        counts = layer.tokens_per_expert.float()  # hard counts: no gradient
        slot_share = counts / counts.sum().clamp_min(1)  # the T * K slots' shares
        per_layer.append(experts * torch.dot(slot_share, layer.probs.mean(dim=0)))
    return torch.stack(per_layer).mean() if per_layer else torch.zeros(())


def router_z_loss(routing: Sequence[RouterOutput], per_slot: bool = True) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(logits)^2, divided by K too when `per_slot`
    (the released OLMoE code's scale); float32 scalar (0 for a model without experts)."""
    if not routing:
        return torch.zeros(())
    squares = [torch.logsumexp(r.logits.float(), dim=-1).square().mean() for r in routing]
    z = torch.stack(squares).mean()
    return z / routing[0].slots_per_token if per_slot else z


# The columns `routing_statistics` adds after the E expert counts.
ENTROPY, TOKENS, DROPPED = range(-3, 0)


def routing_statistics(routing: Sequence[RouterOutput], num_experts: int) -> torch.Tensor:
    """Per MoE layer: the slots routed to each expert (hard top-k counts), the summed entropy of
    the tokens' router distributions, the tokens routed and the slots dropped for capacity, as
    an (L, E + 3) float64 tensor so that micro-batches and ranks add up by plain summation (the
    trainer logs load, entropy and drops from it)."""
    with torch.no_grad():
        rows = [_statistics_row(r) for r in routing]
    return torch.stack(rows) if rows else torch.zeros(0, num_experts + 3, dtype=torch.float64)


def _statistics_row(routing: RouterOutput) -> torch.Tensor:
    extra = torch.tensor([0.0, routing.probs.shape[0], routing.dropped], dtype=torch.float64)
    extra[ENTROPY] = routing.entropy().sum()
    return torch.cat([routing.tokens_per_expert.double(), extra.to(routing.probs.device)])
