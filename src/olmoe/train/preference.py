"""The adaptation objectives' losses: supervised fine-tuning, DPO and KTO, on sequence
log-probabilities.

Every function here takes log-probabilities the trainer computed and returns per-example losses
(and the rewards TRL logs), so each can be checked against a float64 formula on fixed numbers.
The definitions follow the code that trained OLMoE-1B-7B-0924-SFT and -Instruct
(open-instruct; trl 0.9.6 for KTO) and TRL's names:

    SFT    summed (open-instruct's `reduce_loss sum`, as released) or mean next-token CE over the
           tokens whose label is not -100 (assistant content and its eos)
    DPO    z = (pi_c - pi_r) - (ref_c - ref_r); pi, ref = a response's summed log-probability
             sigmoid       -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z)
             sigmoid_norm  the same on length-averaged log-probabilities (open-instruct dpo_norm)
             ipo           (z - 1 / (2 beta))^2 on length-averaged log-probabilities
             hinge         relu(1 - beta z)
           rewards: beta (pi - ref), per response, without gradient
    KTO    KL = max(0, mean(pi_KL - ref_KL)) over mismatched prompt/completion pairs, without
           gradient; desirable 1 - sigmoid(beta (r - KL)), undesirable 1 - sigmoid(beta (KL - r)),
           r = pi - ref, weighted by lambda_D and lambda_U
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from olmoe.errors import ConfigError
from olmoe.head_loss import causal_lm_loss

DPO_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "ipo", "hinge")
# Loss types that compare length-averaged log-probabilities (TRL and open-instruct alike).
AVERAGED_LOSS_TYPES = ("sigmoid_norm", "ipo")
SFT_REDUCTIONS = ("sum", "mean")


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence, the summed float32 log-probability of its labelled tokens and their count:
    logits (B, L, V), labels (B, L) with -100 where nothing is scored; position t predicts
    labels[t + 1], as in causal_lm_loss. Returns (B,) sums and (B,) counts."""
    return sequence_logps(causal_lm_loss(logits, labels, reduction="none"), labels)


def sequence_logps(
    token_losses: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logps` from each position's next-token loss (B, L) (causal_lm_loss or the model's
    loss with reduction "none": 0 where nothing is scored)."""
    return -token_losses.sum(dim=-1), (labels[:, 1:] != -100).sum(dim=-1)


def sft_loss(mean: torch.Tensor, trained: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """SFT's loss from the mean next-token cross-entropy over the `trained` labelled tokens
    (`causal_lm_loss` or the model's loss): their sum or their mean, 0 where none is labelled
    (where the mean is NaN)."""
    if reduction not in SFT_REDUCTIONS:
        raise ConfigError(f"the SFT reduction must be one of {SFT_REDUCTIONS}, got {reduction!r}")
    total = mean * trained if reduction == "sum" else mean
    return torch.where(trained > 0, total, torch.zeros_like(total))  # and a zero gradient


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,) and the chosen and rejected rewards (B,). The log-probabilities
    are sums, or length averages for the `AVERAGED_LOSS_TYPES`."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    z = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(
            -beta * z
        )
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * z)
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def kto_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl: torch.Tensor,
    reference_kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    mean_over_ranks=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (B,), rewards (B,) and the KL estimate (a scalar). policy and
    reference: each completion's summed log-probability; desirable (B,) bool; policy_kl and
    reference_kl: the same for mismatched prompt/completion pairs, whose mean difference
    estimates the KL term; `mean_over_ranks` averages that mean over the processes before the
    clamp, as trl 0.9.6 does."""
    kl = (policy_kl - reference_kl).mean().detach()
    if mean_over_ranks is not None:
        kl = mean_over_ranks(kl)
    kl = kl.clamp(min=0)
    ratio = policy - reference
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    return losses, beta * ratio.detach(), kl
