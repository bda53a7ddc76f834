"""The sparse Mixture-of-Experts block: router, stacked experts, dropless dispatch, and the
transformers auxiliary loss.

Letters used in shape comments:
    T  tokens in the flattened batch (batch * sequence)
    H  hidden size
    I  expert intermediate size
    E  number of experts
    K  experts per token (top-k)
    S  routing slots, T * K

This is the reference: plain PyTorch, one grouped GEMM per projection (`grouped_mm`, or one
matmul per expert where it does not apply). The CPU engine (olmoe.engine) swaps in subclasses
that run the same arithmetic in native code; it is tested against this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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
    """What one MoE layer's router decided. Losses, training metrics, routing analysis and server
    telemetry all read this; nothing recomputes the softmax or the top-k."""

    logits: torch.Tensor  # (T, E) in the activations' dtype
    probs: torch.Tensor  # (T, E) float32 softmax over all experts
    top_k_indices: torch.Tensor  # (T, K) expert ids, most probable first
    top_k_weights: torch.Tensor  # (T, K) mixing weights, in the activations' dtype
    _tokens_per_expert: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64: how many of the T tokens chose each expert (hard top-k counts)."""
        if self._tokens_per_expert is None:
            self._tokens_per_expert = torch.bincount(
                self.top_k_indices.reshape(-1), minlength=self.logits.shape[-1]
            )
        return self._tokens_per_expert

    def select(self, tokens: torch.Tensor) -> RouterOutput:
        """The routing of the tokens `tokens` (a (T,) boolean mask or indices) picks, such as a
        padded batch's real tokens."""
        return RouterOutput(
            self.logits[tokens], self.probs[tokens], self.top_k_indices[tokens],
            self.top_k_weights[tokens],
        )  # fmt: skip

    def entropy(self) -> torch.Tensor:
        """(T,) entropy in nats of each token's softmax over all experts; log E for a router with
        no preference. From log-softmax, so that a probability that underflows to 0 adds 0."""
        log_probs = torch.log_softmax(self.logits.float(), dim=-1)  # (T, E)
        return -(log_probs.exp() * log_probs).sum(dim=-1)


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
    return RouterOutput(logits, probs, indices, weights.to(logits.dtype))


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


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`x @ weight[e].T` for consecutive row groups of `x`, group e having `counts[e]` rows.

    x: (S, in) rows sorted by expert; weight: (E, out, in); counts: (E,) -> (S, out).
    """
    if _grouped_mm_applies(x, weight):
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each group
        out = F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
        return _ContiguousGrad.apply(out) if out.requires_grad else out
    # Fallback for dtypes and odd widths grouped_mm rejects: one matmul per expert that has rows.
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight[e].T for e, chunk in enumerate(chunks)])


GroupedProduct = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def slots_by_expert(routing: RouterOutput) -> torch.Tensor:
    """(S,) the flat routing slots (slot s = token s // K, its (s % K)-th choice) sorted by
    expert, stably, so that each expert's rows are contiguous; `routing.tokens_per_expert` gives
    the group sizes in the same order."""
    return torch.argsort(routing.top_k_indices.reshape(-1), stable=True)


def autocast_experts(x, gate_up, down):
    """Autocast runs matrix products in its lower precision but has no rule for grouped_mm (on
    the CPU), which would leave the experts, most of the FLOPs, in float32: cast as it casts
    F.linear."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, gate_up, down
    dtype = torch.get_autocast_dtype(x.device.type)
    return x.to(dtype), gate_up.to(dtype), down.to(dtype)


def grouped_experts(
    x: torch.Tensor,
    routing: RouterOutput,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    act_fn=F.silu,
    linear: GroupedProduct = grouped_linear,
) -> torch.Tensor:
    """Dropless experts as two grouped GEMMs over the routing slots sorted by expert.
    x: (T, H), gate_up (E, 2I, H), down (E, H, I) -> (T, H). `linear` computes the grouped
    products (the CPU engine passes its own)."""
    x, gate_up, down = autocast_experts(x, gate_up, down)
    t, k = routing.top_k_indices.shape
    slot_order = slots_by_expert(routing)  # (S,)
    counts = routing.tokens_per_expert  # (E,)
    x_sorted = x[slot_order // k]  # (S, H) slot s belongs to token s // K
    gate, up = linear(x_sorted, gate_up, counts).chunk(2, dim=-1)
    y_sorted = linear(act_fn(gate) * up, down, counts)  # (S, H)
    y = torch.empty_like(y_sorted).index_copy_(0, slot_order, y_sorted)  # (S, H) slot order
    y = y.view(t, k, -1) * routing.top_k_weights.unsqueeze(-1)  # (T, K, H)
    return y.sum(dim=1)  # (T, H)


class OlmoeRouter(nn.Module):
    """Linear(H -> E) without bias, then softmax top-k (see `route`)."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (T, E)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        return route(self.logits(x), self.top_k, self.norm_topk_prob)


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
        return grouped_experts(x, routing, self.gate_up_proj, self.down_proj, self.act_fn)


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


def switch_aux_loss(
    routing: Sequence[RouterOutput],
    num_experts: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' auxiliary load-balancing loss (Switch Transformer's, pooled over layers):
    the model's `aux_loss` output.

    E * sum_e f_e * P_e with f_e the share of tokens (not of the T*K slots) routed to expert e and
    P_e its mean softmax probability, both pooled over all layers; padding tokens
    (attention_mask == 0) excluded. Its minimum under perfect balance is therefore K, not 1. The
    OLMoE training objective is a different loss: megablocks', per layer, f over slots
    (olmoe.train.losses.megablocks_lb_loss).
    """
    device = routing[0].probs.device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros_like(tokens_per_expert)
    total = torch.zeros((), dtype=torch.float32, device=device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device, torch.float32)  # (T,)
    for layer in routing:
        probs, top_k = layer.probs, layer.top_k_indices.shape[-1]
        chosen = layer.top_k_indices.reshape(-1)  # (S,)
        token_weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        tokens_per_expert += torch.zeros_like(tokens_per_expert).scatter_add_(
            0, chosen, token_weight.repeat_interleave(top_k)
        )
        prob_per_expert += (probs * token_weight.unsqueeze(-1)).sum(dim=0)
        total += token_weight.sum()
    return num_experts * torch.sum((tokens_per_expert / total) * (prob_per_expert / total))
