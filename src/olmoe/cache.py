"""Key/value cache for incremental decoding.

One buffer per layer, `(B, num_key_value_heads, capacity, head_dim)`, written in place. Give
`capacity` up front (prompt + new tokens) and decoding never reallocates; without it the buffers
grow by doubling, so appending one token at a time stays amortised O(1).
"""

from __future__ import annotations

import torch

from olmoe.errors import InputError


class KVCache:
    def __init__(self, num_layers: int, capacity: int = 0):
        if num_layers <= 0:
            raise InputError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @classmethod
    def from_legacy(cls, past: tuple | list) -> KVCache:
        """From a tuple of `(key, value)` pairs per layer, each `(B, kv_heads, past, head_dim)`."""
        cache = cls(len(past))
        for layer, (key, value) in enumerate(past):
            cache.update(layer, key, value)
        return cache

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self.layer(i) for i in range(self.num_layers))

    def get_seq_length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def __len__(self) -> int:
        return self.num_layers

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values of `layer`, views of length `get_seq_length(layer)`."""
        n = self.lengths[layer]
        return self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def update(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new `(B, kv_heads, T, head_dim)` keys/values; return all of this layer's.

        Without `cache_position` they are appended; with it they are written at those positions
        (rewriting a tail, as speculative decoding or a retried step does) and the cache ends
        after the last of them.
        """
        start = self.lengths[layer]
        new = key.shape[2]
        if cache_position is not None:
            first, end = int(cache_position[0]), int(cache_position[-1]) + 1
            if new == 1 or bool((cache_position.diff() == 1).all()):
                # consecutive positions (prefill, decoding): a plain copy, 20x index_copy_'s speed
                start, cache_position = first, None
        else:
            end = start + new
        self._reserve(layer, key, value, end)
        if cache_position is None:
            self.keys[layer][:, :, start:end] = key
            self.values[layer][:, :, start:end] = value
        else:
            positions = cache_position.to(key.device)
            self.keys[layer].index_copy_(2, positions, key)
            self.values[layer].index_copy_(2, positions, value)
        self.lengths[layer] = end
        return self.layer(layer)

    def decode_slot(
        self, layer: int, cache_position: torch.Tensor, like: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """For a decoding kernel that writes the step's key and value in place: the whole key
        and value buffers of `layer`, each row's write position (B,) and the key length to
        attend over. The step's one position becomes the last cached one. like: (B, kv_heads,
        head_dim) of the buffers if they have to be created (bf16, the kernels' dtype)."""
        b, heads, dim = like
        position = int(cache_position[0])
        buffer = self.keys[layer]
        template = (
            buffer[:, :, :0]
            if buffer is not None
            else torch.empty(b, heads, 0, dim, dtype=torch.bfloat16)
        )
        self._reserve(layer, template, template, position + 1)
        self.lengths[layer] = position + 1
        positions = torch.full((b,), position, dtype=torch.int64)
        return self.keys[layer], self.values[layer], positions, position + 1

    def _reserve(self, layer: int, key: torch.Tensor, value: torch.Tensor, length: int) -> None:
        buffer = self.keys[layer]
        if buffer is not None and buffer.shape[2] >= length:
            return
        capacity = max(length, self.capacity, 2 * buffer.shape[2] if buffer is not None else 0)
        b, h, _, d = key.shape
        grown_k = key.new_empty(b, h, capacity, d)
        grown_v = value.new_empty(b, h, capacity, value.shape[-1])
        if buffer is not None:
            n = self.lengths[layer]
            grown_k[:, :, :n] = buffer[:, :, :n]
            grown_v[:, :, :n] = self.values[layer][:, :, :n]
        self.keys[layer], self.values[layer] = grown_k, grown_v

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select batch rows (beam search, or dropping finished sequences)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, beam_idx.to(self.keys[i].device))
                self.values[i] = self.values[i].index_select(0, beam_idx.to(self.values[i].device))

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions."""
        self.lengths = [min(n, length) for n in self.lengths]
