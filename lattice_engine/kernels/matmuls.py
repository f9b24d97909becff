"""Kernels over packed weight matrices (`PackedMatrix` in f32, f16, q8_0, q8_0_r16):
`matmul`, `matmul_multi` (several matrices, one parallel job), `embed` (row lookup),
`quantize_q8_0` and the q8_0 <-> q8_0_r16 layout conversion, plus `format_matmul` /
`format_embed`, the native `WeightFormat.matmul` / `.embed` of the core formats, and
`supports(fmt)`. A format without a native kernel falls back to its own Python kernel or
to `ops`.
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..io import hugepages
from ..quant.formats import PackedMatrix
from .buffers import _F32, _FMT_IDS, _in, _new_or_check, _packed
from .runtime import _FLOATS, _INT64S, _L, _fb, _ffi, _lib

_MULTI_MAX = 8  # LK_MATMUL_MULTI_MAX

# format name -> (C matmul, C embed, values per block, bytes per block)
if _lib is not None:
    _NATIVE = {
        "f32": (_lib.lk_matmul_f32, _lib.lk_embed_f32, 1, 4),
        "f16": (_lib.lk_matmul_f16, _lib.lk_embed_f16, 1, 2),
        "q8_0": (_lib.lk_matmul_q8_0, _lib.lk_embed_q8_0, 32, 34),
        "q8_0_r16": (_lib.lk_matmul_q8_0_r16, _lib.lk_embed_q8_0_r16, 32, 34),
    }
else:  # pragma: no cover
    _NATIVE = {}


def _entry(fmt):
    e = _NATIVE.get(fmt.name)
    if e is None or e[3] != fmt.bytes_per_block or e[2] != fmt.block_size:
        return None
    return e


def supports(fmt) -> bool:
    """Whether `fmt` (a WeightFormat) has native matmul/embed kernels here."""
    return _entry(fmt) is not None


def matmul(x: np.ndarray, w: PackedMatrix, out: np.ndarray | None = None) -> np.ndarray:
    """x [..., K] @ W.T -> [..., N] for W [N, K] in f32, f16 or q8_0.

    q8_0 rounds x to int8 blocks of 32 (float32 scale per block) and uses integer dot
    products, so it differs from `ops.matmul` by that rounding. Formats without a native
    kernel use their own `matmul` when they have one, else `ops.matmul`.
    """
    fmt = w.format
    e = _NATIVE.get(fmt.name)
    if e is None or e[3] != fmt.bytes_per_block:
        return _matmul_other(x, w, out)
    K = w.cols
    shape = x.shape
    if shape[-1] != K:
        raise ValueError(f"matmul: x has {shape[-1]} features but W is {w.rows} x {K}")
    # the common case inline: contiguous float32 x, packed rows contiguous (decode calls
    # this a few hundred times per token)
    if x.dtype is not _F32:
        x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        xp = _fb(_FLOATS, x)
    except ValueError:
        x = np.ascontiguousarray(x)
        xp = _fb(_FLOATS, x)
    if out is None:
        out = np.empty(shape[:-1] + (w.rows,), _F32)
    elif out.dtype is not _F32 or out.shape != shape[:-1] + (w.rows,):
        _new_or_check(out, shape[:-1] + (w.rows,))  # raises with the details
    data = w.data
    try:
        dp = _fb(data)
    except ValueError:
        data = np.ascontiguousarray(data)
        dp = _fb(data)
    try:
        op = _fb(_FLOATS, out, True)
    except ValueError:
        _new_or_check(out, shape[:-1] + (w.rows,))
        raise
    e[0](xp, x.size // K if K else 0, K, dp, data.strides[0], w.rows, op)
    return out


def matmul_multi(x: np.ndarray, weights: list[PackedMatrix],
                 outs: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """[x @ W.T for W in weights] as one parallel job (x converted once): the fused decode
    step's q/k/v and gate/up. The weights must share a native format and their column
    count; returns the outputs ([..., rows_i] each)."""
    if not weights:
        return []
    fmt, K = weights[0].format, weights[0].cols
    if any(w.format.name != fmt.name or w.cols != K for w in weights) or \
            fmt.name not in _FMT_IDS or _entry(fmt) is None:
        raise ValueError("matmul_multi: weights must share one native format and one column "
                         f"count, got {[(w.format.name, w.rows, w.cols) for w in weights]}")
    if x.shape[-1] != K:
        raise ValueError(f"matmul_multi: x has {x.shape[-1]} features, weights have {K}")
    if len(weights) > _MULTI_MAX:
        raise ValueError(f"matmul_multi: at most {_MULTI_MAX} matrices, got {len(weights)}")
    xp, x = _in(x)
    lead = x.shape[:-1]
    if outs is None:
        outs = [np.empty(lead + (w.rows,), _F32) for w in weights]
    datas = [w.data if w.data.flags.c_contiguous else np.ascontiguousarray(w.data)
             for w in weights]
    rc = _L.lk_matmul_multi(
        _FMT_IDS[fmt.name], xp, x.size // K if K else 0, K, len(weights),
        _ffi.new("const void *[]", [_fb(d) for d in datas]),
        _ffi.new("int64_t[]", [d.strides[0] for d in datas]),
        _ffi.new("int64_t[]", [w.rows for w in weights]),
        _ffi.new("float *[]", [_fb(_FLOATS, _new_or_check(o, lead + (w.rows,)), True)
                               for o, w in zip(outs, weights)]))
    if rc:
        raise ValueError(f"lk_matmul_multi refused {fmt.name} with K={K}")
    return outs


def _matmul_other(x, w, out):
    if w.format.matmul is not None:
        lead = x.shape[:-1]
        y = w.format.matmul(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]), w.data)
        y = y.reshape(*lead, w.rows)
    else:
        y = ops.matmul(x, w)
    if out is not None:
        out[...] = y
        return out
    return y


def embed(w: PackedMatrix, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows `ids` (any int shape) of W [vocab, D] as float32 [..., D]."""
    e = _entry(w.format)
    if e is None:
        y = (w.format.embed(w.data, np.asarray(ids).reshape(-1)) if w.format.embed is not None
             else ops.embed(w, ids))
        y = y.reshape(*np.shape(ids), w.cols)
        if out is not None:
            out[...] = y
            return out
        return y
    ids = np.asarray(ids)
    flat = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    out = _new_or_check(out, ids.shape + (w.cols,))
    dp, ldw = _packed(w.data)
    if e[1](dp, ldw, w.rows, w.cols, _fb(_INT64S, flat), flat.size, _fb(_FLOATS, out, True)):
        bad = flat[(flat < 0) | (flat >= w.rows)]
        raise IndexError(f"embed: token id {int(bad[0])} is outside the vocabulary [0, {w.rows})")
    return out


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> GGUF Q8_0 bytes [rows, cols / 32 * 34], bit-identical to
    `core_formats.quantize_q8_0` (round half away from zero, half-precision scale)."""
    wp, w = _in(w)
    rows, cols = w.shape
    if cols % 32:
        raise ValueError(f"q8_0 needs a row length that is a multiple of 32, got {cols}")
    out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
    if out.size:
        _L.lk_quantize_q8_0(wp, rows, cols, _fb(out, require_writable=True))
    return out


def q8_0_r16_convert(data: np.ndarray, cols: int, to_r16: bool) -> np.ndarray:
    """q8_0 bytes [rows, cols / 32 * 34] <-> q8_0_r16 (same shape, rows % 16 == 0), in C,
    bit-identical to `core_formats.q8_0_to_r16` / `r16_to_q8_0`. A writable contiguous
    array is converted in place (the weights never exist twice); others are copied."""
    rows = data.shape[0]
    if data.ndim != 2 or rows % 16 or cols % 32 or data.shape[1] != cols // 32 * 34:
        raise ValueError(f"q8_0_r16 needs rows % 16 == 0 and {cols // 32 * 34}-byte rows, got "
                         f"{data.shape} for {cols} columns")
    if data.dtype == np.uint8 and data.flags.c_contiguous and data.flags.writeable:
        out = src = data
    else:
        src = np.ascontiguousarray(data, dtype=np.uint8)
        out = hugepages.empty(src.shape, np.uint8)
    if src.size:
        fn = _L.lk_q8_0_to_r16 if to_r16 else _L.lk_r16_to_q8_0
        if fn(_fb(src), rows, cols, _fb(out, require_writable=True)):
            raise MemoryError("q8_0_r16 conversion: out of memory for one 16-row group")
    return out


def format_matmul(name: str):
    """A `WeightFormat.matmul` for format `name`: (x [M, cols], packed [rows, row_bytes])
    -> [M, rows]; None if there is no native kernel for it."""
    e = _NATIVE.get(name)
    if e is None:
        return None
    fn, _, block, nbytes = e

    def matmul_packed(x: np.ndarray, data: np.ndarray) -> np.ndarray:
        K = x.shape[-1]
        if K % block or data.shape[1] != K // block * nbytes:
            raise ValueError(f"{name} matmul: x has {K} features but rows are {data.shape[1]} bytes")
        xp, x = _in(x)
        out = np.empty(x.shape[:-1] + (data.shape[0],), _F32)
        dp, ldw = _packed(data)
        fn(xp, x.size // K if K else 0, K, dp, ldw, data.shape[0], _fb(_FLOATS, out, True))
        return out

    matmul_packed.__name__ = f"matmul_{name}_native"
    return matmul_packed


def format_embed(name: str):
    """A `WeightFormat.embed` for format `name`: (packed, int ids [n]) -> [n, cols]."""
    e = _NATIVE.get(name)
    if e is None:
        return None
    fn, block, nbytes = e[1], e[2], e[3]

    def embed_packed(data: np.ndarray, ids: np.ndarray) -> np.ndarray:
        cols = data.shape[1] // nbytes * block
        flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        out = np.empty((flat.size, cols), _F32)
        dp, ldw = _packed(data)
        if fn(dp, ldw, data.shape[0], cols, _fb(_INT64S, flat), flat.size, _fb(_FLOATS, out, True)):
            raise IndexError(f"embed: a token id is outside the vocabulary [0, {data.shape[0]})")
        return out

    embed_packed.__name__ = f"embed_{name}_native"
    return embed_packed
