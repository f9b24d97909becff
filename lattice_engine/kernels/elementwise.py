"""Row-wise and elementwise kernels on float32 activations: `rms_norm`, `gated_rms_norm`,
`rope` (with `rope_tables`, numpy), `layer_norm`, `gelu`, `silu`, `silu_mul`, `sigmoid`, `softplus`, `softmax`,
`log_sum_exp` and the residual `add`.
"""

from __future__ import annotations

import numpy as np

from .. import ops
from .buffers import _F32, _in, _new_or_check, _rows, _strided
from .runtime import _FLOATS, _L, _fb

rope_tables = ops.rope_tables  # computed once per step for all layers; numpy is fine here


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, offset: float = 0.0,
             out: np.ndarray | None = None) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (offset + weight) over the last axis."""
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({D},)")
    xp, x = _in(x)
    wp, weight = _in(weight)
    out = _new_or_check(out, x.shape)
    _L.lk_rms_norm(xp, x.size // D if D else 0, D, wp, eps, offset, _fb(_FLOATS, out, True))
    return out


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False,
         out: np.ndarray | None = None) -> np.ndarray:
    """Rotary embedding of x [B, T, H, Dh] (see `ops.rope`). x may be a strided view (e.g.
    the q part of a fused QKV output) as long as each head is contiguous; `out` may be x
    itself when x is contiguous."""
    if x.ndim != 4:
        raise ValueError(f"rope: x must be [B, T, H, Dh], got shape {x.shape}")
    B, T, H, Dh = x.shape
    half = cos.shape[-1]
    if cos.shape != (T, half) or sin.shape != (T, half) or 2 * half > Dh:
        raise ValueError(f"rope: cos/sin must be [T={T}, half <= {Dh // 2}], got {cos.shape} and {sin.shape}")
    cp, cos = _in(cos)
    sp, sin = _in(sin)
    xp, x, strides = _strided(x)
    if out is x and not x.flags.c_contiguous:
        raise ValueError("rope: in-place rotation needs a contiguous x")
    out = _new_or_check(out, x.shape)
    _L.lk_rope(xp, B, T, H, Dh, strides[0], strides[1], strides[2], cp, sp, half,
               1 if interleaved else 0, _fb(_FLOATS, out, True))
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float,
               out: np.ndarray | None = None) -> np.ndarray:
    """BERT's LayerNorm over the last axis (see `ops.layer_norm`)."""
    D = x.shape[-1]
    if weight.shape != (D,) or bias.shape != (D,):
        raise ValueError(f"layer_norm: weight / bias have shapes {weight.shape} / "
                         f"{bias.shape}, expected ({D},)")
    xp, x = _in(x)
    wp, weight = _in(weight)
    bp, bias = _in(bias)
    out = _new_or_check(out, x.shape)
    _L.lk_layer_norm(xp, x.size // D if D else 0, D, wp, bp, eps, _fb(_FLOATS, out, True))
    return out


def gelu(x: np.ndarray, tanh: bool = False, out: np.ndarray | None = None) -> np.ndarray:
    """x * Phi(x), exact erf or the tanh form (see `ops.gelu`)."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_gelu(xp, x.size, 1 if tanh else 0, _fb(_FLOATS, out, True))
    return out


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_silu(xp, x.size, _fb(_FLOATS, out, True))
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up. gate and up may be views of the two halves of a fused gate_up
    output (evenly spaced contiguous rows): they are not copied."""
    shape = gate.shape
    if up.shape != shape:
        raise ValueError(f"silu_mul: gate {shape} and up {up.shape} differ")
    n = shape[-1] if shape else 1
    rows = gate.size // n if n else 0
    out = _new_or_check(out, shape)
    gp, gate, ldg = _rows(gate, n)
    up_, up, ldu = _rows(up, n)
    _L.lk_silu_mul(gp, ldg, up_, ldu, rows, n, _fb(_FLOATS, out, True))
    return out


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax along `axis` (native for the last axis of float32 input)."""
    if x.dtype is not _F32 or axis not in (-1, x.ndim - 1):
        y = ops.softmax(x, axis=axis)
        if out is not None:
            out[...] = y
            return out
        return y
    n = x.shape[-1]
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_softmax(xp, x.size // n if n else 0, n, _fb(_FLOATS, out, True))
    return out


def log_sum_exp(x: np.ndarray) -> np.ndarray:
    """log(sum(exp(x))) over the last axis, float32 [...]: a log softmax's normaliser."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1] if x.ndim else 1
    out = np.empty(x.shape[:-1] if x.ndim else (), np.float32)
    _L.lk_log_sum_exp(_fb(_FLOATS, x), x.size // n if n else 0, n,
                      _fb(_FLOATS, out.reshape(-1), True))
    return out


_SMALL_ADD = 1 << 16


def add(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """a + b for float32 arrays of one shape (the residual add); out may be a or b.
    Shapes that need broadcasting go to numpy."""
    if a.shape != b.shape or a.size < _SMALL_ADD:
        # numpy's own add beats the call overhead on one decode row
        return np.add(a, b, out=out, dtype=np.float32)
    ap, a = _in(a)
    bp, b = _in(b)
    out = _new_or_check(out, a.shape)
    _L.lk_add(ap, bp, a.size, _fb(_FLOATS, out, True))
    return out


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + e^-x) as float32 (see `ops.sigmoid`); native so the fused Qwen3.5 step
    (which computes its gates in C) and this per-kernel path agree bit for bit."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_sigmoid(xp, x.size, _fb(_FLOATS, out, True))
    return out


def softplus(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """log(1 + e^x), x itself above 20 (see `ops.softplus`), as float32; native for the
    same reason as `sigmoid`."""
    xp, x = _in(x)
    out = _new_or_check(out, x.shape)
    _L.lk_softplus(xp, x.size, _fb(_FLOATS, out, True))
    return out


def gated_rms_norm(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float,
                   out: np.ndarray | None = None) -> np.ndarray:
    """rms_norm(x) * weight * silu(gate) over the last axis (see `ops.gated_rms_norm`)."""
    D = x.shape[-1]
    if gate.shape != x.shape or weight.shape != (D,):
        raise ValueError(f"gated_rms_norm: x {x.shape}, gate {gate.shape}, weight "
                         f"{weight.shape} do not fit")
    xp, x = _in(x)
    zp, gate = _in(gate)
    wp, weight = _in(weight)
    out = _new_or_check(out, x.shape)
    _L.lk_gated_rms_norm(xp, zp, x.size // D if D else 0, D, wp, eps, _fb(_FLOATS, out, True))
    return out
