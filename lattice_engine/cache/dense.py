"""`KVCache`: the keys and values of one batch of sequences in contiguous arrays, the
cache `generate` and perplexity use (the paged pool in `paged.py` serves many sequences)."""

from __future__ import annotations

import numpy as np


class KVCache:
    """Keys and values of every attention layer for a batch of sequences at one offset.

    Storage is [B, capacity, H_kv, D] per layer and grows by doubling; `offset` is how
    many positions are filled. `truncate(n)` rolls back (speculative decoding, retries).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int = 256):
        self.batch, self.heads, self.head_dim = batch, num_kv_heads, head_dim
        self.capacity = capacity
        self.keys = [np.zeros((batch, capacity, num_kv_heads, head_dim), np.float32)
                     for _ in range(num_layers)]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.offset = 0

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions (reallocating the arrays if it grows)."""
        if needed > self.capacity:
            self._grow(needed)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.zeros((self.batch, new_cap, self.heads, self.head_dim), np.float32)
                grown[:, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [B, T, H, D] at the current offset; return all keys/values so far."""
        t = k.shape[1]
        end = self.offset + t
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, self.offset:end] = k
        self.values[layer][:, self.offset:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, t: int) -> None:
        self.offset += t

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot truncate a cache of {self.offset} positions to {length}")
        self.offset = length
