"""Kernels of vision encoders: `layer_norm` and `gelu` (numpy references: `ops.layer_norm`,
`ops.gelu`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from . import runtime
from .buffers import _in, _new_or_check
from .runtime import _FLOATS, _L, _fb


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: Optional[np.ndarray], eps: float,
               out: np.ndarray | None = None) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis."""
    D = x.shape[-1]
    if weight.shape != (D,) or (bias is not None and bias.shape != (D,)):
        raise ValueError(f"layer_norm: x {x.shape} needs weight and bias of shape ({D},)")
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    _L.lk_layer_norm(xp, x.size // D if D else 0, D, _fb(_FLOATS, w),
                     runtime._ffi.NULL if b is None else _fb(_FLOATS, b), float(eps),
                     _fb(_FLOATS, out, True))
    return out


def gelu(x: np.ndarray, tanh_approx: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """GELU, the tanh form (gelu_pytorch_tanh) or the erf form."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_gelu(xp, x.size, 1 if tanh_approx else 0, _fb(_FLOATS, out, True))
    return out
