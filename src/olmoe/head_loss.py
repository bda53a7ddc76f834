"""Next-token cross-entropy straight from final hidden states, without the (B, L, V) logits.

At OLMoE's 50,304-token vocabulary the LM head's logits dwarf everything else a small model
computes: 2,048 tokens' float32 logits are 412 MB, written by the head, read and written again
by log-softmax, and twice more by its backward. `linear_cross_entropy` takes the rows a chunk
at a time instead: logits of one chunk, their log-sum-exp, the loss terms, and at once the
chunk's share of both gradients (softmax minus the one-hot target, times the weight for the
hidden states, times the hidden states for the weight), so no chunk's logits outlive it and the
backward pass only scales the stored gradients by the incoming one.

The numbers are the unfused path's: each chunk's logits come from the same matmul (under bf16
autocast, bf16 operands and a bf16 product, as `lm_head` gives), and float32 log-softmax
follows. Only the order of summation differs: the weight's gradient is summed over chunks in
float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmoe.errors import InputError

IGNORE_INDEX = -100

# Rows per chunk: one chunk's float32 logits take at most 32 MB (166 rows at a 50k vocabulary).
_CHUNK_BYTES = 1 << 25


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk at this vocabulary size."""
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, in float32.

    hidden (N, H), weight (V, H), targets (N,) token ids with IGNORE_INDEX for rows without a
    target. The result equals `F.cross_entropy((hidden @ weight.T).float(), targets,
    ignore_index=IGNORE_INDEX)`, NaN where no row has a target, as there."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) must share H: got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    return _chunked(hidden, weight, targets, gradients=False)[0]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        loss, hidden_grad, weight_grad = _chunked(hidden, weight, targets, gradients=True)
        ctx.save_for_backward(hidden_grad, weight_grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_grad, weight_grad = ctx.saved_tensors
        return hidden_grad * grad_loss.to(hidden_grad.dtype), weight_grad * grad_loss, None


def _chunked(hidden, weight, targets, gradients: bool):
    """(loss, d loss / d hidden, d loss / d weight); the gradients are None unless asked."""
    valid = targets != IGNORE_INDEX
    count = valid.sum()
    safe_targets = torch.where(valid, targets, 0)
    scale = 1.0 / count.clamp_min(1).to(torch.float32)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    hidden_grad = torch.empty_like(hidden) if gradients else None
    weight_grad = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if gradients else None
    )
    operand = _autocast_operand(weight)
    step = chunk_rows(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        h, keep, target = hidden[rows], valid[rows], safe_targets[rows, None]
        logits = (h @ operand.T).float()  # the head's matmul: autocast rounds it as lm_head does
        # One exponential per logit serves both the log-sum-exp and the softmax.
        peak = logits.amax(dim=-1, keepdim=True)
        target_logits = logits.gather(1, target)
        exps = logits.sub_(peak).exp_()
        sums = exps.sum(dim=-1, keepdim=True)
        terms = (peak + sums.log() - target_logits).squeeze(1)
        total += terms.masked_fill(~keep, 0).sum(dtype=torch.float64)
        if not gradients:
            continue
        weights = keep.to(torch.float32)[:, None] * scale  # each row's share of the mean
        probs = exps.mul_(weights / sums)  # softmax / count, in the logits' storage
        probs.scatter_add_(1, target, -weights)
        hidden_grad[rows] = probs @ operand
        weight_grad += probs.T @ h
    loss = (total / count).float()  # 0 / 0 is NaN, as in cross_entropy
    if gradients:
        weight_grad = weight_grad.to(weight.dtype)
    return loss, hidden_grad, weight_grad


def _autocast_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the head's matmul sees it: cast once to the autocast dtype where autocast
    is on (autocast would cast it again for every chunk), else itself."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy in float32: position t predicts labels[t + 1]; -100 is ignored.

    The targets are shifted, not the logits: slicing (B, L, V) logits makes autograd allocate
    and fill a logits-sized gradient buffer, which at OLMoE's 50k vocabulary was a tenth of a
    small model's training step. The last position has no target and is ignored.
    """
    targets = _next_tokens(labels, logits)
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX
    )


def causal_lm_loss_from_hidden(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """`causal_lm_loss` of the logits `hidden @ weight.T`, computed without forming them
    (`linear_cross_entropy`): hidden (B, L, H) final hidden states, weight (V, H) the LM
    head's."""
    targets = _next_tokens(labels, hidden)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets)


def _next_tokens(labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Each position's target, flattened: labels shifted left by one, IGNORE_INDEX last."""
    if labels.shape != outputs.shape[:2]:
        raise InputError(
            f"labels shape {tuple(labels.shape)} must match the logits' (batch, length) "
            f"{tuple(outputs.shape[:2])}: compute logits at every position to get a loss"
        )
    targets = F.pad(labels[:, 1:].to(outputs.device), (0, 1), value=IGNORE_INDEX)
    return targets.reshape(-1)
