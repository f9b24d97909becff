"""The per-sequence state of a hybrid model: a KV cache for its full-attention layers and,
for each linear-attention (Gated DeltaNet) layer, the rolling conv state and the fp32
delta-rule state, row b of every array belonging to sequence b.

The recurrent states cannot be rolled back by forgetting positions the way keys and values
can, so rollback goes through `snapshot()` / `restore()`, or, for speculative decoding,
through a trail: after `record_next()`, the next forward keeps the recurrent state after
each of its positions (the model runs the recurrence token by token then, the same
computation as decoding), and `truncate()` can return to any of them exactly.
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
                 kv_dtype: str = "f32", key_transforms=None):
        self.batch = batch
        self.kv = KVCache(num_full, batch, num_kv_heads, head_dim, capacity, kv_dtype,
                          key_transforms)
        self.conv = [np.zeros((batch, conv_kernel - 1, conv_dim), np.float32)
                     for _ in range(num_linear)]
        self.delta = [np.zeros((batch, value_heads, key_head_dim, value_head_dim), np.float32)
                      for _ in range(num_linear)]
        self.recording = False  # the next forward keeps a trail (record_next)
        self._trail_start: int | None = None
        self._trail: list[np.ndarray] = []  # per layer state: [T + 1, ...] copies
        # the trail's buffers, kept from verify to verify (see RecurrentStateSlots._spare)
        self._trail_buf: list[np.ndarray] = []

    def record_next(self) -> None:
        """Make the next forward keep the recurrent state after each of its positions, so
        that `truncate` can cut back to any of them (speculative verify)."""
        self.recording = True

    def start_trail(self, tokens: int) -> None:
        """Called by the model at the start of a recorded forward of `tokens` positions:
        room for the states after 0 .. tokens of them, the current one as entry 0."""
        self._trail_start = self.offset
        states = self.conv + self.delta
        if not self._trail_buf or self._trail_buf[0].shape[0] <= tokens:
            self._trail_buf = [np.empty((tokens + 1,) + s.shape, s.dtype) for s in states]
        self._trail = [b[:tokens + 1] for b in self._trail_buf]
        for state, trail in zip(states, self._trail):
            trail[0] = state

    def trail_views(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Linear layer `layer`'s conv and delta trail after positions 1 .. T of the
        recorded forward, [T, B, ...] (contiguous): the model's verify writes them in place."""
        n = len(self.conv)
        return self._trail[layer][1:], self._trail[n + layer][1:]

    def keep_state(self, layer: int, position: int) -> None:
        """Record linear layer `layer`'s conv and delta state after `position` + 1 tokens
        of the recorded forward."""
        n = len(self.conv)
        self._trail[layer][position + 1] = self.conv[layer]
        self._trail[n + layer][position + 1] = self.delta[layer]

    def end_trail(self) -> None:
        self.recording = False

    def drop_trail(self) -> None:
        """A forward that is not recorded invalidates the last trail."""
        self._trail = []

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
        """Cut back to `length` positions: a no-op at the current offset, else a position
        of the last recorded forward (`record_next`); the recurrent states hold every
        position folded together, so anything earlier needs snapshot() / restore()."""
        if length == self.offset:
            self._trail = []
            return
        start = self._trail_start
        if not self._trail or start is None or not start <= length < self.offset:
            raise ValueError(f"a hybrid cache cannot be truncated from {self.offset} to "
                             f"{length} positions; record_next() before the forward, or "
                             f"take snapshot() before and restore() it")
        self.kv.truncate(length)
        for state, trail in zip(self.conv + self.delta, self._trail):
            state[...] = trail[length - start]
        self._trail = []
