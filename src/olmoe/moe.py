"""The sparse Mixture-of-Experts block: router, stacked experts, dropless dispatch, and the
transformers auxiliary loss; and the OLMoE paper's alternatives to the released design: token
dropping at a capacity, expert-choice routing, a shared expert, and the dense SwiGLU MLP.

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
    telemetry all read this; nothing recomputes the softmax or the top-k.

    Token choice (the released design) fills `top_k_indices` and `top_k_weights`, and `kept`
    too when experts have a capacity. Expert choice leaves those None and fills `expert_mask`.
    """

    logits: torch.Tensor  # (T, E) in the activations' dtype
    probs: torch.Tensor  # (T, E) float32 softmax over all experts
    top_k_indices: torch.Tensor | None  # (T, K) expert ids, most probable first
    top_k_weights: torch.Tensor | None  # (T, K) mixing weights, in the activations' dtype
    # Token dropping: (T, K) bool, the slots that fit in their expert's capacity.
    kept: torch.Tensor | None = None
    # Expert choice: (T, E) bool, which experts took each token.
    expert_mask: torch.Tensor | None = None
    _tokens_per_expert: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """(E,) int64: how many of the T tokens chose each expert (hard top-k counts, before
        any dropping, as megablocks counts them for its load-balancing loss), or, under expert
        choice, how many tokens each expert took."""
        if self._tokens_per_expert is None:
            if self.expert_mask is not None:
                self._tokens_per_expert = self.expert_mask.sum(dim=0)
            else:
                self._tokens_per_expert = torch.bincount(
                    self.top_k_indices.reshape(-1), minlength=self.logits.shape[-1]
                )
        return self._tokens_per_expert

    @property
    def slots_per_token(self) -> float:
        """K under token choice; under expert choice the experts a token got, on average."""
        if self.expert_mask is None:
            return self.top_k_indices.shape[-1]
        return float(self.expert_mask.sum()) / max(self.expert_mask.shape[0], 1)

    @property
    def dropped(self) -> int:
        """Routing slots dropped for want of capacity (0 when dropless)."""
        return 0 if self.kept is None else int(self.kept.numel() - self.kept.sum())

    def select(self, tokens: torch.Tensor) -> RouterOutput:
        """The routing of the tokens `tokens` (a (T,) boolean mask or indices) picks, such as a
        padded batch's real tokens."""

        def pick(tensor):
            return None if tensor is None else tensor[tokens]

        return RouterOutput(
            self.logits[tokens], self.probs[tokens], pick(self.top_k_indices),
            pick(self.top_k_weights), pick(self.kept), pick(self.expert_mask),
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


def capacity_mask(top_k_indices: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(T, K) bool: the routing slots each expert keeps when it takes at most `capacity`.

    megablocks' rule: the slots are taken in token order (token-major, then its choices) and
    each expert keeps its first `capacity`; the rest are dropped (they add nothing, and the
    token keeps its residual)."""
    flat = top_k_indices.reshape(-1)  # (S,)
    order = torch.argsort(flat, stable=True)  # slots grouped by expert, token order within
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    group_start = torch.cumsum(counts, 0) - counts  # (E,)
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - group_start[flat[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (S,) within expert
    return (rank < capacity).view_as(top_k_indices)


def expert_capacity(tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    """megablocks' per-expert capacity for a micro-batch of `tokens` tokens; 0 means none."""
    return int(factor * top_k * tokens / num_experts)


def expert_choice(logits: torch.Tensor, top_k: int, group_size: int) -> RouterOutput:
    """Expert-choice routing (Zhou et al., 2022): within each group of `group_size`
    consecutive tokens (a sequence, or the whole micro-batch), every expert takes the
    (top_k * group_size) // E tokens with the highest softmax probability for it, and weights
    each by that probability. A token may be taken by any number of experts, none included."""
    t, e = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
    grouped = probs.view(t // group_size, group_size, e)  # (G, S, E)
    chosen = (top_k * group_size) // e
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    if chosen:
        mask.scatter_(1, grouped.topk(chosen, dim=1).indices, True)  # top tokens per expert
    return RouterOutput(logits, probs, None, None, expert_mask=mask.view(t, e))


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
    if routing.expert_mask is not None:
        return _expert_choice_experts(x, routing, gate_up, down, act_fn, linear)
    t, k = routing.top_k_indices.shape
    slot_order = slots_by_expert(routing)  # (S,)
    counts = routing.tokens_per_expert  # (E,)
    if routing.kept is not None:  # dropped slots are not computed; they stay zero
        slot_order = slot_order[routing.kept.reshape(-1)[slot_order]]
        counts = torch.bincount(routing.top_k_indices[routing.kept], minlength=counts.numel())
    x_sorted = x[slot_order // k]  # (S, H) slot s belongs to token s // K
    gate, up = linear(x_sorted, gate_up, counts).chunk(2, dim=-1)
    y_sorted = linear(act_fn(gate) * up, down, counts)  # (S, H)
    slots = y_sorted.new_empty if routing.kept is None else y_sorted.new_zeros
    y = slots(t * k, y_sorted.shape[-1]).index_copy_(0, slot_order, y_sorted)  # slot order
    y = y.view(t, k, -1) * routing.top_k_weights.unsqueeze(-1)  # (T, K, H)
    return y.sum(dim=1)  # (T, H)


def _expert_choice_experts(x, routing, gate_up, down, act_fn, linear) -> torch.Tensor:
    """Each expert's chosen tokens through it, weighted by their probability for it, summed
    per token. x: (T, H) -> (T, H)."""
    experts, tokens = routing.expert_mask.T.nonzero(as_tuple=True)  # (N,) grouped by expert
    counts = routing.tokens_per_expert  # (E,)
    gate, up = linear(x[tokens], gate_up, counts).chunk(2, dim=-1)
    y = linear(act_fn(gate) * up, down, counts)  # (N, H)
    weights = routing.probs[tokens, experts].to(y.dtype).unsqueeze(-1)  # (N, 1)
    return y.new_zeros(x.shape).index_add_(0, tokens, y * weights)


class OlmoeRouter(nn.Module):
    """Linear(H -> E) without bias, then softmax top-k (see `route`): OLMoE's dropless token
    choice, or as the config's design switches say, token dropping or expert choice."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = 0.0 if config.moe_dropless else config.moe_capacity_factor
        self.expert_choice_group = (
            config.expert_choice_group if config.moe_routing == "expert_choice" else None
        )
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (T, E)

    def forward(self, x: torch.Tensor, sequence_length: int | None = None) -> RouterOutput:
        """x: (T, H), T = batch * `sequence_length` tokens (expert choice groups by sequence)."""
        logits = self.logits(x)
        if self.expert_choice_group is not None:
            group = sequence_length if self.expert_choice_group == "sequence" else x.shape[0]
            return expert_choice(logits, self.top_k, group or x.shape[0])
        routing = route(logits, self.top_k, self.norm_topk_prob)
        capacity = expert_capacity(x.shape[0], self.top_k, self.weight.shape[0],
                                   self.capacity_factor)  # fmt: skip
        if capacity:
            routing.kept = capacity_mask(routing.top_k_indices, self.weight.shape[0], capacity)
        return routing


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


class OlmoeMLP(nn.Module):
    """A dense SwiGLU MLP, down(act(gate(x)) * up(x)): a dense layer's, or the shared expert.
    The module names are transformers' (OlmoMLP's, Qwen2-MoE's shared expert's)."""

    def __init__(self, config: OlmoeConfig, width: int):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, width, bias=False)
        self.up_proj = nn.Linear(h, width, bias=False)
        self.down_proj = nn.Linear(width, h, bias=False)
        self.act_fn = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OlmoeSparseMoeBlock(nn.Module):
    """Router + experts (+ the shared expert, when the config has one). Keeps transformers'
    module names (`gate`, `experts`) for the key map."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.gate = OlmoeRouter(config)
        self.experts = OlmoeExperts(config)
        width = config.shared_expert_intermediate_size
        self.shared_expert = OlmoeMLP(config, width) if width else None
        # OLMo-core's weighted form: the shared expert as one more of K + 1 equal shares.
        k = config.num_experts_per_tok
        self.shared_share = 1 / (k + 1) if config.shared_expert_weighted else None

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden_states.shape  # (B, L, H)
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        routing = self.gate(x, shape[-2])
        out = self.experts(x, routing)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_share is not None:
                out, shared = out * (1 - self.shared_share), shared * self.shared_share
            out = out + shared
        return out.view(shape), routing


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
    if not routing:  # a dense model
        return torch.zeros((), dtype=torch.float32)
    device = routing[0].probs.device
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_per_expert = torch.zeros_like(tokens_per_expert)
    total = torch.zeros((), dtype=torch.float32, device=device)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(device, torch.float32)  # (T,)
    for layer in routing:
        probs = layer.probs
        token_weight = torch.ones(probs.shape[0], device=device) if mask is None else mask
        tokens_per_expert += (assignments(layer) * token_weight.unsqueeze(-1)).sum(dim=0)
        prob_per_expert += (probs * token_weight.unsqueeze(-1)).sum(dim=0)
        total += token_weight.sum()
    return num_experts * torch.sum((tokens_per_expert / total) * (prob_per_expert / total))


def assignments(routing: RouterOutput) -> torch.Tensor:
    """(T, E) float32: 1 where a token was routed to an expert (its top-k, or the experts that
    chose it), else 0."""
    if routing.expert_mask is not None:
        return routing.expert_mask.float()
    chosen = torch.zeros_like(routing.probs)
    return chosen.scatter_(1, routing.top_k_indices, 1.0)
