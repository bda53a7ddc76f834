"""Next-token cross-entropy straight from final hidden states, without the (B, L, V) logits.

At OLMoE's 50,304-token vocabulary the LM head's logits dwarf everything else a small model
computes: 2,048 tokens' float32 logits are 412 MB, written by the head, read and written again
by log-softmax, and twice more by its backward. `linear_cross_entropy` takes the rows a chunk
at a time instead: logits of one chunk, their softmax in one fused pass, the loss terms, and at
once the chunk's share of both gradients (softmax minus the one-hot target, times the weight for
the hidden states, times the hidden states for the weight), so no chunk's logits outlive it and
the backward pass only scales the stored gradients by the incoming one. A chunk is larger than
the caches, so every pass over it goes to memory: besides the head's matmuls, one softmax pass
reads the logits and writes the probabilities, and each row's loss weight scales the small
(rows, hidden) operands of the gradient matmuls rather than the probabilities. An engine may
do better still (`ExpLogits`): olmoe's float32 engine exponentiates each tile of logits in the
registers that summed it, so the logits never reach memory; the softmax's normalisation then
moves to the small operands too, beside the row weights.

The numbers are the unfused path's: each chunk's logits come from the same matmul (under bf16
autocast, bf16 operands and a bf16 product, as `lm_head` gives; an engine's pass sums them in
its own order), and a float32 softmax follows.
Each row's loss is -log of its target's probability, as log-softmax gives it to within float32
rounding; a row whose target's probability underflows float32 (a loss above about 87 nats) gets
its log-sum-exp from the logits instead. The weight's gradient is summed over chunks in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from olmoe.errors import InputError

IGNORE_INDEX = -100

# Rows per chunk: one chunk's float32 logits take at most 128 MB (667 rows at a 50k vocabulary).
# The head's GEMMs have only the hidden size (often 128-1024) as their inner or outer dimension,
# so they run well only with a few hundred rows; the elementwise passes over the logits go to
# memory at any useful chunk size (docs/training.md#speed).
_CHUNK_BYTES = 1 << 27


def chunk_rows(vocab_size: int) -> int:
    """Positions per chunk at this vocabulary size."""
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


REDUCTIONS = ("mean", "none")

# A pass that an engine may supply for a chunk (olmoe.engine.layers.CpuLinear.exp_logits):
# (h, weight, shift) -> (exp(h @ weight.T - shift[:, None]), its row sums, the largest exponent),
# or None where it does not take these operands.
ExpLogits = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple | None]

# The fused pass shifts each row by its target's logit, so its exponentials are exact near the
# target and the loss is the log of the row's sum; a row whose largest logit exceeds the
# target's by more than this (a loss of at least 64 nats) could overflow float32 in that sum,
# and its chunk goes the softmax way instead.
_LARGEST_FUSED_EXPONENT = 64.0


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    exp_logits: ExpLogits | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, in float32.

    hidden (N, H), weight (V, H), targets (N,) token ids with IGNORE_INDEX for rows without a
    target. The result equals `F.cross_entropy((hidden @ weight.T).float(), targets,
    ignore_index=IGNORE_INDEX, reduction=reduction)`: "mean" over the rows with a target (NaN
    where there is none, as there), "none" each row's loss (0 without a target).

    "mean" computes both gradients as it goes (the loss is one number, so they only need
    scaling later); "none" computes each chunk's logits again in the backward pass, since its
    gradients depend on each row's incoming gradient.

    `exp_logits`, where given and where it takes the operands, computes each chunk's
    exponentiated logits in one pass in place of the matmul and the softmax (`ExpLogits`)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (N, H) and weight (V, H) must share H: got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be ({hidden.shape[0]},)")
    _check_reduction(reduction)
    gradients = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if gradients:
        function = _MeanLoss if reduction == "mean" else _TokenLosses
        return function.apply(hidden, weight, targets, exp_logits)
    losses, _, _ = _chunked(hidden, _autocast_operand(weight), targets, exp_logits)
    return _mean(losses, targets) if reduction == "mean" else losses


class _MeanLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, exp_logits):
        valid = targets != IGNORE_INDEX
        row_weights = (valid / valid.sum().clamp_min(1)).float()[:, None]  # shares of the mean
        losses, hidden_grad, weight_grad = _chunked(
            hidden, _autocast_operand(weight), targets, exp_logits, row_weights
        )
        ctx.save_for_backward(hidden_grad, weight_grad.to(weight.dtype))
        return _mean(losses, targets)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_grad, weight_grad = ctx.saved_tensors
        return hidden_grad * grad_loss.to(hidden_grad.dtype), weight_grad * grad_loss, None, None


class _TokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, exp_logits):
        operand = _autocast_operand(weight)
        ctx.operand_dtype = operand.dtype  # the backward pass runs outside autocast
        ctx.exp_logits = exp_logits
        ctx.save_for_backward(hidden, weight, targets)
        return _chunked(hidden, operand, targets, exp_logits)[0]

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets = ctx.saved_tensors
        row_weights = grad_losses.float()[:, None]
        _, hidden_grad, weight_grad = _chunked(
            hidden, weight.to(ctx.operand_dtype), targets, ctx.exp_logits, row_weights
        )
        return hidden_grad, weight_grad.to(weight.dtype), None, None


def _chunked(hidden, operand, targets, exp_logits, row_weights=None):
    """Each row's loss (0 where it has no target) a chunk at a time, and given `row_weights`
    (N, 1) the gradients of sum(row_weights * losses) for the hidden states and (in float32)
    the weight, else None for both."""
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    hidden_grad = weight_grad = None
    if row_weights is not None:
        row_weights = row_weights * valid[:, None]
        hidden_grad = torch.empty_like(hidden)
        weight_grad = torch.zeros(operand.shape, dtype=torch.float32, device=operand.device)
    step = chunk_rows(operand.shape[0])
    for start in range(0, hidden.shape[0], step):
        rows = slice(start, start + step)
        h, target = hidden[rows], safe_targets[rows, None]
        exps, sums, terms = _scores(h, operand, target, exp_logits)
        losses[rows] = terms.masked_fill(~valid[rows], 0)
        if row_weights is not None:
            _add_gradients(exps, sums, target, row_weights[rows], h, operand, hidden_grad[rows],
                           weight_grad)  # fmt: skip
    return losses, hidden_grad, weight_grad


def _mean(losses, targets):
    """The mean loss over the rows with a target, float32 (summed in float64); 0 / 0 is NaN,
    as in cross_entropy."""
    return (losses.sum(dtype=torch.float64) / (targets != IGNORE_INDEX).sum()).float()


def _scores(h, operand, target, exp_logits):
    """One chunk's float32 exponentials (rows, V) and their row sums (rows,), whose quotient is
    the softmax, and each row's loss.

    From `exp_logits` where it takes the operands: each row shifted by its target's logit, the
    loss the log of the sum over the target's exponential (about 1). Otherwise the softmax
    itself (sums of 1): the head's matmul in the operand's dtype (as autocast gives lm_head),
    then one fused pass, and each loss -log of the target's probability, or log-sum-exp minus
    the target's logit where that probability underflows."""
    if exp_logits is not None:
        shift = (h * operand[target.squeeze(1)]).sum(1)
        fused = exp_logits(h, operand, shift)
        if fused is not None and fused[2] <= _LARGEST_FUSED_EXPONENT:
            exps, sums, _ = fused
            return exps, sums, sums.log() - exps.gather(1, target).squeeze(1).log()
    logits = (h.to(operand.dtype) @ operand.T).float()
    probs = torch.softmax(logits, dim=-1)
    target_probs = probs.gather(1, target).squeeze(1)
    terms = -target_probs.log()
    underflow = (target_probs < torch.finfo(torch.float32).tiny).nonzero().squeeze(1)
    if len(underflow):
        far = logits[underflow]
        terms[underflow] = torch.logsumexp(far, -1) - far.gather(1, target[underflow]).squeeze(1)
    return probs, torch.ones_like(terms), terms


def _add_gradients(exps, sums, target, row_weights, h, operand, hidden_grad, weight_grad):
    """Write the chunk's hidden-state gradient into `hidden_grad` and add its weight gradient
    to `weight_grad`, for row losses weighted by `row_weights` (rows, 1): d/dlogits is softmax
    minus onehot(target), that is (exps - sums * onehot) / sums, whose difference is formed in
    `exps`' storage before any rounding to the operand's dtype; each row's weight over its sum
    scales that row of the hidden states and of the hidden-state gradient."""
    exps.scatter_add_(1, target, -sums[:, None])
    delta = exps.to(operand.dtype)
    scale = row_weights / sums[:, None]
    hidden_grad.copy_((delta @ operand) * scale)
    weight_grad += delta.T @ (h * scale).to(operand.dtype)


def _autocast_operand(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the head's matmul sees it: cast once to the autocast dtype where autocast
    is on (autocast would cast it again for every chunk), else itself."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy in float32: position t predicts labels[t + 1]; -100 is ignored.
    "mean" over the scored positions, or "none": (B, L), 0 where nothing is scored.

    The targets are shifted, not the logits: slicing (B, L, V) logits makes autograd allocate
    and fill a logits-sized gradient buffer, which at OLMoE's 50k vocabulary was a tenth of a
    small model's training step. The last position has no target and is ignored.
    """
    _check_reduction(reduction)
    targets = _next_tokens(labels, logits)
    losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return losses if reduction == "mean" else losses.view(labels.shape)


def causal_lm_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
    exp_logits: ExpLogits | None = None,
) -> torch.Tensor:
    """`causal_lm_loss` of the logits `hidden @ weight.T`, computed without forming them
    (`linear_cross_entropy`, which takes `exp_logits`): hidden (B, L, H) final hidden states,
    weight (V, H) the LM head's."""
    targets = _next_tokens(labels, hidden)
    flat = hidden.reshape(-1, hidden.shape[-1])
    losses = linear_cross_entropy(flat, weight, targets, reduction, exp_logits)
    return losses if reduction == "mean" else losses.view(labels.shape)


def _next_tokens(labels: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Each position's target, flattened: labels shifted left by one, IGNORE_INDEX last."""
    if labels.shape != outputs.shape[:2]:
        raise InputError(
            f"labels shape {tuple(labels.shape)} must match the logits' (batch, length) "
            f"{tuple(outputs.shape[:2])}: compute logits at every position to get a loss"
        )
    targets = F.pad(labels[:, 1:].to(outputs.device), (0, 1), value=IGNORE_INDEX)
    return targets.reshape(-1)
