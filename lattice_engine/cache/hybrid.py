"""The per-sequence state of a hybrid model: a KV cache for its full-attention layers and,
for each linear-attention (Gated DeltaNet) layer, the rolling conv state and the fp32
delta-rule state, row b of every array belonging to sequence b.

The recurrent states cannot be rolled back by forgetting positions the way keys and values
can, so rollback goes through `snapshot()` / `restore()`, or, for speculative decoding,
through a trail: after `record_next()`, the next forward keeps the conv window after each
of its positions and each position's delta-rule inputs, leaving the delta states as they
were (the model runs the recurrence token by token then, the same computation as
decoding), and `truncate()` returns to any of them exactly: the windows are copied back,
the kept positions replayed on the delta states (`delta_replay`, see
`RecurrentStateSlots`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dense import KVCache
from .recurrent import Replay


@dataclass(frozen=True)
class HybridSnapshot:
    """The cache at one offset: copies of the recurrent states (KV rows are not copied;
    restore truncates the KV cache back to `offset`)."""

    offset: int
    conv: tuple[np.ndarray, ...]
    delta: tuple[np.ndarray, ...]


class HybridCache:
    """KV for `num_full` attention layers, conv [B, K-1, C] and delta [B, Hv, Dk, Dv]
    states for `num_linear` Gated-DeltaNet layers, all at one offset. delta_replay: per
    linear layer, how its delta state follows a verified position's inputs (rows
    [n, B, *row_shape]); without it the cache cannot record a verify."""

    def __init__(self, batch: int, *, num_full: int, num_kv_heads: int, head_dim: int,
                 num_linear: int, conv_dim: int, conv_kernel: int, value_heads: int,
                 key_head_dim: int, value_head_dim: int, capacity: int = 256,
                 kv_dtype: str = "f32", key_transforms=None,
                 delta_replay: list[Replay] | None = None):
        self.batch = batch
        self.kv = KVCache(num_full, batch, num_kv_heads, head_dim, capacity, kv_dtype,
                          key_transforms)
        self.conv = [np.zeros((batch, conv_kernel - 1, conv_dim), np.float32)
                     for _ in range(num_linear)]
        self.delta = [np.zeros((batch, value_heads, key_head_dim, value_head_dim), np.float32)
                      for _ in range(num_linear)]
        if delta_replay is not None and len(delta_replay) != num_linear:
            raise ValueError(f"{len(delta_replay)} delta replays for {num_linear} linear layers")
        self.delta_replay = delta_replay
        self.recording = False  # the next forward keeps a trail (record_next)
        self._trail_start: int | None = None
        # per linear layer, conv windows [T + 1, B, K-1, C] (entry 0: the window now), then
        # per linear layer the positions' delta-rule inputs [T + 1, B, ...] (entry 0 unused)
        self._trail: list[np.ndarray] = []
        # the trail's buffers, kept from verify to verify (see RecurrentStateSlots._spare)
        self._trail_buf: list[np.ndarray] = []

    def record_next(self) -> None:
        """Make the next forward keep a trail of its positions, so that `truncate` can cut
        back to any of them (speculative verify)."""
        if self.delta_replay is None and self.delta:
            raise ValueError("this hybrid cache cannot record a verify: it was made without "
                             "delta_replay (make it with the model's make_cache)")
        self.recording = True

    def start_trail(self, tokens: int) -> None:
        """Called by the model at the start of a recorded forward of `tokens` positions:
        room for the conv windows after 0 .. tokens of them (the current one as entry 0)
        and for each position's delta-rule inputs."""
        self.drop_trail()
        self._trail_start = self.offset
        shapes = [c.shape for c in self.conv] + \
            [(self.batch,) + tuple(r.row_shape) for r in (self.delta_replay or [])]
        if not self._trail_buf or self._trail_buf[0].shape[0] <= tokens:
            self._trail_buf = [np.empty((tokens + 1,) + s, np.float32) for s in shapes]
        self._trail = [b[:tokens + 1] for b in self._trail_buf]
        for state, trail in zip(self.conv, self._trail):
            trail[0] = state

    def trail_views(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Linear layer `layer`'s trail for positions 1 .. T of the recorded forward, [T, B,
        ...] (contiguous): the conv window after each position and each position's
        delta-rule inputs; the model's verify writes them in place."""
        n = len(self.conv)
        return self._trail[layer][1:], self._trail[n + layer][1:]

    def end_trail(self) -> None:
        self.recording = False

    def drop_trail(self) -> None:
        """Keep every position of the last recorded forward (its delta states are replayed
        over all of them) and forget its trail: a forward that is not recorded, a
        snapshot, or the next recorded forward settles the last one this way."""
        if self._trail:
            self.truncate(self.offset)

    @property
    def offset(self) -> int:
        return self.kv.offset

    def advance(self, t: int) -> None:
        self.kv.advance(t)

    def snapshot(self) -> HybridSnapshot:
        self.drop_trail()
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
        self._trail = []  # the states come from the snapshot, not from the last verify
        self.kv.truncate(snap.offset)
        for mine, saved in zip(self.conv + self.delta, snap.conv + snap.delta):
            mine[...] = saved

    def truncate(self, length: int) -> None:
        """Cut back to `length` positions: a no-op at the current offset, else a position
        of the last recorded forward (`record_next`); the recurrent states hold every
        position folded together, so anything earlier needs snapshot() / restore()."""
        if length == self.offset and not self._trail:
            return
        start = self._trail_start
        if not self._trail or start is None or not start <= length <= self.offset:
            raise ValueError(f"a hybrid cache cannot be truncated from {self.offset} to "
                             f"{length} positions; record_next() before the forward, or "
                             f"take snapshot() before and restore() it")
        self.kv.truncate(length)
        kept, n = length - start, len(self.conv)
        for state, trail in zip(self.conv, self._trail[:n]):
            state[...] = trail[kept]
        if kept:  # the verify left the delta states as they were: replay the kept positions
            for state, trail, replay in zip(self.delta, self._trail[n:], self.delta_replay):
                replay.apply(state, trail[1:kept + 1])
        self._trail = []
