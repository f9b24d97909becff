"""Float32 matmuls on AMX-BF16 by the bf16x3 split (native/src/matmul_amx.c).

x = xh + xl and w = wh + wl in bf16 parts, y = xh wh + xh wl + xl wh accumulated in
float32: relative error ~4e-6 (float32 kernels: ~1e-7), about 5x the float32 kernels'
speed on a Sapphire Rapids core. Not the float32 kernels' bits, so nothing uses it unless
it opts in per weight: the encoders (BERT-family embedders, vision towers) do for their
many-row passes, where no decode row has to match a prefill row bit for bit.
`LATTICE_AMX=0` switches it off (then every matmul is float32's).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .buffers import _packed_matmul
from .runtime import _FLOATS, _L, _fb, _ffi, available

_U16S = _ffi.typeof("uint16_t[]") if _ffi is not None else None


def ready() -> bool:
    """Whether this process runs bf16x3 matmuls (AMX-BF16 CPU, granted by Linux, not
    switched off by LATTICE_AMX=0 or LATTICE_ISA=generic)."""
    return available() and bool(_L.lk_amx_bf16x3_ready())


def _aligned(count: int) -> np.ndarray:
    """uint16 [count] on a 64-byte boundary: a tile row is one cache line (unaligned, every
    tile load touched two, and the products ran at a third of their speed)."""
    raw = np.empty(count + 32, np.uint16)
    start = (-raw.ctypes.data % 64) // 2
    return raw[start:start + count]


class Bf16x3Weight:
    """A float32 weight W [N, K] packed for `matmul` (its bf16 high and low parts: as many
    bytes as the float32 matrix)."""

    def __init__(self, w: np.ndarray):
        w = np.ascontiguousarray(w, dtype=np.float32)
        self.rows, self.cols = w.shape
        self.packed = _aligned(int(_L.lk_bf16x3_packed_size(*w.shape)))
        if _L.lk_bf16x3_pack(_fb(_FLOATS, w), self.rows, self.cols,
                             _fb(_U16S, self.packed, True)):
            raise ValueError(f"bf16x3 packing needs N and K multiples of 32, got {w.shape}")

    @classmethod
    def of(cls, w: np.ndarray) -> Optional["Bf16x3Weight"]:
        """The packed weight when this machine runs bf16x3 and W's shape fits, else None."""
        if w.ndim != 2 or w.shape[0] % 32 or w.shape[1] % 32 or not ready():
            return None
        return cls(w)


def matmul(x: np.ndarray, w: Bf16x3Weight) -> np.ndarray:
    """x [..., K] @ W^T -> float32 [..., N] by bf16x3 products (see the module doc)."""
    return _packed_matmul("bf16x3", _L.lk_matmul_bf16x3, x, w.cols, w.rows,
                          _fb(_U16S, w.packed))
