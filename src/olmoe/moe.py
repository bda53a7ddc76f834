"""The sparse Mixture-of-Experts block: router, stacked experts, dropless dispatch, auxiliary loss.

Letters used in shape comments:
    T  tokens in the flattened batch (batch * sequence)
    H  hidden size
    I  expert intermediate size
    E  number of experts
    K  experts per token (top-k)
    S  routing slots, T * K
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from olmoe import kernels
from olmoe.config import OlmoeConfig

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class RouterOutput:
    """What the router decided for each token; losses, metrics and analysis read this."""

    logits: torch.Tensor  # (T, E) in the activations' dtype
    top_k_indices: torch.Tensor  # (T, K) expert ids, most probable first
    top_k_weights: torch.Tensor  # (T, K) mixing weights, in the activations' dtype


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool = False) -> RouterOutput:
    """Choose each token's experts from its router logits.

    The softmax runs over *all* experts in float32 and the top-k probabilities are used as they
    are: OLMoE does not renormalise them (`norm_topk_prob=False`). A softmax over only the top-k
    logits would be a different model.
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
    weights, indices = torch.topk(probs, top_k, dim=-1)  # (T, K)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RouterOutput(logits, indices, weights.to(logits.dtype))


def router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(T,) entropy in nats of each token's float32 softmax over all experts; log E for a router
    with no preference. Training logs and routing analysis both report it."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (T, E)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    `grouped_mm`'s backward rejects expanded (stride-0) gradients, which a plain `.sum()` loss
    produces.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes these operands (dtype and 16-byte row alignment)."""
    if not hasattr(F, "grouped_mm") or x.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        return False
    row_bytes = x.element_size()
    return (weight.shape[1] * row_bytes) % 16 == 0 and (weight.shape[2] * row_bytes) % 16 == 0


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """`x @ weight[e].T` for consecutive row groups of `x`, group e having `counts[e]` rows.

    x: (S, in) rows sorted by expert; weight: (E, out, in), or int8 with its per-row `scale`
    (E, out) where kernels.grouped_applies (see olmoe.quantize); counts: (E,) -> (S, out).
    """
    if scale is not None:
        return kernels.grouped_linear_int8(x, weight, scale, counts)
    if kernels.grouped_applies(x, weight):  # bf16 on the CPU: the groups side by side
        return kernels.GroupedLinear.apply(x, weight, counts)
    if _grouped_mm_applies(x, weight):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each group
        out = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        return _ContiguousGrad.apply(out) if out.requires_grad else out
    # Fallback for dtypes and odd widths grouped_mm rejects: one matmul per expert that has rows.
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight[e].T for e, chunk in enumerate(chunks)])


class OlmoeRouter(nn.Module):
    """Linear(H -> E) without bias, then softmax top-k (see `route`)."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        # decoding goes to the kernel: oneDNN is at its slowest at this narrow shape
        logits = kernels.linear_or_torch(x, self.weight)
        return route(logits, self.top_k, self.norm_topk_prob)


class OlmoeExperts(nn.Module):
    """All E SwiGLU experts of a layer as two stacked tensors.

    `gate_up_proj[e]` holds expert e's gate projection in rows [0, I) and its up projection in
    rows [I, 2I), so one matrix product computes both (the layout transformers 5 keeps in memory).
    """

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # (E, H, I)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Dropless dispatch: every token reaches each of its K experts. x: (T, H) -> (T, H)."""
        if self.act_fn is F.silu and kernels.applies(x, self.gate_up_proj):  # decoding
            return kernels.moe(
                x, self.gate_up_proj, self.down_proj, routing.top_k_indices, routing.top_k_weights
            )
        return grouped_experts(x, routing, self.gate_up_proj, self.down_proj, self.act_fn)


def grouped_experts(
    x: torch.Tensor,
    routing: RouterOutput,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn=F.silu,
    scales: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The experts as two grouped GEMMs over the routing slots sorted by expert (the reference
    path; prefill and training). x: (T, H), gate_up (E, 2I, H), down (E, H, I) -> (T, H);
    int8 experts come with `scales`, the per-row scales of gate_up and down."""
    gate_up_scale, down_scale = scales or (None, None)
    if torch.is_autocast_enabled(x.device.type) and scales is None:
        # Autocast runs matrix products in its lower precision but has no rule for grouped_mm
        # (on the CPU), which would leave the experts, most of the FLOPs, in float32: cast as
        # it casts F.linear.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, gate_up, down = x.to(dtype), gate_up.to(dtype), down.to(dtype)
    t, k = routing.top_k_indices.shape
    expert_of_slot = routing.top_k_indices.reshape(-1)  # (S,)
    # Sort the S routing slots by expert so that each expert's rows are contiguous.
    slot_order = torch.argsort(expert_of_slot, stable=True)  # (S,)
    counts = torch.bincount(expert_of_slot, minlength=gate_up.shape[0])  # (E,)
    if act_fn is F.silu and kernels.fused_experts_applies(x, gate_up):  # inference: same bits
        weighted = kernels.grouped_experts(
            x, gate_up, down, slot_order, counts, routing.top_k_weights, scales
        )
        return weighted.view(t, k, -1).sum(dim=1)
    x_sorted = x[slot_order // k]  # (S, H) slot s belongs to token s // K
    gate, up = grouped_linear(x_sorted, gate_up, counts, gate_up_scale).chunk(2, dim=-1)
    y_sorted = grouped_linear(act_fn(gate) * up, down, counts, down_scale)  # (S, H)
    y = torch.empty_like(y_sorted).index_copy_(0, slot_order, y_sorted)  # (S, H) slot order
    y = y.view(t, k, -1) * routing.top_k_weights.unsqueeze(-1)  # (T, K, H)
    return y.sum(dim=1)  # (T, H)


class OlmoeSparseMoeBlock(nn.Module):
    """Router + experts. Keeps transformers' module names (`gate`, `experts`) for the key map."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.gate = OlmoeRouter(config)
        self.experts = OlmoeExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden_states.shape  # (B, L, H)
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routing = self.gate(x)
        return self.experts(x, routing).view(shape), routing


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' (Switch-style) auxiliary loss, the model's `aux_loss` output.

    E * sum_e f_e * P_e with f_e the share of tokens (not of the T*K slots) routed to expert e and
    P_e its mean softmax probability, both pooled over all layers; padding tokens
    (attention_mask == 0) excluded. Its minimum under perfect balance is therefore K, not 1: the
    OLMoE training objective (megablocks' definition, per layer, f over slots) lives with the
    training code.
    """
    tokens_per_expert = torch.zeros(
        num_experts, dtype=torch.float32, device=router_logits[0].device
    )
    prob_per_expert = torch.zeros_like(tokens_per_expert)
    total = torch.zeros((), dtype=torch.float32, device=tokens_per_expert.device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(tokens_per_expert.device, torch.float32)  # (T,)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
        chosen = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)  # (S,)
        token_weight = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask
        tokens_per_expert += torch.zeros_like(tokens_per_expert).scatter_add_(
            0, chosen, token_weight.repeat_interleave(top_k)
        )
        prob_per_expert += (probs * token_weight.unsqueeze(-1)).sum(dim=0)
        total += token_weight.sum()
    return num_experts * torch.sum((tokens_per_expert / total) * (prob_per_expert / total))
