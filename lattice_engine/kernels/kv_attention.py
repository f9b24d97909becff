"""Causal grouped-query attention over keys and values: `attention` over a contiguous (or
strided) cache [B, S, Hkv, D], `paged_attention` over a paged KV pool read through block
tables (a flat batch of sequences, each at its own position).

(Named kv_attention, not attention, so that `kernels.attention` stays the function.)
"""

from __future__ import annotations

import numpy as np

from .buffers import _F32, _in, _new_or_check, _strided
from .runtime import _FLOATS, _INT64S, _L, _fb, _ffi

KV_CODES = {"f32": 0, "f16": 1, "q8_0": 2}  # LK_KV_* (lattice_kernels.h)
_STORAGE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "q8_0": np.dtype(np.uint8)}


def _kv_args(kv, k, v, D):
    """(dtype code, k_scale pointer, keep) for stored k / v of layout kv (None: f32)."""
    dtype = "f32" if kv is None else kv.dtype
    row = {"f32": D, "f16": D, "q8_0": D // 32 * 34}[dtype]
    for a in (k, v):
        if a.dtype != _STORAGE[dtype] or a.shape[-1] != row:
            raise ValueError(f"attention: a {dtype} KV array must be {_STORAGE[dtype]} with "
                             f"{row} per head vector, got {a.dtype} {a.shape}")
    scale = None if kv is None or kv.k_scale is None else \
        np.ascontiguousarray(kv.k_scale, dtype=np.float32)
    return KV_CODES[dtype], (_ffi.NULL if scale is None else _fb(_FLOATS, scale)), scale


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, scale: float,
              out: np.ndarray | None = None, kv=None) -> np.ndarray:
    """Causal grouped-query attention (see `ops.attention`).

    q [B, T, Hq, D] at positions start_pos .. start_pos + T - 1; k, v [B, S, Hkv, row] for
    positions 0 .. S - 1, stored as `kv` says (a `cache.dense.KVLayout`; None: float32
    [.., D]): f16 and q8_0 rows are read as stored and widened a tile at a time. q, k and
    v may be strided views (a slice of a longer cache, cache[:, :S], or a head-major cache
    transposed) as long as each head vector is contiguous: they are not copied. Returns
    [B, T, Hq, D].
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must be 4-D, k and v alike")
    B, T, Hq, D = q.shape
    _, S, Hkv, _ = k.shape
    if k.shape[0] != B or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {q.shape} does not fit k {k.shape} (GQA needs Hq % Hkv == 0)")
    if start_pos < 0:
        raise ValueError(f"attention: start_pos must be >= 0, got {start_pos}")
    code, k_scale, _keep = _kv_args(kv, k, v, D)
    out = _new_or_check(out, (B, T, Hq, D))
    qp, q, qs = _strided(q)
    if code == 0:
        kp, k, ks = _strided(k)
        vp, v, vs = _strided(v)
    else:
        kp, k, ks = _strided_raw(k)
        vp, v, vs = _strided_raw(v)
    rc = _L.lk_attention_kv(qp, B, T, Hq, D, qs[0], qs[1], qs[2], code, kp, ks[0], ks[1],
                            ks[2], vp, vs[0], vs[1], vs[2], k_scale, S, Hkv, start_pos, scale,
                            _fb(_FLOATS, out, True))
    if rc:
        raise ValueError(f"attention: shapes q {q.shape}, k {k.shape} do not fit")
    return out


def _strided_raw(a: np.ndarray):
    """(void pointer, array, element strides of its first three axes) for a stored KV array
    whose last axis is contiguous (f16 / uint8 storage)."""
    size = a.itemsize
    if a.strides[-1] != size or any(st < 0 or st % size for st in a.strides) or not a.size:
        a = np.ascontiguousarray(a)
    strides = tuple(st // size for st in a.strides[:3])
    try:
        return _ffi.cast("void *", _ffi.from_buffer(a)), a, strides
    except ValueError:  # a strided view (a slice of a batched cache): one 1-D span over it
        n = 1 + sum((d - 1) * (st // size) for d, st in zip(a.shape, a.strides))
        span = np.lib.stride_tricks.as_strided(a, shape=(n,), strides=(size,))
        return _ffi.cast("void *", _ffi.from_buffer(span)), a, strides


def paged_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                    q_start: np.ndarray, pos_start: np.ndarray, block_tables: np.ndarray,
                    scale: float, out: np.ndarray | None = None, kv=None) -> np.ndarray:
    """Causal GQA for a flat batch of sequences over a paged KV pool (see
    `ops.paged_attention`). q [N, Hq, D]; pools [num_blocks, block_size, Hkv, row] stored
    as `kv` says (None: float32), used in place (they must be C-contiguous);
    block_tables int32 [S, max_blocks]."""
    if q.ndim != 3 or k_pool.ndim != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"paged_attention: q {q.shape} must be [N, Hq, D] and the pools "
                         f"[blocks, block_size, Hkv, D], alike (got {k_pool.shape}, {v_pool.shape})")
    N, Hq, D = q.shape
    nb, bs, Hkv, _ = k_pool.shape
    if Hq % Hkv:
        raise ValueError(f"paged_attention: q {q.shape} does not fit the pool {k_pool.shape}")
    code, k_scale, _keep = _kv_args(kv, k_pool, v_pool, D)
    for pool in (k_pool, v_pool):
        if not pool.flags.c_contiguous:
            raise ValueError("paged_attention: the KV pools must be C-contiguous")
    qs = np.ascontiguousarray(q_start, dtype=np.int64)
    ps = np.ascontiguousarray(pos_start, dtype=np.int64)
    bt = np.ascontiguousarray(block_tables, dtype=np.int32)
    S = ps.shape[0]
    if qs.shape != (S + 1,) or bt.ndim != 2 or bt.shape[0] != S or qs[-1] != N:
        raise ValueError(f"paged_attention: q_start {qs.shape} must have S+1={S + 1} entries "
                         f"ending at N={N}; block_tables {bt.shape} must be [S, max_blocks]")
    if bt.size and (bt.min() < 0 or bt.max() >= nb):
        raise ValueError(f"paged_attention: a block id is outside the pool [0, {nb})")
    qp, q = _in(q)
    out = _new_or_check(out, (N, Hq, D))
    rc = _L.lk_paged_attention_kv(qp, Hq, D, code, _ffi.cast("void *", _ffi.from_buffer(k_pool)),
                                  _ffi.cast("void *", _ffi.from_buffer(v_pool)), k_scale, bs,
                                  Hkv, S, _fb(_INT64S, qs), _fb(_INT64S, ps),
                                  _ffi.cast("int32_t *", _fb(bt)), bt.shape[1], scale,
                                  _fb(_FLOATS, out, True))
    if rc == -1:
        raise ValueError("paged_attention: a sequence's rows or positions do not fit its "
                         f"block table of {bt.shape[1]} blocks")
    if rc:
        raise MemoryError("paged_attention: out of scratch memory")
    return out


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths,
                      scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Bidirectional attention of a right-padded batch (see `ops.encoder_attention`):
    q, k, v [B, T, H, D]; lengths [B] the real keys of each row (1..T)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"encoder_attention: q, k, v must be one shape [B, T, H, D], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if lengths.shape != (B,) or (B and (lengths.min() < 1 or lengths.max() > T)):
        raise ValueError(f"encoder_attention: lengths must be [{B}] in 1..{T}, got {lengths}")
    qp, q = _in(q)
    kp, k = _in(k)
    vp, v = _in(v)
    out = _new_or_check(out, q.shape)
    rc = _L.lk_encoder_attention(qp, kp, vp, B, T, H, D, _fb(_INT64S, lengths), scale,
                                 _fb(_FLOATS, out, True))
    if rc == -5:
        raise MemoryError("encoder_attention: out of memory")
    if rc:
        raise ValueError("encoder_attention: bad sizes")
    return out


def encoder_attention_packed(q: np.ndarray, k: np.ndarray, v: np.ndarray, offsets,
                             scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Bidirectional attention over packed sequences (see `ops.encoder_attention_packed`):
    q, k, v [N, H, D]; offsets [B + 1] from 0 to N, each sequence at least one row."""
    if q.ndim != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"encoder_attention_packed: q, k, v must be one shape [N, H, D], got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    N, H, D = q.shape
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != N or \
            np.any(np.diff(offsets) < 1):
        raise ValueError(f"encoder_attention_packed: offsets must rise from 0 to {N} by at "
                         f"least 1 per sequence, got {offsets}")
    qp, q = _in(q)
    kp, k = _in(k)
    vp, v = _in(v)
    out = _new_or_check(out, q.shape)
    rc = _L.lk_encoder_attention_packed(qp, kp, vp, offsets.size - 1, _fb(_INT64S, offsets),
                                        H, D, scale, _fb(_FLOATS, out, True))
    if rc == -5:
        raise MemoryError("encoder_attention_packed: out of memory")
    if rc:
        raise ValueError("encoder_attention_packed: bad sizes")
    return out
