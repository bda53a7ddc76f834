"""Routing as the model's output: one RouterOutput per layer, read by everything downstream, and
the narrow hidden-state / logits API."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from olmoe import RouterOutput, route
from tests.conftest import tiny_model

IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [1, 2, 3, 4, 5, 6]])


@pytest.mark.parametrize("norm", [False, True])
def test_each_layer_returns_its_routing(norm):
    model = tiny_model(norm_topk_prob=norm)
    with torch.no_grad():
        out = model(IDS, output_routing=True, output_router_logits=True)
    config = model.config
    assert len(out.routing) == config.num_hidden_layers
    for routing, logits in zip(out.routing, out.router_logits):
        assert isinstance(routing, RouterOutput)
        assert routing.logits is logits
        tokens = IDS.numel()
        assert routing.probs.shape == (tokens, config.num_experts)
        assert routing.probs.dtype == torch.float32
        again = route(logits, config.num_experts_per_tok, norm)
        assert torch.equal(routing.top_k_indices, again.top_k_indices)
        assert torch.equal(routing.top_k_weights, again.top_k_weights)
        expected = torch.bincount(again.top_k_indices.flatten(), minlength=config.num_experts)
        assert torch.equal(routing.tokens_per_expert, expected)
        assert int(routing.tokens_per_expert.sum()) == tokens * config.num_experts_per_tok


def test_routing_entropy_is_the_float64_formula():
    logits = torch.randn(12, 8) * 3
    p = torch.softmax(logits.double(), -1)
    assert_close(route(logits, 2).entropy().double(), -(p * p.log()).sum(-1), rtol=1e-5, atol=1e-6)
    # a router with no preference: log E
    flat = route(torch.zeros(3, 8), 2).entropy()
    assert_close(flat, torch.full((3,), float(torch.log(torch.tensor(8.0)))))


def test_asking_for_routing_adds_no_aux_loss():
    model = tiny_model()
    with torch.no_grad():
        plain = model(IDS, labels=IDS)
        routed = model(IDS, labels=IDS, output_routing=True)
        hf = model(IDS, labels=IDS, output_router_logits=True)
    assert routed.aux_loss is None and routed.router_logits is None
    assert torch.equal(routed.loss, plain.loss)
    assert plain.routing is None
    # transformers' switch: its aux loss, added to the loss with the configured coefficient
    assert hf.aux_loss is not None
    coef = model.config.router_aux_loss_coef
    assert_close(hf.loss, plain.loss + coef * hf.aux_loss)


def test_forward_hidden_and_logits_from_hidden_give_the_forward_logits():
    model = tiny_model()
    with torch.no_grad():
        full = model(IDS).logits
        hidden = model.forward_hidden(IDS).last_hidden_state
        chosen = hidden[torch.tensor([0, 1, 1]), torch.tensor([2, 0, 5])]  # any positions
        logits = model.logits_from_hidden(chosen)
    assert hidden.shape == (*IDS.shape, model.config.hidden_size)
    # the same products; a GEMM of another shape may sum in another order
    assert_close(
        logits, full[torch.tensor([0, 1, 1]), torch.tensor([2, 0, 5])], rtol=1e-6, atol=1e-6
    )


def test_routing_follows_the_gradient_of_the_training_losses():
    """The training losses read the routing's probabilities, which carry the router's
    gradient."""
    from olmoe.train.losses import megablocks_lb_loss

    model = tiny_model().train()
    out = model(IDS, output_routing=True)
    megablocks_lb_loss(out.routing).backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_select_keeps_the_chosen_tokens_routing():
    routing = route(torch.randn(6, 8), 2)
    real = torch.tensor([True, True, False, True, False, False])
    chosen = routing.select(real)
    assert torch.equal(chosen.top_k_indices, routing.top_k_indices[real])
    assert torch.equal(chosen.probs, routing.probs[real])
    expected = torch.bincount(routing.top_k_indices[real].flatten(), minlength=8)
    assert torch.equal(chosen.tokens_per_expert, expected)
