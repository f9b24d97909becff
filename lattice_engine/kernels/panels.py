"""Float32 matmuls in outer-product form for the encoders on AVX2 CPUs
(native/src/matmul_panels.c).

The float32 kernels sum each output in 8 lanes along K and then a fixed tree, the order
that gives a decode row and a prefill row the same bits; at an encoder's small K the
horizontal sums are a real part of the work. Here each output is a float32 FMA chain along
K, summed by slices of 128 (the BLAS form; 1.1-1.3x the float32 kernels on the MiniLM and
vision-tower shapes on a Zen 3): not the float32 kernels' bits, so nothing uses it unless
it opts in per weight, as the encoders do (BERT-family embedders, vision towers: no decode
rows). A row's result does not depend on the batch it is in. On CPUs with AVX-512 (their float32 passes
run 512-bit kernels) and under LATTICE_ISA=generic it is off (`ready()` is False).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .buffers import _packed_matmul
from .runtime import _FLOATS, _L, _fb, available


def ready() -> bool:
    """Whether this process runs panel matmuls (see the module doc)."""
    return available() and bool(_L.lk_f32_panels_ready())


def _aligned(count: int) -> np.ndarray:
    """float32 [count] on a 64-byte boundary (the kernel reads a panel's 16 values of each k
    as two aligned vectors)."""
    raw = np.empty(count + 16, np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + count]


class PanelWeight:
    """A float32 weight W [N, K] packed for `matmul` (as many bytes as W)."""

    def __init__(self, w: np.ndarray):
        w = np.ascontiguousarray(w, dtype=np.float32)
        self.rows, self.cols = w.shape
        self.packed = _aligned(int(_L.lk_f32_panels_size(*w.shape)))
        if _L.lk_f32_panels_pack(_fb(_FLOATS, w), self.rows, self.cols,
                                 _fb(_FLOATS, self.packed, True)):
            raise ValueError(f"panel packing needs N a multiple of 16, got {w.shape}")

    @classmethod
    def of(cls, w: np.ndarray) -> Optional["PanelWeight"]:
        """The packed weight when this machine runs panel matmuls and W's shape fits (N a
        multiple of 16), else None."""
        if w.ndim != 2 or w.shape[0] % 16 or w.shape[1] < 1 or not ready():
            return None
        return cls(w)


def matmul(x: np.ndarray, w: PanelWeight) -> np.ndarray:
    """x [..., K] @ W^T -> float32 [..., N], each output FMA chains along K (module doc)."""
    return _packed_matmul("panel", _L.lk_matmul_f32_panels, x, w.cols, w.rows,
                          _fb(_FLOATS, w.packed))
