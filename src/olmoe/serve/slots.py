"""A KV cache whose rows are independent sequences of different lengths (continuous batching).

Row r holds its sequence's keys and values at columns [0, length_r): no left padding, so a
sequence's positions and keys are exactly those it would have alone. A decode step writes each
row's new key at its own column `length_r` and attends over columns [0, kv_length) with a
padding mask that hides each row's columns past its own end (stale values of earlier
occupants). The active sequences always occupy rows [0, n): a leaving sequence's row is refilled
by moving the last row into it, so every step works on plain views, never on gathered copies.

It speaks the part of `olmoe.cache.KVCache`'s interface the model uses (`update`,
`get_seq_length`), so the unchanged model runs on it.

Letters: R rows (the largest batch), G key/value heads, C capacity, D head dimension.
"""

from __future__ import annotations

import torch

from olmoe.cache import KVCache


class SlotCache:
    def __init__(self, config, rows: int, dtype: torch.dtype, device: torch.device):
        self.num_layers = config.num_hidden_layers
        self.max_capacity = config.max_position_embeddings
        self.shape = (rows, config.num_key_value_heads, 0, config.head_dim)  # (R, G, C, D)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = 0
        # Set by `prepare` for the next decode step.
        self._active = 0
        self._write_at: torch.Tensor | None = None
        self._kv_length = 0

    def reserve(self, length: int) -> None:
        """Make room for sequences of up to `length` positions: grows by doubling (at most to
        the context window), so a sequence's decode steps reallocate O(log length) times."""
        if length <= self.capacity:
            return
        capacity = min(max(length, 2 * self.capacity, 64), self.max_capacity)
        r, g, _, d = self.shape
        old_k, old_v = self.keys, self.values
        # Zeros, not empty: a masked column still multiplies its value by a zero weight, and
        # 0 * NaN from uninitialised memory would poison the row.
        self.keys = [
            torch.zeros(r, g, capacity, d, dtype=self.dtype, device=self.device)
            for _ in range(self.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        for layer in range(len(old_k)):
            self.keys[layer][:, :, : self.capacity] = old_k[layer]
            self.values[layer][:, :, : self.capacity] = old_v[layer]
        self.capacity = capacity

    def load(self, row: int, prefilled: KVCache, length: int) -> None:
        """Copy a single sequence's prefilled cache (batch 1, `length` positions) into `row`."""
        for layer in range(self.num_layers):
            key, value = prefilled.layer(layer)  # (1, G, length, D)
            self.keys[layer][row, :, :length] = key[0]
            self.values[layer][row, :, :length] = value[0]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target`."""
        for layer in range(self.num_layers):
            self.keys[layer][target, :, :length] = self.keys[layer][source, :, :length]
            self.values[layer][target, :, :length] = self.values[layer][source, :, :length]

    def prepare(self, lengths: torch.Tensor) -> int:
        """Set up a decode step of rows [0, len(lengths)) whose cached lengths are `lengths` (n,):
        each writes its new key at its own length. Returns the step's key length."""
        self._active = len(lengths)
        self._write_at = lengths
        self._kv_length = int(lengths.max()) + 1
        return self._kv_length

    def get_seq_length(self, layer: int = 0) -> int:
        """Cached positions before the step (the model reads it only without cache_position)."""
        return self._kv_length - 1

    def decode_slot(self, layer: int, cache_position, like):
        """For the fused decoding kernel (see KVCache.decode_slot): the active rows' buffers,
        each row's write column and the step's key length."""
        n = self._active
        return self.keys[layer][:n], self.values[layer][:n], self._write_at, self._kv_length

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor, cache_position=None):
        """Store one new (n, G, 1, D) key/value per row at that row's own column; return the
        step's views (n, G, kv_length, D)."""
        n = self._active
        rows = torch.arange(n, device=key.device)
        self.keys[layer][rows, :, self._write_at] = key[:, :, 0]
        self.values[layer][rows, :, self._write_at] = value[:, :, 0]
        return (
            self.keys[layer][:n, :, : self._kv_length],
            self.values[layer][:n, :, : self._kv_length],
        )
