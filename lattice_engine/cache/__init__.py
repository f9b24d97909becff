"""Every cache a model computes over, in one home: the dense `KVCache` of one batch
(`dense.py`) and Qwen3.5's `HybridCache` (`hybrid.py`: KV plus conv / delta-rule states)
for generation and perplexity; for serving, the paged KV cache (a preallocated block pool
with prefix sharing and per-sequence block tables, `paged.py`, `blocks.py`) and the
recurrent-state slots of linear-attention layers (`recurrent.py`)."""

from .blocks import BlockPool, chain_block_hashes
from .dense import KVCache
from .hybrid import HybridCache, HybridSnapshot
from .paged import PagedKVCache, SequenceBlocks
from .recurrent import RecurrentStateSlots, Replay

__all__ = ["BlockPool", "chain_block_hashes", "KVCache", "HybridCache", "HybridSnapshot",
           "PagedKVCache", "SequenceBlocks", "RecurrentStateSlots", "Replay"]
