"""Exact similarity search over stored embeddings: `VectorIndex` (C kernels when built,
numpy otherwise) and the numpy reference the kernels are tested against.

Metrics: "dot", "cosine" (similarities: higher is better) and "l2" (squared Euclidean
distance: lower is better). Vectors are float32, or int8 (`quantize_int8`: symmetric,
one scale per vector, 4x less memory to stream; int8 scores are exact integers, so the
C and numpy rankings agree exactly). Ties rank the lower id first.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

METRICS = ("dot", "cosine", "l2")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(METRICS)}")


def reference_scores(queries: np.ndarray, db: np.ndarray, metric: str) -> np.ndarray:
    """Every score [nq, n] in float64 (int8 inputs: exact integers)."""
    _check_metric(metric)
    q = np.atleast_2d(queries).astype(np.float64)
    x = np.atleast_2d(db).astype(np.float64)
    if metric == "l2":
        return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1) if q.shape[0] * x.shape[0] < 1 << 22 \
            else (q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * q @ x.T
    dots = q @ x.T
    if metric == "dot":
        return dots
    qn = np.linalg.norm(q, axis=1)[:, None]
    xn = np.linalg.norm(x, axis=1)[None, :]
    den = qn * xn
    return np.divide(dots, den, out=np.zeros_like(dots), where=den > 0)


def reference_topk(queries: np.ndarray, db: np.ndarray, k: int, metric: str = "cosine"):
    """(ids, scores) by a full stable sort of `reference_scores`: numpy's exact search."""
    s = reference_scores(queries, db, metric)
    key = s if metric == "l2" else -s
    ids = np.argsort(key, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(s, ids, axis=1)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: (q int8 [n, d], scale float32 [n]) with x ~ q * scale."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    amax = np.abs(x).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


class VectorIndex:
    """A matrix of stored vectors [n, d] searched exactly: `search(queries, k)`.

    dtype "float32" keeps the vectors as given; "int8" stores them quantized per row
    (queries are quantized the same way; for "dot" and "l2" the returned scores are then
    in the quantized units, for "cosine" they are cosines of the quantized vectors).
    """

    def __init__(self, vectors, metric: str = "cosine", dtype: str = "float32"):
        _check_metric(metric)
        if dtype not in ("float32", "int8"):
            raise ValueError(f"dtype {dtype!r} is not float32 or int8")
        x = np.asarray(vectors)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"vectors must be a non-empty matrix [n, d], got shape {x.shape}")
        self.metric, self.dtype = metric, dtype
        if dtype == "int8":
            self.data = quantize_int8(x)[0] if x.dtype != np.int8 else np.ascontiguousarray(x)
        else:
            self.data = np.ascontiguousarray(x, dtype=np.float32)
        self.norms: Optional[np.ndarray] = None
        if metric == "cosine":
            self.norms = np.sqrt((self.data.astype(np.float64) ** 2).sum(1)).astype(np.float32)

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def dim(self) -> int:
        return self.data.shape[1]

    def _queries(self, queries) -> np.ndarray:
        q = np.atleast_2d(np.asarray(queries))
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be [nq, {self.dim}], got shape {q.shape}")
        if self.dtype == "int8":
            return quantize_int8(q)[0] if q.dtype != np.int8 else np.ascontiguousarray(q)
        return np.ascontiguousarray(q, dtype=np.float32)

    def search(self, queries, k: int = 10, *, backend: str = "auto"):
        """(ids int64 [nq, k], scores float32 [nq, k]), best first. backend: "native",
        "numpy" or "auto" (native when built)."""
        if not (isinstance(k, (int, np.integer)) and 1 <= k <= len(self)):
            raise ValueError(f"k = {k!r} must be an integer in 1..{len(self)} (stored vectors)")
        q = self._queries(queries)
        if backend not in ("auto", "native", "numpy"):
            raise ValueError(f"backend {backend!r} is not auto, native or numpy")
        if backend != "numpy":
            from . import kernels
            if kernels.available():
                from .kernels import distance
                return distance.topk(q, self.data, int(k), self.metric, self.norms)
            if backend == "native":
                raise RuntimeError("the native kernels are not built; use backend='numpy'")
        ids, s = reference_topk(q, self.data, int(k), self.metric)
        return ids, s.astype(np.float32)
