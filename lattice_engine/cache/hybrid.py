"""The per-sequence state of a hybrid model: a KV cache for its full-attention layers and,
for each linear-attention (Gated DeltaNet) layer, the rolling conv state and the fp32
delta-rule state, row b of every array belonging to sequence b.

The recurrent states cannot be rolled back by forgetting positions the way keys and values
can, so rollback (speculative decoding, prefix caching, retries) goes through
`snapshot()` / `restore()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dense import KVCache


@dataclass(frozen=True)
class HybridSnapshot:
    """The cache at one offset: copies of the recurrent states (KV rows are not copied;
    restore truncates the KV cache back to `offset`)."""

    offset: int
    conv: tuple[np.ndarray, ...]
    delta: tuple[np.ndarray, ...]


class HybridCache:
    """KV for `num_full` attention layers, conv [B, K-1, C] and delta [B, Hv, Dk, Dv]
    states for `num_linear` Gated-DeltaNet layers, all at one offset."""

    def __init__(self, batch: int, *, num_full: int, num_kv_heads: int, head_dim: int,
                 num_linear: int, conv_dim: int, conv_kernel: int, value_heads: int,
                 key_head_dim: int, value_head_dim: int, capacity: int = 256,
                 kv_dtype: str = "f32"):
        self.batch = batch
        self.kv = KVCache(num_full, batch, num_kv_heads, head_dim, capacity, kv_dtype)
        self.conv = [np.zeros((batch, conv_kernel - 1, conv_dim), np.float32)
                     for _ in range(num_linear)]
        self.delta = [np.zeros((batch, value_heads, key_head_dim, value_head_dim), np.float32)
                      for _ in range(num_linear)]

    @property
    def offset(self) -> int:
        return self.kv.offset

    def advance(self, t: int) -> None:
        self.kv.advance(t)

    def snapshot(self) -> HybridSnapshot:
        return HybridSnapshot(self.offset, tuple(c.copy() for c in self.conv),
                              tuple(d.copy() for d in self.delta))

    def restore(self, snap: HybridSnapshot) -> None:
        """Return to the state of `snap`, taken from this cache at an offset <= the current
        one (positions written after it are dropped)."""
        if snap.offset > self.offset:
            raise ValueError(f"cannot restore a snapshot at offset {snap.offset} into a cache "
                             f"at offset {self.offset}: the KV rows after {self.offset} are gone")
        if len(snap.conv) != len(self.conv) or any(
                a.shape != b.shape for a, b in zip(snap.conv + snap.delta, self.conv + self.delta)):
            raise ValueError("the snapshot was taken from a cache of another shape")
        self.kv.truncate(snap.offset)
        for mine, saved in zip(self.conv + self.delta, snap.conv + snap.delta):
            mine[...] = saved

    def truncate(self, length: int) -> None:
        """Only a no-op truncation is possible without a snapshot: the recurrent states
        hold every position folded together."""
        if length != self.offset:
            raise ValueError(f"a hybrid cache cannot be truncated from {self.offset} to "
                             f"{length} positions; take snapshot() before and restore() it")
