"""Block bookkeeping: reference counts, a prefix table keyed by chained block hashes, and
LRU eviction of cached blocks nobody references.

A block is in exactly one of three states:
- referenced (refcount > 0): part of at least one running sequence's block table;
- cached (refcount 0, has a hash): its contents are kept for prefix reuse and it sits in the
  LRU order, from which `allocate` takes the oldest when no free block is left;
- free (refcount 0, no hash).
Every operation is O(1) (dict / OrderedDict / list), so the pool scales to many blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Optional, Sequence

import numpy as np


def chain_block_hashes(token_ids: Sequence[int], block_size: int, variant: str = "",
                       start: int = 0, parent: Optional[bytes] = None) -> list[bytes]:
    """Hashes of the full blocks of token_ids from block `start` on.

    Each hash covers the block's tokens, the hash of the block before it (so equal blocks
    after different prefixes differ) and `variant` (the model / adapter key, so two LoRA
    adapters never share KV). blake2b: a collision would silently corrupt an output, so a
    cryptographic 128-bit digest rather than Python's hash().
    """
    out = []
    prev = parent if parent is not None else variant.encode()
    full = len(token_ids) // block_size
    for b in range(start, full):
        chunk = np.asarray(token_ids[b * block_size:(b + 1) * block_size], dtype=np.int64)
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(variant.encode())
        h.update(chunk.tobytes())
        prev = h.digest()
        out.append(prev)
    return out


class BlockPool:
    """Allocation state of `num_blocks` blocks (the tensors live in `PagedKVCache`)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        self.block_hash: list[Optional[bytes]] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self.evictions = 0
        self.on_evict = None  # callback(block_hash) when a cached block is reused

    # ---- counts ----------------------------------------------------------------------
    def num_free(self) -> int:
        """Blocks `allocate` can hand out now (free plus evictable cached ones)."""
        return len(self.free) + len(self.lru)

    def num_used(self) -> int:
        return self.num_blocks - self.num_free()

    def num_cached(self) -> int:
        return len(self.lru)

    # ---- allocation ------------------------------------------------------------------
    def allocate(self) -> int:
        """A block with refcount 1 and no hash; evicts the least recently used cached block
        when none is free. Raises MemoryError when every block is referenced."""
        if self.free:
            block = self.free.pop()
        elif self.lru:
            block, _ = self.lru.popitem(last=False)
            old = self.block_hash[block]
            del self.by_hash[old]
            self.block_hash[block] = None
            self.evictions += 1
            if self.on_evict is not None:
                self.on_evict(old)
        else:
            raise MemoryError("every KV block is referenced by a running sequence")
        self.refcount[block] = 1
        return block

    def lookup(self, block_hash: bytes) -> Optional[int]:
        """The block cached under block_hash, now referenced once more; None on a miss."""
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        if self.refcount[block] == 0:
            del self.lru[block]
        self.refcount[block] += 1
        return block

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self.by_hash

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that referenced `block` is full and holds the tokens behind block_hash.
        If another block already holds the same content, this one stays unhashed (it is
        freed, not cached, when released)."""
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is not referenced; only a sequence's own block "
                             f"can be registered")
        if self.block_hash[block] is not None or block_hash in self.by_hash:
            return
        self.block_hash[block] = block_hash
        self.by_hash[block_hash] = block

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference of each block. Blocks are released in reverse order so a
        sequence's later blocks become older in the LRU than its first blocks: a shared
        prefix's head is evicted last."""
        for block in reversed(list(blocks)):
            rc = self.refcount[block]
            if rc <= 0:
                raise ValueError(f"block {block} released more often than referenced")
            self.refcount[block] = rc - 1
            if rc == 1:
                if self.block_hash[block] is not None:
                    self.lru[block] = None
                else:
                    self.free.append(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached, unreferenced block (they become free)."""
        while self.lru:
            block, _ = self.lru.popitem(last=False)
            old = self.block_hash[block]
            del self.by_hash[old]
            self.block_hash[block] = None
            self.free.append(block)
            if self.on_evict is not None:
                self.on_evict(old)
