"""`lora_apply`: the resident adapters' low-rank updates added to a linear's output (see
`ops.lora_apply` and `lattice_engine.adapters`), by `lk_lora_apply`."""

from __future__ import annotations

import numpy as np

from .buffers import _F32, _in
from .runtime import _FLOATS, _L, _fb


def lora_apply(x: np.ndarray, y: np.ndarray, table, row_slots) -> np.ndarray:
    """y [M, N] += each row's slot update for x [M, K], in place (`table` a
    `lattice_engine.adapters.LinearAdapters`; `row_slots` int32 [M] or None: the table's
    row selection is used as it stands)."""
    m = x.shape[0]
    if y.dtype is not _F32 or not y.flags.c_contiguous or y.shape[0] != m:
        raise ValueError(f"lora_apply: y must be C-contiguous float32 [{m}, N], got "
                         f"{y.dtype} {y.shape}")
    if row_slots is not None and row_slots.shape != (m,):
        raise ValueError(f"lora_apply: {row_slots.shape} row slots for {m} rows")
    xp, x = _in(x)
    rc = _L.lk_lora_apply(table.c_struct(), xp, m, x.shape[1], y.shape[1],
                          _fb(_FLOATS, y, True))
    if rc == -2:
        raise ValueError(f"lora_apply: the adapter row selection does not cover the {m} rows")
    if rc:
        raise MemoryError("lora_apply: out of memory")
    return y
