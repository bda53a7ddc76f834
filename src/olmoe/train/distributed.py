"""Data parallelism under torchrun: one code path for CPU (gloo) and GPUs (nccl).

`torchrun --nproc_per_node N -m olmoe train CONFIG` sets RANK/WORLD_SIZE/LOCAL_RANK; without
them (or with WORLD_SIZE=1) training runs in this process alone and nothing here talks to a
process group.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from olmoe.errors import ConfigError


@dataclass(frozen=True)
class Environment:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Environment:
    """Join torchrun's process group when there is one, and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"train.device {device!r} is not a torch device ({exc})") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device is cuda but no GPU is visible: use cpu or auto")
        target = torch.device("cuda", local_rank if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=target if target.type == "cuda" else None)
    return Environment(rank, world_size, local_rank, target)


def shutdown(env: Environment) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, env: Environment) -> torch.nn.Module:
    """Shard (FSDP2: each decoder layer, then the rest) or replicate (DDP) across the ranks.
    Parameters stay float32 (the master weights); bf16 comes from autocast in the step."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The OlmoeForCausalLM inside a DDP wrapper (FSDP2 shards in place: no wrapper)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync"):  # DDP
        with contextlib.nullcontext() if enabled else model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def barrier(env: Environment) -> None:
    """Wait until every rank gets here (nothing to wait for when alone)."""
    if env.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, env: Environment) -> torch.Tensor:
    """The sum of `tensor` over the ranks (in place; the tensor itself when alone)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s result as a plain tensor (a DTensor under FSDP2)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
