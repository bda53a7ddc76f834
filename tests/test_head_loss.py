"""The LM head's cross-entropy chunk by chunk (olmoe.head_loss) against float64 formulas and
against the unfused path it replaces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from olmoe import head_loss
from olmoe.engine import native
from olmoe.errors import InputError
from olmoe.head_loss import causal_lm_loss, causal_lm_loss_from_hidden, linear_cross_entropy
from tests.conftest import tiny_model
from tests.engine import standin

VOCAB, WIDTH = 37, 8


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows at VOCAB, so that every test crosses chunk borders and ends on a
    partial chunk."""
    monkeypatch.setattr(head_loss, "_CHUNK_BYTES", 3 * 4 * VOCAB)
    assert head_loss.chunk_rows(VOCAB) == 3


@pytest.fixture(params=["softmax", "stand-in", "kernels"])
def exp_logits(request):
    """Where each chunk's exponentials come from: PyTorch's softmax (no pass given), the
    engine's pass as plain PyTorch (tests/engine/standin.py), or its compiled kernel."""
    if request.param == "softmax":
        return None
    if request.param == "stand-in":
        return standin.exp_logits
    if native.compiled() is None:
        pytest.skip("the engine's kernels do not run here")
    return native.exp_logits


def _problem(rows=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, WIDTH, generator=generator)
    weight = torch.randn(VOCAB, WIDTH, generator=generator)
    targets = torch.randint(0, VOCAB, (rows,), generator=generator)
    targets[[1, 7]] = head_loss.IGNORE_INDEX
    return hidden, weight, targets


def _float64_reference(hidden, weight, targets, row_weights=None):
    """Loss and both gradients from the definition: each kept row's loss is log-sum-exp minus
    the target's logit, d/dlogits = softmax - onehot. The mean weighs each kept row by 1 / kept
    rows; given `row_weights` (an incoming gradient per row), the rows' losses are returned and
    the gradients are those of sum(row_weights * losses)."""
    h, w = hidden.double(), weight.double()
    logits = h @ w.T
    keep = targets != head_loss.IGNORE_INDEX
    safe = torch.where(keep, targets, 0)
    terms = (torch.logsumexp(logits, -1) - logits.gather(1, safe[:, None]).squeeze(1)) * keep
    if row_weights is None:
        loss, row_weights = terms.sum() / keep.sum(), keep / keep.sum()
    else:
        loss, row_weights = terms, row_weights.double() * keep
    delta = (torch.softmax(logits, -1) - F.one_hot(safe, VOCAB).double()) * row_weights[:, None]
    return loss, delta @ w, delta.T @ h


def test_loss_and_gradients_equal_the_float64_formula(small_chunks, exp_logits):
    hidden, weight, targets = _problem()
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, targets, exp_logits=exp_logits)
    (3.0 * loss).backward()  # the incoming gradient scales both
    ref_loss, ref_hidden, ref_weight = _float64_reference(hidden.detach(), weight.detach(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad.double(), 3.0 * ref_hidden, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad.double(), 3.0 * ref_weight, rtol=1e-5, atol=1e-7)


def _assert_row_losses_match_the_float64_formula(
    hidden, weight, targets, seed, grad_atol, exp_logits
):
    """Each row's loss and both gradients for a random incoming gradient per row, against the
    float64 formula; returns the rows' losses and the formula's."""
    hidden.requires_grad_()
    weight.requires_grad_()
    losses = linear_cross_entropy(hidden, weight, targets, "none", exp_logits)
    incoming = torch.randn(len(targets), generator=torch.Generator().manual_seed(seed))
    losses.backward(incoming)
    ref_losses, ref_hidden, ref_weight = _float64_reference(
        hidden.detach(), weight.detach(), targets, row_weights=incoming
    )
    torch.testing.assert_close(losses.double(), ref_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad.double(), ref_hidden, rtol=1e-5, atol=grad_atol)
    torch.testing.assert_close(weight.grad.double(), ref_weight, rtol=1e-5, atol=grad_atol)
    return losses, ref_losses


def test_each_rows_loss_and_gradients_equal_the_float64_formula(small_chunks, exp_logits):
    hidden, weight, targets = _problem(seed=5)
    losses, _ = _assert_row_losses_match_the_float64_formula(
        hidden, weight, targets, 6, 1e-6, exp_logits
    )
    assert losses.shape == targets.shape and losses[[1, 7]].tolist() == [0.0, 0.0]


def _far_targets():
    """A problem whose rows 2 and 4 have a loss of hundreds of nats: their logits spread over
    hundreds, their targets the least likely ids."""
    hidden, weight, targets = _problem(seed=3)
    hidden[[2, 4]] *= 100.0
    for row in (2, 4):
        targets[row] = (hidden[row] @ weight.T).argmin()
    return hidden, weight, targets


def test_a_target_too_unlikely_for_float32_keeps_its_exact_loss(small_chunks, exp_logits):
    """Rows whose target's probability underflows float32 (a loss of hundreds of nats), next to
    ordinary rows in the same chunk: each row's loss and both gradients are the formula's, not
    inf from the log of a zero probability (nor an overflowing sum of exponentials)."""
    hidden, weight, targets = _far_targets()
    _, ref_losses = _assert_row_losses_match_the_float64_formula(
        hidden, weight, targets, 4, 1e-5, exp_logits
    )
    assert ref_losses[[2, 4]].min() > 100


def test_an_engines_pass_takes_ordinary_chunks_and_leaves_far_rows_to_the_softmax(small_chunks):
    """Each chunk is offered to the pass, shifted by its targets' logits; a chunk with a row
    whose logits exceed its target's by more than 64 goes the softmax way."""
    hidden, weight, targets = _far_targets()
    shifts, tops = [], []

    def spy(h, w, shift):
        exps, sums, top = standin.exp_logits(h, w, shift)
        shifts.append(shift.clone())
        tops.append(top)
        return exps, sums, top

    with torch.no_grad():
        linear_cross_entropy(hidden, weight, targets, exp_logits=spy)
    safe = torch.where(targets == head_loss.IGNORE_INDEX, 0, targets)
    target_logits = (hidden @ weight.T).gather(1, safe[:, None]).squeeze(1)
    torch.testing.assert_close(torch.cat(shifts), target_logits)  # one offer per chunk
    taken = [top <= 64 for top in tops]
    assert taken == [False, False, True, True]  # rows 2 and 4 sit in the first two chunks


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_equals_pytorchs_cross_entropy_without_gradients(small_chunks, reduction, exp_logits):
    hidden, weight, targets = _problem(rows=11, seed=1)
    with torch.no_grad():
        ours = linear_cross_entropy(hidden, weight, targets, reduction, exp_logits)
    reference = F.cross_entropy(
        hidden @ weight.T, targets, ignore_index=head_loss.IGNORE_INDEX, reduction=reduction
    )
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(*_problem(), reduction="sum")


@pytest.mark.parametrize("skip", [False, True])
def test_the_model_refuses_an_unknown_loss_reduction_with_or_without_logits(skip):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\)"):
        tiny_model()(input_ids=ids, labels=ids, skip_logits=skip, loss_reduction="sum")


def test_no_targets_is_nan_as_in_cross_entropy():
    hidden, weight, targets = _problem()
    targets[:] = head_loss.IGNORE_INDEX
    assert math.isnan(linear_cross_entropy(hidden, weight, targets).item())
    assert math.isnan(F.cross_entropy(hidden @ weight.T, targets).item())


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_autocast_rounds_the_logits_as_the_unfused_head(small_chunks, reduction):
    hidden, weight, targets = _problem(rows=12, seed=2)
    incoming = (
        torch.rand(12, generator=torch.Generator().manual_seed(7)) if reduction == "none" else None
    )
    results = []
    for fused in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = linear_cross_entropy(h, w, targets, reduction)
            else:
                logits = (h @ w.T).float()
                loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction=reduction)
        loss.backward(incoming)
        results.append((loss, h.grad, w.grad))
    (loss, h_grad, w_grad), (ref_loss, ref_h_grad, ref_w_grad) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)  # same bf16 logits
    assert h_grad.dtype == torch.float32 and w_grad.dtype == torch.float32
    # The gradients' products round to bf16 in both, the weight's once per chunk here: within a
    # few bf16 steps of the largest entry.
    for ours, reference in ((h_grad, ref_h_grad), (w_grad, ref_w_grad)):
        torch.testing.assert_close(
            ours, reference, rtol=0, atol=2**-6 * reference.abs().max().item()
        )


def test_causal_lm_loss_equals_the_sliced_logits_formula_and_its_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    ids[1, 2] = -100  # an ignored label
    ours = causal_lm_loss(logits, ids)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), ignore_index=-100
    )
    (grad_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(grad_ours, grad_ref)


def test_causal_loss_from_hidden_equals_the_loss_of_the_logits(small_chunks):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, WIDTH, generator=generator)
    weight = torch.randn(VOCAB, WIDTH, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 6), generator=generator)
    labels[0, 3] = -100
    ours = causal_lm_loss_from_hidden(hidden, weight, labels)
    torch.testing.assert_close(ours, causal_lm_loss(hidden @ weight.T, labels), rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss", [causal_lm_loss, causal_lm_loss_from_hidden])
def test_labels_of_another_shape_are_refused(loss):
    outputs = torch.randn(2, 6, WIDTH)
    arguments = (
        (outputs, torch.randn(VOCAB, WIDTH)) if loss is causal_lm_loss_from_hidden else (outputs,)
    )
    with pytest.raises(InputError, match=r"labels shape \(2, 5\) must match"):
        loss(*arguments, torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_model_skips_its_logits_and_returns_the_same_loss_and_gradients(
    small_chunks, reduction
):
    model = tiny_model(vocab_size=VOCAB).train()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, 4] = -100
    outputs = {}
    for skip in (False, True):
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, skip_logits=skip, loss_reduction=reduction)
        assert out.loss.shape == (() if reduction == "mean" else (2, 9))
        (out.loss * torch.arange(out.loss.numel()).view(out.loss.shape)).sum().backward()
        outputs[skip] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
    (fused, fused_grads), (plain, plain_grads) = outputs[True], outputs[False]
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        atol = 1e-6 * grad.abs().max().item()  # float32 sums in another order
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=atol, msg=name)


def test_skip_logits_without_labels_says_what_is_missing():
    with pytest.raises(InputError, match="skip_logits=True needs labels"):
        tiny_model()(input_ids=torch.zeros(1, 3, dtype=torch.long), skip_logits=True)
