"""Marshalling numpy arrays into the C calls: cdata over inputs without copying when they
are already C-contiguous float32 (`_in`), output buffers made or checked (`_new_or_check`),
packed weight rows (`_packed`), strided views and evenly spaced rows passed with their
strides (`_strided`, `_rows`), the call of a matmul over a pre-packed weight
(`_packed_matmul`), and the weight-format ids of lattice_kernels.h.

Every op module binds these at import and calls them directly: they run a few hundred
times per decoded token.
"""

from __future__ import annotations

import numpy as np

from .runtime import _FLOATS, _fb

_F32 = np.dtype(np.float32)
_FMT_IDS = {"f32": 0, "f16": 1, "q8_0": 2, "q8_0_r16": 3}  # LK_FMT_* in lattice_kernels.h
_FMT_EXTERN = 100  # LK_FMT_EXTERN: a plugin format's own C matmul (WeightFormat.c_matmul)


def _in(a: np.ndarray):
    """cdata over float32 input `a` and the array it views (a copy if `a` was not
    C-contiguous float32); keep the array alive while C runs."""
    if a.dtype is not _F32:
        a = np.ascontiguousarray(a, dtype=np.float32)
    try:
        return _fb(_FLOATS, a), a
    except ValueError:  # not C-contiguous
        a = np.ascontiguousarray(a)
        return _fb(_FLOATS, a), a


def _new_or_check(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, _F32)
    if out.dtype is not _F32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {shape}, got {out.dtype} "
            f"{out.shape} (C-contiguous: {out.flags.c_contiguous})")
    return out


def _packed(data: np.ndarray):
    """cdata over packed weights uint8 [rows, row_bytes], and the row stride in bytes."""
    try:
        return _fb(data), data.strides[0]
    except ValueError:
        data = np.ascontiguousarray(data)
        return _fb(data), data.strides[0]



def _strided(a: np.ndarray):
    """(cdata, array, element strides of all but the last axis) for float32 `a` whose last
    axis is contiguous, without copying views; copies anything else."""
    if a.dtype is _F32:
        try:
            return _fb(_FLOATS, a), a, [s >> 2 for s in a.strides[:-1]]
        except ValueError:
            pass
        st = a.strides
        if st[-1] == 4 and all(s >= 0 and s % 4 == 0 for s in st) and a.size:
            # cover a[0, ..., 0] .. a[-1, ..., -1] with one 1-D view; C uses the strides
            n = 1 + sum((d - 1) * (s >> 2) for d, s in zip(a.shape, st))
            span = np.lib.stride_tricks.as_strided(a, shape=(n,), strides=(4,))
            return _fb(_FLOATS, span), a, [s >> 2 for s in st[:-1]]
    a = np.ascontiguousarray(a, dtype=np.float32)
    return _fb(_FLOATS, a), a, [s >> 2 for s in a.strides[:-1]]



def _rows(a: np.ndarray, n: int):
    """(cdata, array, row stride in elements) for `a` as evenly spaced rows of n floats."""
    if a.dtype is _F32:
        try:
            return _fb(_FLOATS, a), a, n
        except ValueError:
            pass
        if a.ndim >= 2:
            p, a2, st = _strided(a)
            sh = a2.shape
            if all(st[i] == sh[i + 1] * st[i + 1] for i in range(len(st) - 1)) and st[-1] >= n:
                return p, a2, st[-1]
    a = np.ascontiguousarray(a, dtype=np.float32)
    return _fb(_FLOATS, a), a, n


def _packed_matmul(kind: str, fn, x: np.ndarray, cols: int, rows: int, packed) -> np.ndarray:
    """x [..., cols] @ W^T -> float32 [..., rows] by `fn(x, M, K, packed, N, y)`, a C matmul
    over a weight it packed itself (bf16x3, panels); `kind` names it in errors."""
    if x.shape[-1] != cols:
        raise ValueError(f"{kind} matmul: x has {x.shape[-1]} columns, the weight {cols}")
    xp, x = _in(x)
    m = int(np.prod(x.shape[:-1], dtype=np.int64))
    y = np.empty(x.shape[:-1] + (rows,), np.float32)
    rc = fn(xp, m, cols, packed, rows, _fb(_FLOATS, y, True))
    if rc == -5:
        raise MemoryError(f"{kind} matmul: out of memory")
    if rc:
        raise RuntimeError(f"{kind} matmul failed ({rc}): not ready on this CPU or bad sizes")
    return y
