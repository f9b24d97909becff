"""`PagedKVCache`: the K/V tensors of every attention layer in one preallocated pool of
fixed-size blocks, addressed through per-sequence block tables.

Layout per layer: keys / values [num_blocks, block_size, H_kv, row] stored as `dtype` says
(`[model] kv_cache`, see `cache.dense`: float32 / float16 [.., D], or q8_0 bytes
[.., D / 32 * 34], q8_0 keys through the layer's `KVLayout` transform); token i of a
sequence lives in block table[i // block_size] at offset i % block_size, so its flat slot
is table[i // block_size] * block_size + i % block_size. Full blocks are shared between
sequences with the same prefix (see `blocks.BlockPool`); a sequence only ever writes to
blocks past its shared prefix, so shared blocks are never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .blocks import BlockPool, chain_block_hashes
from .dense import KVLayout, check_kv_dtype, kv_encode, kv_storage
from .recurrent import RecurrentStateSlots


@dataclass
class SequenceBlocks:
    """One sequence's view of the cache: its block table and the hashes of its full,
    computed blocks (block_hashes[i] belongs to table[i])."""

    table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    cached_tokens: int = 0      # prompt tokens found in the prefix cache on admission
    state_slot: Optional[int] = None  # recurrent-state slot (hybrid models)
    # the block whose state snapshot this sequence took past its prompt (hybrid models keep
    # one: the newest, which a follow-up turn's prompt can resume from)
    generated_snapshot: Optional[bytes] = None
    # the sequence's own part of the prefix-cache key, after the cache's (the adapter and
    # its version it runs with: sequences of different adapters never share blocks)
    variant: str = ""


class PagedKVCache:
    """Block pool + K/V storage for `num_layers` attention layers.

    `variant` keys the prefix cache (model and adapter identity): sequences of different
    variants never share blocks. `recurrent`, when given, holds linear-attention state; a
    prefix is then only reused up to a block boundary that has a state snapshot.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, variant: str = "",
                 recurrent: Optional[RecurrentStateSlots] = None, dtype: str = "f32",
                 key_transforms=None):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.dtype = check_kv_dtype(dtype, head_dim)
        transforms = key_transforms if self.dtype == "q8_0" and key_transforms else \
            [(None, None)] * num_layers
        self.layouts = [KVLayout(self.dtype, head_dim, *t) for t in transforms]
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.variant = variant
        self.pool = BlockPool(num_blocks)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [kv_storage(self.dtype, shape) for _ in range(num_layers)]
        self.values = [kv_storage(self.dtype, shape) for _ in range(num_layers)]
        self.recurrent = recurrent
        if recurrent is not None:
            self.pool.on_evict = recurrent.drop_snapshot
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def variant_of(self, seq: SequenceBlocks) -> str:
        """The prefix-cache key of seq's blocks: the cache's variant (the model) and the
        sequence's own (its adapter)."""
        return f"{self.variant}|{seq.variant}" if seq.variant else self.variant

    # ---- admission -------------------------------------------------------------------
    def match_prefix(self, token_ids: Sequence[int], seq: SequenceBlocks) -> int:
        """Reference the cached full blocks that start token_ids into seq's (empty) table,
        and return how many tokens they cover. At least the last token is left to compute,
        since its logits are needed."""
        if seq.table:
            raise ValueError("match_prefix needs a sequence without blocks")
        usable = (len(token_ids) - 1) // self.block_size
        hashes = chain_block_hashes(token_ids[:usable * self.block_size], self.block_size,
                                    self.variant_of(seq))
        n = 0
        while n < len(hashes) and self.pool.contains(hashes[n]):
            n += 1
        if self.recurrent is not None:  # recurrent state must resume at a snapshot
            while n > 0 and not self.recurrent.has_snapshot(hashes[n - 1]):
                n -= 1
        for h in hashes[:n]:
            seq.table.append(self.pool.lookup(h))
        seq.block_hashes = hashes[:n]
        seq.cached_tokens = n * self.block_size
        self.prefix_queried_tokens += len(token_ids)
        self.prefix_hit_tokens += seq.cached_tokens
        return seq.cached_tokens

    def cached_prefix(self, token_ids: Sequence[int]) -> int:
        """How many tokens `match_prefix` would find cached now, without referencing
        anything (the runner asks before encoding an image whose tokens may be cached)."""
        usable = (len(token_ids) - 1) // self.block_size
        hashes = chain_block_hashes(token_ids[:usable * self.block_size], self.block_size,
                                    self.variant)
        n = 0
        while n < len(hashes) and self.pool.contains(hashes[n]):
            n += 1
        if self.recurrent is not None:
            while n > 0 and not self.recurrent.has_snapshot(hashes[n - 1]):
                n -= 1
        return n * self.block_size

    def reserve(self, seq: SequenceBlocks, num_tokens: int) -> bool:
        """Make seq's table hold num_tokens; all or nothing (False if blocks ran out)."""
        need = self.blocks_for(num_tokens) - len(seq.table)
        if need <= 0:
            return True
        if need > self.pool.num_free():
            return False
        seq.table.extend(self.pool.allocate() for _ in range(need))
        return True

    def trim(self, seq: SequenceBlocks, num_tokens: int) -> None:
        """Release seq's blocks past those num_tokens need (a speculative verify reserved
        room for drafts that were rejected). Those blocks hold only positions past
        num_tokens, so none was registered for prefix reuse; a block shared through the
        prefix cache is never past a sequence's computed tokens."""
        keep = self.blocks_for(num_tokens)
        if keep < len(seq.block_hashes):
            raise ValueError(f"cannot trim to {num_tokens} tokens: {len(seq.block_hashes)} "
                             f"full blocks are already committed")
        if keep < len(seq.table):
            self.pool.release(seq.table[keep:])
            del seq.table[keep:]

    def commit(self, seq: SequenceBlocks, token_ids: Sequence[int], num_computed: int) -> list[bytes]:
        """Register seq's blocks that became full (all of their tokens computed) for prefix
        reuse; returns their new hashes (the caller snapshots recurrent state there)."""
        full = num_computed // self.block_size
        done = len(seq.block_hashes)
        if full <= done:
            return []
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        new = chain_block_hashes(token_ids[:full * self.block_size], self.block_size,
                                 self.variant_of(seq), start=done, parent=parent)
        for i, h in enumerate(new, start=done):
            self.pool.register(seq.table[i], h)
        seq.block_hashes.extend(new)
        return new

    def free(self, seq: SequenceBlocks) -> None:
        """Release seq's blocks at once (finished, aborted or preempted)."""
        self.pool.release(seq.table)
        seq.table = []
        seq.block_hashes = []
        if seq.state_slot is not None and self.recurrent is not None:
            self.recurrent.release(seq.state_slot)
            seq.state_slot = None

    # ---- addressing ------------------------------------------------------------------
    def slots(self, seq: SequenceBlocks, start: int, count: int) -> np.ndarray:
        """Flat slot indices of positions start .. start+count-1 (int64 [count])."""
        pos = np.arange(start, start + count)
        table = np.asarray(seq.table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [n, H_kv, D] (float32) at flat slots [n], in the cache's dtype."""
        keys, values = self.keys[layer], self.values[layer]
        keys.reshape((-1,) + keys.shape[2:])[slots] = self.layouts[layer].encode_keys(k)
        values.reshape((-1,) + values.shape[2:])[slots] = kv_encode(self.dtype, v)

    def stats(self) -> dict[str, float]:
        q = self.prefix_queried_tokens
        return {"blocks_total": self.pool.num_blocks, "blocks_used": self.pool.num_used(),
                "blocks_cached": self.pool.num_cached(), "blocks_free": len(self.pool.free),
                "prefix_queried_tokens": q, "prefix_hit_tokens": self.prefix_hit_tokens,
                "prefix_hit_rate": self.prefix_hit_tokens / q if q else 0.0,
                "evictions": self.pool.evictions}
