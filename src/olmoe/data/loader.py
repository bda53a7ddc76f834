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


class SeededOrder:
    """Which items each rank takes at each step: every epoch visits the items in the order of a
    permutation drawn from (seed, epoch) alone; each step takes the next `batch_size *
    world_size` of them, and this rank its `batch_size`.

    The global batch at step s is the same for any split of it into ranks: one process with
    batch_size 2B sees exactly the items two processes with B see together, in the same order.
    Each epoch uses the largest multiple of `items_per_step` items of its order (default: one
    global batch) and skips the rest; the next epoch starts from a new permutation. A trainer
    that accumulates gradients passes the items of a whole optimizer step (micro-batch x ranks x
    accumulation), so that runs splitting the same step differently (2 ranks x 1 micro-batch,
    or 1 rank x 2) share their epochs' ends and see the same items throughout. A resumed run
    needs only (seed, epoch, position) to continue exactly where it stopped.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        items_per_step: int | None = None,
        what: str = "",
    ) -> None:
        for name, value in (("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch_size = self.batch_size * self.world_size
        step = self.global_batch_size if items_per_step is None else items_per_step
        if not isinstance(step, (int, np.integer)) or step < 1 or step % self.global_batch_size:
            raise ConfigError(
                "the items of a step must be a multiple of batch_size x world_size = "
                f"{self.global_batch_size}, got {items_per_step!r}"
            )
        if self.num_items < step:
            raise DataError(
                f"{what or f'{self.num_items:,} items'}, fewer than one step's {step} "
                f"({batch_size} per rank x {world_size} ranks x {step // self.global_batch_size} "
                "micro-batches): use more data, or a shorter sequence or smaller batch"
            )
        self.items_per_epoch = self.num_items // step * step
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0  # items of this epoch's order already consumed (all ranks)
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return self.items_per_epoch // self.global_batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of item indices epoch `epoch` visits: a function of (seed, epoch)."""
        # uint32 where it fits: the order is held in memory for the whole epoch (4 bytes per
        # item, 1.2B instances for OLMoE's 5T tokens at 4096). Same order as permutation().
        dtype = np.uint32 if self.num_items <= 2**32 else np.int64
        order = np.arange(self.num_items, dtype=dtype)
        np.random.default_rng([self.seed, epoch]).shuffle(order)
        return order

    def next_indices(self) -> np.ndarray:
        """This rank's item indices for the next step."""
        if self.position + self.global_batch_size > self.items_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = None
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch_size
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """Where the order stands: restoring it continues with exactly the next items."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_instances": self.num_items,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output; the data must be the one it came from (the
        per-rank batch size may differ as long as the global order is the same)."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise CheckpointError(f"loader state lacks {', '.join(sorted(missing))}")
        if "num_instances" in state and state["num_instances"] != self.num_items:
            raise ConfigError(
                f"the loader state is for num_instances={state['num_instances']}, this data "
                f"gives {self.num_items}: resume with the same data (and sequence length)"
            )
        if not 0 <= int(state["position"]) <= self.num_items or int(state["epoch"]) < 0:
            raise CheckpointError(f"loader state out of range: {state}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.position = int(state["position"])
        self._order = None


class InstanceLoader(SeededOrder):
    """Batches of fixed-length instances of a token stream (see SeededOrder for the order):
    each `next_batch()` returns this rank's `batch_size` instances of the next step."""

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
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ConfigError(f"seq_len must be an integer >= 1, got {seq_len!r}")
        tokens = np.asarray(tokens)  # a memory map stays one (no copy)
        if tokens.ndim != 1:
            raise InputError(f"tokens must be a flat array, got shape {tuple(tokens.shape)}")
        self.instances = as_instances(tokens, seq_len)
        self.seq_len = int(seq_len)
        what = f"{len(tokens):,} tokens make {len(self.instances):,} instances of {seq_len} tokens"
        super().__init__(
            len(self.instances), batch_size, seed, rank, world_size, instances_per_step, what
        )

    @property
    def num_instances(self) -> int:
        return self.num_items

    @property
    def instances_per_epoch(self) -> int:
        return self.items_per_epoch

    def next_batch(self) -> torch.Tensor:
        """This rank's next (batch_size, seq_len) LongTensor."""
        return torch.from_numpy(self.instances[self.next_indices()].astype(np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seq_len" in state and state["seq_len"] != self.seq_len:
            raise ConfigError(
                f"the loader state is for seq_len={state['seq_len']}, this data gives "
                f"{self.seq_len}: resume with the same token files and sequence length"
            )
        super().load_state_dict(state)
