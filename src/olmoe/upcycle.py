"""Sparse upcycling (Komatsuzaki et al., 2022), as the OLMoE paper did it from OLMo-1B: a dense
model becomes an MoE whose every expert starts as a copy of the dense MLP.

Per MoE layer: each of the E experts is the dense layer's SwiGLU MLP (gate, up and down
projections at the dense width), the router is new, drawn from normal(0, `ROUTER_STD`), and with
`noise` each entry of the copied expert weights is replaced, with that probability, by a fresh
normal(0, `ROUTER_STD`) draw (the paper's noise-injection option, 0.5 there). With
`shared_expert` the dense MLP is copied once more into an always-on shared expert. Everything
else (embeddings, attention, norms, LM head) is copied as it is.

With renormalised top-k (`norm_topk_prob`), no noise and no shared expert the upcycled model
computes exactly the dense model's function: its K chosen experts are one MLP, and their
weights sum to one.
"""

from __future__ import annotations

import dataclasses

import torch

from olmoe.config import OlmoeConfig
from olmoe.errors import InputError
from olmoe.model import OlmoeForCausalLM

ROUTER_STD = 0.02  # allenai/OLMoE scripts/sparsify_ckpt_unsharded.py: router and noise std


def upcycled_config(
    dense: OlmoeConfig,
    num_experts: int,
    top_k: int,
    shared_expert: bool = False,
    dense_every: int = 0,
    norm_topk_prob: bool = False,
) -> OlmoeConfig:
    """The MoE config made from a dense one: experts of the dense MLP's width. `dense_every`
    N > 0 keeps every N-th layer (the N-th, 2N-th, ...) dense."""
    if len(dense.mlp_only_layers) != dense.num_hidden_layers:
        raise InputError(
            "upcycling starts from a dense model (an MLP in every layer, such as an OLMo "
            "checkpoint); this one already has experts"
        )
    if dense_every < 0:
        raise InputError(
            f"dense_every must be >= 0 (0: every layer gets experts), got {dense_every}"
        )
    width = dense.dense_width
    kept_dense = [
        i for i in range(dense.num_hidden_layers) if dense_every and (i + 1) % dense_every == 0
    ]
    config = dataclasses.replace(
        dense,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        intermediate_size=width,
        norm_topk_prob=norm_topk_prob,
        shared_expert_intermediate_size=width if shared_expert else 0,
        mlp_only_layers=kept_dense,
        dense_intermediate_size=width,
    )
    config.extra = {k: v for k, v in dense.extra.items() if k not in ("torch_dtype", "dtype")}
    return config


@torch.no_grad()
def upcycle(
    dense: OlmoeForCausalLM,
    num_experts: int,
    top_k: int,
    noise: float = 0.0,
    shared_expert: bool = False,
    dense_every: int = 0,
    norm_topk_prob: bool = False,
    seed: int = 0,
) -> OlmoeForCausalLM:
    """The MoE model upcycled from `dense` (see the module's docstring), in its dtype."""
    if not 0.0 <= noise <= 1.0:
        raise InputError(
            f"noise is the fraction of expert entries replaced, in [0, 1]; got {noise}"
        )
    config = upcycled_config(
        dense.config, num_experts, top_k, shared_expert, dense_every, norm_topk_prob
    )
    with torch.device("meta"):
        model = OlmoeForCausalLM(config)
    model.to(dtype=dense.dtype).to_empty(device=dense.device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator(device=dense.device).manual_seed(seed)
    source = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if name in source:  # attention, norms, embeddings, LM head, the layers kept dense
            param.copy_(source[name])
            continue
        layer = name.split(".mlp.")[0]
        mlp = {p: source[f"{layer}.mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        if name.endswith("mlp.gate.weight"):
            param.normal_(0.0, ROUTER_STD, generator=generator)
        elif name.endswith("experts.gate_up_proj"):
            param.copy_(torch.cat([mlp["gate"], mlp["up"]]).expand_as(param))
        elif name.endswith("experts.down_proj"):
            param.copy_(mlp["down"].expand_as(param))
        elif ".shared_expert." in name:
            param.copy_(mlp[name.split(".shared_expert.")[1].split("_proj")[0]])
        else:
            raise AssertionError(f"upcycling has no rule for {name}")
        if noise and ".experts." in name:
            _inject_noise(param, noise, generator)
    return model.eval()


def _inject_noise(weight: torch.Tensor, fraction: float, generator: torch.Generator) -> None:
    """Replace each entry, with probability `fraction`, by a normal(0, ROUTER_STD) draw."""
    chosen = torch.rand(weight.shape, generator=generator, device=weight.device) < fraction
    fresh = torch.empty_like(weight).normal_(0.0, ROUTER_STD, generator=generator)
    weight.copy_(torch.where(chosen, fresh, weight))
