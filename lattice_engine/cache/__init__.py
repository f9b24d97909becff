"""Paged KV cache for serving: a preallocated block pool with prefix sharing, per-sequence
block tables, and recurrent-state slots for linear-attention layers."""

from .blocks import BlockPool, chain_block_hashes
from .paged import PagedKVCache, SequenceBlocks
from .recurrent import RecurrentStateSlots

__all__ = ["BlockPool", "chain_block_hashes", "PagedKVCache", "SequenceBlocks",
           "RecurrentStateSlots"]
