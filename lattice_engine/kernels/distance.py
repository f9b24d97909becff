"""Vector distances and exact top-k search over the C kernels of native/src/distance.c
(`lattice_engine.vectors` holds the numpy reference and the `VectorIndex` built on these).

Metrics: "dot" and "cosine" (similarities, higher is better) and "l2" (squared Euclidean
distance, lower is better). float32 or int8 vectors; int8 scores are exact integers.
"""

from __future__ import annotations

import numpy as np

from .runtime import _INT64S, _FLOATS, _L, _fb, _ffi

METRICS = {"dot": 0, "cosine": 1, "l2": 2}
VARIANTS = ("generic", "avx2", "avx512")


def _metric(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    return METRICS[metric]


def _matrix(a, name: str) -> tuple[np.ndarray, bool]:
    """a as a C-contiguous 2-D float32 or int8 array, and whether it is int8."""
    a = np.asarray(a)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a vector [d] or a matrix [n, d], got shape {a.shape}")
    if a.dtype == np.int8:
        return np.ascontiguousarray(a), True
    return np.ascontiguousarray(a, dtype=np.float32), False


def distance(a, b, metric: str = "cosine") -> float:
    """dot / cosine similarity / squared L2 distance of two vectors (float32 or int8)."""
    m = _metric(metric)
    a, ia = _matrix(a, "a")
    b, ib = _matrix(b, "b")
    if a.shape[0] != 1 or b.shape != a.shape or ia != ib:
        raise ValueError(f"a {a.shape} and b {b.shape} must be two vectors of one width and "
                         f"one dtype")
    if ia:
        return float(_L.lk_distance_i8(_ffi.cast("int8_t *", _fb(a)), _ffi.cast("int8_t *", _fb(b)),
                                       a.shape[1], m))
    return float(_L.lk_distance_f32(_fb(_FLOATS, a), _fb(_FLOATS, b), a.shape[1], m))


def _pair(queries, db):
    q, iq = _matrix(queries, "queries")
    x, ix = _matrix(db, "db")
    if iq != ix or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries {q.shape} {q.dtype} and stored vectors {x.shape} {x.dtype} "
                         f"need one width and one dtype (float32 or int8)")
    return q, x, iq


def _ptr(a: np.ndarray, i8: bool):
    return _ffi.cast("int8_t *", _fb(a)) if i8 else _fb(_FLOATS, a)


def scores(queries, db, metric: str = "cosine") -> np.ndarray:
    """Every score float32 [nq, n] of queries [nq, d] against db [n, d]."""
    m = _metric(metric)
    q, x, i8 = _pair(queries, db)
    out = np.empty((q.shape[0], x.shape[0]), np.float32)
    fn = _L.lk_scores_i8 if i8 else _L.lk_scores_f32
    rc = fn(_ptr(q, i8), q.shape[0], _ptr(x, i8), x.shape[0], q.shape[1], m, _fb(_FLOATS, out))
    if rc:
        raise ValueError(f"scores: bad sizes (queries {q.shape}, db {x.shape})")
    return out


def topk(queries, db, k: int, metric: str = "cosine", db_norms=None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [nq, k], scores float32 [nq, k]) of the k best stored vectors per query,
    best first (highest dot / cosine, lowest squared L2; equal scores: lower id first).
    db_norms: the stored rows' L2 norms for cosine (computed when None)."""
    m = _metric(metric)
    q, x, i8 = _pair(queries, db)
    n = x.shape[0]
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= n):
        raise ValueError(f"k = {k!r} must be an integer in 1..{n} (the stored vectors)")
    norms = _ffi.NULL
    if db_norms is not None and m == 1:
        db_norms = np.ascontiguousarray(db_norms, dtype=np.float32)
        if db_norms.shape != (n,):
            raise ValueError(f"db_norms has shape {db_norms.shape}, expected ({n},)")
        norms = _fb(_FLOATS, db_norms)
    ids = np.empty((q.shape[0], k), np.int64)
    out = np.empty((q.shape[0], k), np.float32)
    fn = _L.lk_topk_i8 if i8 else _L.lk_topk_f32
    rc = fn(_ptr(q, i8), q.shape[0], _ptr(x, i8), n, q.shape[1], m, int(k), norms,
            _fb(_INT64S, ids), _fb(_FLOATS, out))
    if rc == -5:
        raise MemoryError(f"topk: out of memory for {q.shape[0]} queries x k = {k}")
    if rc:
        raise ValueError(f"topk: bad sizes (queries {q.shape}, db {x.shape}, k {k})")
    return ids, out


def variant(name: str | None = None) -> str:
    """The distance kernels' variant ("generic", "avx2", "avx512"); with a name, force it
    (if the CPU runs it; "best" resets the choice). Returns the active one."""
    if name is None:
        return VARIANTS[_L.lk_distance_variant(-1)]
    if name == "best":
        return VARIANTS[_L.lk_distance_variant(-2)]
    if name not in VARIANTS:
        raise ValueError(f"distance variant {name!r} is not one of {', '.join(VARIANTS)}")
    return VARIANTS[_L.lk_distance_variant(VARIANTS.index(name))]


def variants() -> list[str]:
    """The variants this CPU runs."""
    mask = _L.lk_distance_variants()
    return [v for i, v in enumerate(VARIANTS) if mask & (1 << i)]
