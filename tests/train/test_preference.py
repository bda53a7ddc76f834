"""The adaptation losses against float64 hand formulas on fixed log-probabilities."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from olmoe.errors import ConfigError
from olmoe.head_loss import causal_lm_loss
from olmoe.train.preference import dpo_loss, kto_loss, sft_loss, token_logps

PC = torch.tensor([-10.0, -42.5, -7.25, -3.0], dtype=torch.float64)  # policy, chosen
PR = torch.tensor([-12.0, -40.0, -9.5, -3.0], dtype=torch.float64)  # policy, rejected
RC = torch.tensor([-11.0, -41.0, -7.0, -4.0], dtype=torch.float64)  # reference, chosen
RR = torch.tensor([-11.5, -40.5, -9.0, -2.0], dtype=torch.float64)  # reference, rejected


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_dpo_sigmoid_equals_the_formula(smoothing):
    beta = 0.1
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta, "sigmoid", smoothing)
    for i in range(4):
        z = (PC[i] - PR[i]) - (RC[i] - RR[i])
        expected = -(1 - smoothing) * math.log(sigmoid(beta * z)) - smoothing * math.log(
            sigmoid(-beta * z)
        )
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (PC[i] - RC[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (PR[i] - RR[i]).item())


def test_dpo_at_step_zero_is_ln_2():
    """A policy equal to its reference: every pair's loss is ln 2, the rewards zero."""
    losses, chosen, rejected = dpo_loss(PC, PR, PC.clone(), PR.clone())
    assert_close(losses, torch.full_like(losses, math.log(2)))
    assert not chosen.any() and not rejected.any()


def test_dpo_ipo_and_hinge_equal_their_formulas():
    beta = 0.5
    ipo, _, _ = dpo_loss(PC, PR, RC, RR, beta, "ipo")
    hinge, _, _ = dpo_loss(PC, PR, RC, RR, beta, "hinge")
    for i in range(4):
        z = ((PC[i] - PR[i]) - (RC[i] - RR[i])).item()
        assert ipo[i].item() == pytest.approx((z - 1 / (2 * beta)) ** 2)
        assert hinge[i].item() == pytest.approx(max(0.0, 1 - beta * z))


def test_dpo_sigmoid_norm_is_sigmoid_on_the_values_given():
    plain, _, _ = dpo_loss(PC, PR, RC, RR, 0.1, "sigmoid")
    norm, _, _ = dpo_loss(PC, PR, RC, RR, 0.1, "sigmoid_norm")
    assert torch.equal(plain, norm)  # the averaging happens where the log-probs are computed


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR)[0].sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_unknown_loss_type_is_a_config_error():
    with pytest.raises(ConfigError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="robust-ish")


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_the_trl_0_9_6_formula(weights):
    beta = 0.1
    desirable = torch.tensor([True, False, True, False])
    policy_kl = torch.tensor([-20.0, -21.0, -19.0, -25.0], dtype=torch.float64)
    reference_kl = torch.tensor([-21.0, -20.0, -22.0, -24.5], dtype=torch.float64)
    losses, rewards, kl = kto_loss(PC, RC, desirable, policy_kl, reference_kl, beta, *weights)
    expected_kl = max(0.0, (policy_kl - reference_kl).mean().item())
    assert kl.item() == pytest.approx(expected_kl)
    for i in range(4):
        r = (PC[i] - RC[i]).item()
        if desirable[i]:
            expected = weights[0] * (1 - sigmoid(beta * (r - expected_kl)))
        else:
            expected = weights[1] * (1 - sigmoid(beta * (expected_kl - r)))
        assert losses[i].item() == pytest.approx(expected, rel=1e-12)
        assert rewards[i].item() == pytest.approx(beta * r)


def test_kto_kl_is_clamped_at_zero_and_carries_no_gradient():
    policy_kl = torch.tensor([-30.0, -30.0], dtype=torch.float64, requires_grad=True)
    reference_kl = torch.tensor([-20.0, -20.0], dtype=torch.float64)
    _, _, kl = kto_loss(PC[:2], RC[:2], torch.tensor([True, False]), policy_kl, reference_kl)
    assert kl.item() == 0 and not kl.requires_grad


def test_token_logps_sum_the_labelled_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, -100, 6, -100]])
    sums, counts = token_logps(logits, labels)
    logprobs = torch.log_softmax(logits.double(), -1)
    # position t predicts labels[t + 1]
    expected = [
        logprobs[0, 1, 3] + logprobs[0, 2, 4] + logprobs[0, 3, 1],
        logprobs[1, 0, 2] + logprobs[1, 2, 6],
    ]
    assert_close(sums.double(), torch.stack(expected), rtol=1e-6, atol=1e-6)
    assert counts.tolist() == [3, 2]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sft_loss_is_the_masked_cross_entropy(reduction):
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 9], [-100, 1, 2, -100, -100, -100]])
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)
    expected = F.cross_entropy(
        logits.double().reshape(-1, 11), targets.reshape(-1), ignore_index=-100, reduction=reduction
    )
    mean, trained = causal_lm_loss(logits, labels), (targets != -100).sum()
    assert_close(sft_loss(mean, trained, reduction).double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sft_loss_without_labelled_tokens_is_zero_with_a_zero_gradient(reduction):
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), -100)
    loss = sft_loss(causal_lm_loss(logits, labels), torch.tensor(0), reduction)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
