"""The optimizer (AdamW, or RMSprop) over the model's parameters, in one or two weight-decay
groups."""

from __future__ import annotations

import torch

from olmoe.train.config import OptimSection


def param_groups(model: torch.nn.Module, optim: OptimSection) -> list[dict]:
    """Parameters whose name contains one of `optim.no_decay` get no weight decay; the rest get
    `optim.weight_decay`. (OLMoE decays every parameter, norms and embeddings included, so by
    default there is one group.)"""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = any(pattern in name for pattern in optim.no_decay)
            (no_decay if exempt else decay).append(param)
    groups = [
        {"params": params, "weight_decay": weight_decay}
        for params, weight_decay in ((decay, optim.weight_decay), (no_decay, 0.0))
        if params
    ]
    return groups


def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas and eps (or RMSprop with its eps, as trl 0.9.6's KTO ran
    it); the state is float32 like the master weights.

    PyTorch's fused AdamW (one pass over each tensor) where it applies: several times faster
    on the CPU than the default for-each implementation (docs/training.md). FSDP2's sharded
    (DTensor) parameters keep the default implementation."""
    from torch.distributed.tensor import DTensor

    if optim.name == "rmsprop":
        return torch.optim.RMSprop(param_groups(model, optim), lr=optim.lr, eps=optim.eps)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, optim),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        fused=None if sharded else True,
    )
