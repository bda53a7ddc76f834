"""bench/train_speed.py: the step it times is the trainer's, and its FLOP count is the model's."""

from __future__ import annotations

import pytest
import torch

from olmoe import OlmoeConfig
from olmoe.train.losses import megablocks_lb_loss, router_z_loss
from tests.bench_scripts import bench_script
from tests.conftest import tiny_model


def test_flops_count_every_multiplied_weight_six_times_and_causal_attention():
    config = OlmoeConfig.tiny()
    model = tiny_model()
    k, e = config.num_experts_per_tok, config.num_experts
    multiplied = 0  # weights a token multiplies: its k experts of e, all the rest
    for name, param in model.named_parameters():
        if "embed_tokens" not in name:  # a lookup; norm weights are counted as the config does
            multiplied += param.numel() * (k / e if ".experts." in name else 1)
    seq = 16
    attention = 6 * config.num_hidden_layers * seq * config.hidden_size
    with bench_script("train_speed") as script:
        flops = script.training_flops_per_token(config, seq)
    assert flops == pytest.approx(6 * multiplied + attention)


def test_the_timed_step_is_the_trainers_loss(tmp_path):
    model = tiny_model().train()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)
    )
    out = model(input_ids=ids, labels=ids, output_routing=True)
    expected = (
        out.loss + 0.01 * megablocks_lb_loss(out.routing) + 0.001 * router_z_loss(out.routing)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with bench_script("train_speed") as script:
        loss = script.olmoe_step(model, optimizer, ids, "fp32")
    assert loss == pytest.approx(expected.item(), rel=1e-6)
