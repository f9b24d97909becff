"""`block_rotate`: x @ (mix kron H_block / sqrt(block)), the online rotation before a
projection (QuaRot; the rotations themselves are built in plugins/quarot).
"""

from __future__ import annotations

import numpy as np

from .buffers import _in, _new_or_check
from .runtime import _FLOATS, _L, _fb

def block_rotate(x: np.ndarray, mix: np.ndarray, block: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """x @ (mix kron H_block / sqrt(block)) along the last axis (see `ops.block_rotate`)."""
    m = mix.shape[0]
    n = x.shape[-1]
    if mix.shape != (m, m) or n != m * block or block < 1 or block & (block - 1):
        raise ValueError(f"block_rotate: x has {n} features, mix is {mix.shape}, block "
                         f"{block}: need features == rows(mix) * block, block a power of two")
    xp, x = _in(x)
    mp, mix = _in(mix)
    out = _new_or_check(out, x.shape)
    if m > 1 and np.shares_memory(out, x):
        raise ValueError("block_rotate: out may alias x only when mix is 1 x 1")
    _L.lk_block_rotate(xp, x.size // n if n else 0, m, block, mp, _fb(_FLOATS, out, True))
    return out
