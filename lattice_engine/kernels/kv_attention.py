"""Causal grouped-query attention over keys and values: `attention` over a contiguous (or
strided) cache [B, S, Hkv, D], `paged_attention` over a paged KV pool read through block
tables (a flat batch of sequences, each at its own position).

(Named kv_attention, not attention, so that `kernels.attention` stays the function.)
"""

from __future__ import annotations

import numpy as np

from .buffers import _F32, _in, _new_or_check, _strided
from .runtime import _FLOATS, _INT64S, _L, _fb, _ffi

def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int, scale: float,
              out: np.ndarray | None = None) -> np.ndarray:
    """Causal grouped-query attention (see `ops.attention`).

    q [B, T, Hq, D] at positions start_pos .. start_pos + T - 1; k, v [B, S, Hkv, D] for
    positions 0 .. S - 1. q, k and v may be strided views (a slice of a longer cache,
    cache[:, :S], or a head-major cache transposed) as long as each head vector is
    contiguous: they are not copied. Returns [B, T, Hq, D].
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} must be 4-D, k and v alike")
    B, T, Hq, D = q.shape
    _, S, Hkv, Dk = k.shape
    if k.shape[0] != B or Dk != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {q.shape} does not fit k {k.shape} (GQA needs Hq % Hkv == 0)")
    if start_pos < 0:
        raise ValueError(f"attention: start_pos must be >= 0, got {start_pos}")
    out = _new_or_check(out, (B, T, Hq, D))
    qp, q, qs = _strided(q)
    kp, k, ks = _strided(k)
    vp, v, vs = _strided(v)
    _L.lk_attention(qp, B, T, Hq, D, qs[0], qs[1], qs[2], kp, ks[0], ks[1], ks[2],
                    vp, vs[0], vs[1], vs[2], S, Hkv, start_pos, scale, _fb(_FLOATS, out, True))
    return out

def paged_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                    q_start: np.ndarray, pos_start: np.ndarray, block_tables: np.ndarray,
                    scale: float, out: np.ndarray | None = None) -> np.ndarray:
    """Causal GQA for a flat batch of sequences over a paged KV pool (see
    `ops.paged_attention`). q [N, Hq, D]; pools [num_blocks, block_size, Hkv, D], used in
    place (they must be C-contiguous float32); block_tables int32 [S, max_blocks]."""
    if q.ndim != 3 or k_pool.ndim != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"paged_attention: q {q.shape} must be [N, Hq, D] and the pools "
                         f"[blocks, block_size, Hkv, D], alike (got {k_pool.shape}, {v_pool.shape})")
    N, Hq, D = q.shape
    nb, bs, Hkv, Dk = k_pool.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"paged_attention: q {q.shape} does not fit the pool {k_pool.shape}")
    for pool in (k_pool, v_pool):
        if pool.dtype is not _F32 or not pool.flags.c_contiguous:
            raise ValueError("paged_attention: the KV pools must be C-contiguous float32")
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
    rc = _L.lk_paged_attention(qp, Hq, D, _fb(_FLOATS, k_pool), _fb(_FLOATS, v_pool), bs, Hkv,
                               S, _fb(_INT64S, qs), _fb(_INT64S, ps),
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
