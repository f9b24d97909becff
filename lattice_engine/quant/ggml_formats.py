"""GGUF block types the core runs as stored: q4_k, q5_0 and q6_k (what a llama.cpp Q4_K_M
file is made of), byte-identical to ggml's Q4_K, Q5_0 and Q6_K, so such tensors load with
no conversion and no copy of the float values.

The matmul is `native/src/matmul_ggml.c` (x rounded to int16 per block as for q8_0, exact
integer block dots: the result differs from the dequantized weights times float x only by
that rounding); to_float is the ggml dequantizer (`kernels.ggml`). Without the native
library they dequantize (the `gguf` reference values) and multiply in numpy.

`quantize` here is plain round-to-nearest on each block's range, enough for tests and for
`[quant.overrides]`; llama.cpp's quantizers search for better scales (and an importance
matrix), so convert with llama.cpp to make files of these types.
"""

from __future__ import annotations

import numpy as np

from .core_formats import round_half_away
from .formats import WeightFormat

GGML_Q5_0, GGML_Q4_K, GGML_Q6_K = 6, 12, 14
QK_K = 256


def _dequantize(ggml_type: int):
    def to_float(data: np.ndarray, cols: int) -> np.ndarray:
        from ..kernels import ggml
        out = ggml.dequantize(np.ascontiguousarray(data), ggml_type, cols) \
            if ggml.block_shape(ggml_type) else None
        if out is None:  # no native library: the gguf package's reference dequantizer
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize
            out = dequantize(np.ascontiguousarray(data), GGMLQuantizationType(ggml_type))
            out = np.asarray(out, np.float32).reshape(data.shape[0], cols)
        return out
    return to_float


def _halves(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, np.float32).astype(np.float16).view(np.uint8).reshape(*v.shape, 2)


def quantize_q5_0(w: np.ndarray) -> np.ndarray:
    """ggml's reference Q5_0: d = (signed largest) / -16, codes x / d + 16 in [0, 31]."""
    rows, cols = w.shape
    b = np.ascontiguousarray(w, np.float32).reshape(rows, cols // 32, 32)
    idx = np.abs(b).argmax(axis=-1)[..., None]
    d = (np.take_along_axis(b, idx, -1) / -16.0).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(b * inv + 16.5), 0, 31).astype(np.uint32)
    out = np.empty((rows, cols // 32, 22), np.uint8)
    out[..., :2] = _halves(d[..., 0])
    hbits = ((q >> 4) & 1) << np.arange(32, dtype=np.uint32)
    out[..., 2:6] = np.bitwise_or.reduce(hbits, axis=-1).astype("<u4")[..., None].view(np.uint8)
    low = (q & 15).astype(np.uint8)
    out[..., 6:] = low[..., :16] | (low[..., 16:] << 4)
    return out.reshape(rows, -1)


def _pack_scales_k(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K's eight 6-bit scales and mins per superblock -> their 12 bytes."""
    s = np.zeros(sc.shape[:-1] + (12,), np.uint8)
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    s[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    s[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    return s


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K by rounding: per 32 values a range [lo <= 0, hi], scale (hi - lo) / 15 and min
    -lo, both as 6-bit multiples of the superblock's d and dmin."""
    rows, cols = w.shape
    b = np.ascontiguousarray(w, np.float32).reshape(rows, cols // QK_K, 8, 32)
    lo = np.minimum(b.min(axis=-1), 0.0)
    hi = np.maximum(b.max(axis=-1), lo)
    scale, mins = (hi - lo) / 15.0, -lo
    d = (scale.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    dmin = (mins.max(axis=-1) / 63.0).astype(np.float16).astype(np.float32)
    sc = np.clip(round_half_away(np.divide(scale, d[..., None], out=np.zeros_like(scale),
                                           where=d[..., None] != 0)), 0, 63)
    mn = np.clip(round_half_away(np.divide(mins, dmin[..., None], out=np.zeros_like(mins),
                                           where=dmin[..., None] != 0)), 0, 63)
    step = (d[..., None] * sc)[..., None]
    offset = (dmin[..., None] * mn)[..., None]
    q = np.clip(round_half_away(np.divide(b + offset, step, out=np.zeros_like(b),
                                          where=step != 0)), 0, 15).astype(np.uint8)
    out = np.empty((rows, cols // QK_K, 144), np.uint8)
    out[..., 0:2] = _halves(d)
    out[..., 2:4] = _halves(dmin)
    out[..., 4:16] = _pack_scales_k(sc, mn)
    pairs = q.reshape(rows, cols // QK_K, 4, 2, 32)
    out[..., 16:] = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(rows, cols // QK_K, 128)
    return out.reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K by rounding: per 16 values a scale amax / 31 as an int8 multiple of the
    superblock's d, codes x / (d sc) + 32 in [0, 63]."""
    rows, cols = w.shape
    b = np.ascontiguousarray(w, np.float32).reshape(rows, cols // QK_K, 16, 16)
    scale = np.abs(b).max(axis=-1) / 31.0
    d = (scale.max(axis=-1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(round_half_away(np.divide(scale, d[..., None], out=np.zeros_like(scale),
                                           where=d[..., None] != 0)), -128, 127)
    step = (d[..., None] * sc)[..., None]
    q = np.clip(round_half_away(np.divide(b, step, out=np.zeros_like(b), where=step != 0)) + 32,
                0, 63).astype(np.uint8).reshape(rows, cols // QK_K, 2, 4, 32)  # half, g, i
    out = np.empty((rows, cols // QK_K, 210), np.uint8)
    low, high = q & 15, q >> 4
    ql = np.empty((rows, cols // QK_K, 2, 2, 32), np.uint8)  # half, byte group, i
    ql[..., 0, :] = low[..., 0, :] | (low[..., 2, :] << 4)
    ql[..., 1, :] = low[..., 1, :] | (low[..., 3, :] << 4)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    out[..., :128] = ql.reshape(rows, cols // QK_K, 128)
    out[..., 128:192] = qh.reshape(rows, cols // QK_K, 64)
    out[..., 192:208] = sc.astype(np.int8).view(np.uint8)
    out[..., 208:210] = _halves(d)
    return out.reshape(rows, -1)


def _format(name: str, ggml_type: int, block: int, nbytes: int, quantize) -> WeightFormat:
    return WeightFormat(name, block, nbytes, quantize, _dequantize(ggml_type),
                        gguf_type=ggml_type)


Q5_0 = _format("q5_0", GGML_Q5_0, 32, 22, quantize_q5_0)
Q4_K = _format("q4_k", GGML_Q4_K, QK_K, 144, quantize_q4_k)
Q6_K = _format("q6_k", GGML_Q6_K, QK_K, 210, quantize_q6_k)
GGML_FORMATS = (Q5_0, Q4_K, Q6_K)


def attach_native(formats=GGML_FORMATS) -> bool:
    """Point matmul, embed and c_matmul (for the fused steps) of these formats at
    `native/src/matmul_ggml.c` when the native library is built."""
    from ..kernels import ggml

    c_fns = {fmt.name: ggml.c_matmul(fmt.gguf_type) for fmt in formats}
    if any(c is None for c in c_fns.values()):
        return False
    for fmt in formats:
        t = fmt.gguf_type
        object.__setattr__(fmt, "matmul", lambda x, data, t=t: ggml.matmul(x, data, t))
        object.__setattr__(fmt, "embed", lambda data, ids, t=t: ggml.embed(data, ids, t))
        object.__setattr__(fmt, "c_matmul", c_fns[fmt.name])
    return True


def is_core_ggml(fmt: WeightFormat) -> bool:
    """Whether `fmt` is one of these formats with its native kernels attached (the fused
    steps then also look its rows up in C)."""
    return any(fmt is f for f in GGML_FORMATS) and fmt.c_matmul is not None
