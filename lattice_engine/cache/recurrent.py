"""Recurrent-state slots for linear-attention layers (Gated DeltaNet and kin).

A linear-attention layer carries a fixed-size state per sequence (e.g. a conv window and
a [H, Dk, Dv] memory) instead of a growing K/V history. Serving needs:
- one slot per running sequence, preallocated, acquired on admission and released when the
  sequence finishes, is aborted or preempted;
- prefix reuse: a prefix can only be skipped if the state *after* it is known, so when a
  block of a sequence becomes full the model's state at that boundary is snapshotted under
  the block's chained hash; a later sequence that matches the prefix restores it. Snapshots
  are dropped when their block leaves the prefix cache (`PagedKVCache` wires that up).
  They are large (Qwen3.5-0.8B: 19 MB each), so they are bounded by bytes
  (`snapshot_budget_bytes`) as well as by count, and the arrays of a dropped snapshot are
  reused by the next one: a fresh 19 MB copy costs a page fault per 4 KiB, which measured
  10x the copy itself (19 ms per snapshot, 12% of an 8-stream decode step).

The model owns the meaning of the arrays: `state(slot)` returns writable views it updates
in place, one array per entry of `shapes`.

Speculative decoding verifies several tokens of a sequence in one step and may keep only
some: the model then records a trail for that slot (`start_trail`) and `rollback` sets the
slot to the state after the rows that were kept, bit for bit what decoding them would give.
A trail holds, per array, either the state after each verified row (`keep`), or, for an
array the model declares replayable (`Replay`), each row's inputs: the verify leaves such a
state as it was and `rollback` replays the kept rows on it. That is for large states (a
Gated DeltaNet layer's 1 MB per sequence), where writing the state after every row cost a
verify more than its rows' arithmetic: a replay reads and writes the state once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Replay:
    """How an array's state follows verified rows: `row_shape` is one row's inputs, and
    `apply(state, rows)` advances `state` (a slot's array, in place) over `rows`
    [n, *row_shape] exactly as decoding them one at a time would."""

    row_shape: tuple[int, ...]
    apply: Callable[[np.ndarray, np.ndarray], None]


# Snapshot memory per cache unless told otherwise: with Qwen3.5-0.8B's 19 MB states, 56
# prefix boundaries (the count limit alone, 256, would be 4.8 GB).
SNAPSHOT_BUDGET_BYTES = 1 << 30
# dropped snapshots whose arrays wait for reuse (one per sequence finishing a block in a
# step is the common case; more would only hold memory)
_SPARE_SNAPSHOTS = 8


class RecurrentStateSlots:
    def __init__(self, shapes: Sequence[tuple[int, ...]], num_slots: int,
                 max_snapshots: int = 256, dtype=np.float32,
                 snapshot_budget_bytes: int = SNAPSHOT_BUDGET_BYTES,
                 replays: dict[int, Replay] | None = None):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if max_snapshots < 0 or snapshot_budget_bytes < 0:
            raise ValueError(f"max_snapshots={max_snapshots} and snapshot_budget_bytes="
                             f"{snapshot_budget_bytes} must be >= 0 (0: no snapshots)")
        self.shapes = [tuple(s) for s in shapes]
        self.replays = dict(replays or {})  # array index -> Replay (the rest keep states)
        if any(not 0 <= i < len(self.shapes) for i in self.replays):
            raise ValueError(f"replays {sorted(self.replays)} name arrays outside "
                             f"0 .. {len(self.shapes) - 1}")
        self.dtype = np.dtype(dtype)
        self.arrays = [np.zeros((num_slots,) + s, self.dtype) for s in self.shapes]
        self.free_slots = list(range(num_slots - 1, -1, -1))
        # the count limit, lowered so the snapshots fit the byte budget
        self.max_snapshots = min(max_snapshots, snapshot_budget_bytes // max(self.slot_bytes, 1))
        self.snapshots: OrderedDict[bytes, list[np.ndarray]] = OrderedDict()
        self._free_snapshots: list[list[np.ndarray]] = []  # arrays of dropped snapshots
        # slot -> per array [rows + 1, ...]: the state after 0 .. rows rows, or for a
        # replayed array the inputs of rows 1 .. rows (entry 0 unused)
        self.trails: dict[int, list[np.ndarray]] = {}
        # trail buffers no trail uses now, kept for the next verify: a fresh buffer costs a
        # page fault per 4 KiB on first touch
        self._spare: list[list[np.ndarray]] = []
        self._buffers: dict[int, list[np.ndarray]] = {}  # slot -> the buffers its trail views

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's state (= one snapshot)."""
        return sum(int(np.prod(s)) for s in self.shapes) * self.dtype.itemsize

    @property
    def num_slots(self) -> int:
        return self.arrays[0].shape[0] if self.arrays else 0

    def num_free(self) -> int:
        return len(self.free_slots)

    def acquire(self) -> int:
        """A zeroed slot (the state before any token). Raises MemoryError when all are
        taken: the scheduler checks `num_free` before admitting a sequence."""
        if not self.free_slots:
            raise MemoryError(f"all {self.num_slots} recurrent-state slots are in use")
        slot = self.free_slots.pop()
        for a in self.arrays:
            a[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self.free_slots or not 0 <= slot < self.num_slots:
            raise ValueError(f"recurrent slot {slot} is not in use")
        self._drop_trail(slot)
        self.free_slots.append(slot)

    # ---- speculative verify: what a rollback to any verified row needs --------------------
    def row_shape(self, array: int) -> tuple[int, ...]:
        """The shape of one row of array `array`'s trail: its state, or a replayed row."""
        replay = self.replays.get(array)
        return tuple(replay.row_shape) if replay else self.shapes[array]

    def start_trail(self, slot: int, rows: int) -> None:
        """Room for slot's state after 0 .. rows rows of a verify (entry 0: the state now),
        or for a replayed array the inputs of rows 1 .. rows. The room is a spare buffer of
        an earlier verify when one is large enough. A verify of slot not rolled back yet
        keeps all its rows first."""
        if slot in self.trails:
            self.rollback(slot, self.trails[slot][0].shape[0] - 1)
        fits = [i for i, b in enumerate(self._spare) if b[0].shape[0] > rows]
        if fits:
            bufs = self._spare.pop(fits[0])
        else:
            bufs = [np.empty((rows + 1,) + self.row_shape(i), a.dtype)
                    for i, a in enumerate(self.arrays)]
        trail = [b[:rows + 1] for b in bufs]
        for i, (a, t) in enumerate(zip(self.arrays, trail)):
            if i not in self.replays:
                t[0] = a[slot]
        self._buffers[slot] = bufs
        self.trails[slot] = trail

    def _drop_trail(self, slot: int) -> None:
        """Forget slot's trail; its buffers become spare (a few at most: one per sequence
        verified in one step)."""
        self.trails.pop(slot, None)
        bufs = self._buffers.pop(slot, None)
        if bufs is not None:
            self._spare.append(bufs)
            if len(self._spare) > 8:  # the smallest go first
                self._spare.pop(min(range(len(self._spare)),
                                    key=lambda i: self._spare[i][0].shape[0]))

    def trail_view(self, slot: int, array: int) -> np.ndarray:
        """Array `array`'s trail of slot for rows 1 .. rows, [rows, 1, ...] (a batch axis
        of one, contiguous): the model's verify writes it in place (the state after each
        row, or for a replayed array each row's inputs)."""
        t = self.trails[slot][array][1:]
        return t.reshape((t.shape[0], 1) + t.shape[1:])

    def keep(self, slot: int, array: int, row: int) -> None:
        """Record array `array` of slot as it is after verify row `row` (0-based)."""
        if array in self.replays:
            raise ValueError(f"array {array} is replayed: its trail holds row inputs")
        self.trails[slot][array][row + 1] = self.arrays[array][slot]

    def rollback(self, slot: int, rows: int) -> None:
        """Set slot to its state after the first `rows` rows of its last verify, and drop
        the trail (rows = all of them: the state is already that)."""
        trail = self.trails.get(slot)
        if trail is None:
            raise ValueError(f"recurrent slot {slot} has no verify trail to roll back")
        if not 0 <= rows < trail[0].shape[0]:
            raise ValueError(f"cannot keep {rows} rows of a {trail[0].shape[0] - 1}-row verify")
        for i, (a, t) in enumerate(zip(self.arrays, trail)):
            replay = self.replays.get(i)
            if replay is not None:  # the verify left the state as it was: replay the kept
                if rows:
                    replay.apply(a[slot], t[1:rows + 1])
            elif rows < t.shape[0] - 1:  # all of them: the slot already holds that state
                a[slot] = t[rows]
        self._drop_trail(slot)

    def state(self, slot: int) -> list[np.ndarray]:
        """Writable views of slot's arrays, one per shape."""
        return [a[slot] for a in self.arrays]

    # ---- snapshots at block boundaries -----------------------------------------------
    def snapshot(self, slot: int, block_hash: bytes) -> bool:
        """Copy slot's state as the state after the block behind block_hash; the oldest
        snapshot goes when there are more than max_snapshots. True when a new snapshot
        was taken (False: one existed for that block, or snapshots are off)."""
        if block_hash in self.snapshots:
            self.snapshots.move_to_end(block_hash)
            return False
        if self.max_snapshots == 0:
            return False
        while len(self.snapshots) >= self.max_snapshots:
            self._recycle(self.snapshots.popitem(last=False)[1])
        if self._free_snapshots:
            saved = self._free_snapshots.pop()
            for a, s in zip(self.arrays, saved):
                s[...] = a[slot]
        else:
            saved = [a[slot].copy() for a in self.arrays]
        self.snapshots[block_hash] = saved
        return True

    def _recycle(self, saved: list[np.ndarray]) -> None:
        if len(self._free_snapshots) < _SPARE_SNAPSHOTS:
            self._free_snapshots.append(saved)

    def has_snapshot(self, block_hash: bytes) -> bool:
        return block_hash in self.snapshots

    def restore(self, slot: int, block_hash: bytes) -> None:
        """Set slot's state to the snapshot taken after block_hash."""
        saved = self.snapshots[block_hash]
        self.snapshots.move_to_end(block_hash)
        for a, s in zip(self.arrays, saved):
            a[slot] = s

    def drop_snapshot(self, block_hash: bytes) -> None:
        saved = self.snapshots.pop(block_hash, None)
        if saved is not None:
            self._recycle(saved)
