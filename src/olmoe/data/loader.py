"""Fixed-length training instances from a token stream, in a seeded order, split across ranks.

As in OLMo, the concatenated documents (eos-separated) are cut into `len(tokens) // seq_len`
consecutive instances, ignoring document boundaries; the tail shorter than one instance is
never used. Each epoch visits the instances in the order of a permutation drawn from (seed,
epoch) alone, so any process can compute any epoch's order without communication, and a
resumed run only needs (seed, epoch, position) to continue exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from olmoe.errors import CheckpointError, ConfigError, DataError, InputError


def as_instances(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The (len(tokens) // seq_len, seq_len) view of `tokens` (no copy; the tail is dropped)."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    count = len(tokens) // seq_len
    return tokens[: count * seq_len].reshape(count, seq_len)


class InstanceLoader:
    """Batches of instances: each `next_batch()` takes the next `batch_size * world_size`
    instances of the epoch's order and returns this rank's `batch_size` of them.

    The global batch at step s is the same for any split of it into ranks: one process with
    batch_size 2B sees exactly the instances two processes with B see together, in the same
    order. Each epoch uses the largest multiple of `instances_per_step` instances of its order
    (default: one global batch) and skips the rest; the next epoch starts from a new
    permutation. A trainer that accumulates gradients passes the instances of a whole optimizer
    step (micro-batch x ranks x accumulation), so that runs splitting the same step differently
    (2 ranks x 1 micro-batch, or 1 rank x 2) share their epochs' ends and see the same
    instances throughout.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        instances_per_step: int | None = None,
    ) -> None:
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                            ("world_size", world_size)):  # fmt: skip
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        tokens = np.asarray(tokens)  # a memory map stays one (no copy)
        if tokens.ndim != 1:
            raise InputError(f"tokens must be a flat array, got shape {tuple(tokens.shape)}")
        self.instances = as_instances(tokens, seq_len)
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch_size = self.batch_size * self.world_size
        step = self.global_batch_size if instances_per_step is None else instances_per_step
        if not isinstance(step, (int, np.integer)) or step < 1 or step % self.global_batch_size:
            raise ConfigError(
                "instances_per_step must be a multiple of batch_size x world_size = "
                f"{self.global_batch_size}, got {instances_per_step!r}"
            )
        if len(self.instances) < step:
            raise DataError(
                f"{len(tokens):,} tokens make {len(self.instances):,} instances of {seq_len} "
                f"tokens, fewer than one step's {step} ({batch_size} per rank x {world_size} "
                f"ranks x {step // self.global_batch_size} micro-batches): use more data, or a "
                "shorter sequence or smaller batch"
            )
        self.instances_per_epoch = len(self.instances) // step * step
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # instances of this epoch's order already consumed (all ranks)
        self._order: np.ndarray | None = None

    @property
    def num_instances(self) -> int:
        return len(self.instances)

    @property
    def batches_per_epoch(self) -> int:
        return self.instances_per_epoch // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of instance indices epoch `epoch` visits: a function of (seed, epoch)."""
        # uint32 where it fits: the order is held in memory for the whole epoch (4 bytes per
        # instance, 1.2B instances for OLMoE's 5T tokens at 4096). Same order as permutation().
        dtype = np.uint32 if self.num_instances <= 2**32 else np.int64
        order = np.arange(self.num_instances, dtype=dtype)
        np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def next_batch(self) -> torch.Tensor:
        """This rank's next (batch_size, seq_len) LongTensor."""
        if self.position + self.global_batch_size > self.instances_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position + self.rank * self.batch_size
        rows = self.instances[self._order[start : start + self.batch_size]].astype(np.int64)
        self.position += self.global_batch_size
        return torch.from_numpy(rows)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: restoring it continues with exactly the next instances."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_instances": self.num_instances,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output; the data and seq_len must be the ones it came
        from (the per-rank batch size may differ as long as the global order is the same)."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise CheckpointError(f"loader state lacks {', '.join(sorted(missing))}")
        for key, mine in (("num_instances", self.num_instances), ("seq_len", self.seq_len)):
            if key in state and state[key] != mine:
                raise ConfigError(
                    f"the loader state is for {key}={state[key]}, this data gives {mine}: "
                    "resume with the same token files and sequence length"
                )
        if not 0 <= int(state["position"]) <= self.num_instances or int(state["epoch"]) < 0:
            raise CheckpointError(f"loader state out of range: {state}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = int(state["position"])
        self._order = None
