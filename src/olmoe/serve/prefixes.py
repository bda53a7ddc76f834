"""Keys and values of recent prompts, so that a prompt starting like one of them is prefilled
only past the shared part: few-shot evaluation sends hundreds of prompts that share their
examples and differ only in the last question.

The shared part's keys and values are those the earlier prefill computed; the rest is computed
over them. That is the same arithmetic as one prefill of the whole prompt but in two matrix
products instead of one, so results can differ from a whole prefill in the last bits. That is
why the engine keeps no prefixes unless asked to (`Engine(prefix_cache_tokens=...)`).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from olmoe.cache import KVCache

# Shorter shared beginnings (a BOS token, a chat template's opening) are not worth the copy.
MIN_SHARED_TOKENS = 32


class PrefixCache:
    """The caches of the most recent prompts, least recently used dropped first, holding at most
    `max_tokens` positions in all."""

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self._entries: collections.OrderedDict[tuple[int, ...], KVCache] = collections.OrderedDict()
        self._tokens = 0
        self.reused_tokens = 0  # positions not prefilled again, since the start

    def longest_prefix(self, prompt: Sequence[int]) -> tuple[int, KVCache | None]:
        """(n, cache) where the cache's first n positions are `prompt`'s first n, n as large as
        any entry allows but below len(prompt): the last position is always computed, for the
        logits of the first new token. (0, None) when no entry shares MIN_SHARED_TOKENS."""
        best, best_key = 0, None
        for key in self._entries:
            shared = _shared_length(key, prompt, len(prompt) - 1)
            if shared > best:
                best, best_key = shared, key
        if best < MIN_SHARED_TOKENS:
            return 0, None
        self._entries.move_to_end(best_key)
        self.reused_tokens += best
        return best, self._entries[best_key]

    def add(self, prompt: Sequence[int], cache: KVCache) -> None:
        """Keep `cache`, which holds exactly `prompt`'s positions (the engine no longer writes
        to it)."""
        key = tuple(prompt)
        if len(key) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = cache
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            dropped, _ = self._entries.popitem(last=False)
            self._tokens -= len(dropped)


def copy_prefix(source: KVCache, length: int, capacity: int) -> KVCache:
    """A new cache (room for `capacity` positions) holding `source`'s first `length`."""
    cache = KVCache(source.num_layers, capacity=capacity)
    for layer in range(source.num_layers):
        key, value = source.layer(layer)
        cache.update(layer, key[:, :, :length], value[:, :, :length])
    return cache


def _shared_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y or shared == limit:
            break
        shared += 1
    return shared
