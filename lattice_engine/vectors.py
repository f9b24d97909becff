"""Exact similarity search over stored embeddings: `VectorIndex` (C kernels when built,
numpy otherwise) and the numpy reference the kernels are tested against.

Metrics: "dot", "cosine" (similarities: higher is better) and "l2" (squared Euclidean
distance: lower is better). Vectors are float32, or int8 (`quantize_int8`: symmetric,
one scale per vector, 4x less memory to stream; int8 scores are exact integers, so the
C and numpy rankings agree exactly). Ties rank the lower id first.

A large float32 index (`PREFILTER_MIN_ROWS` rows or more, a width that is a multiple of
32) searches in two passes, still exactly: a q8_0 copy of the vectors (27% of their bytes)
is scored by the q8_0 matmul kernel, each score with a rigorous error bound (Cauchy-Schwarz
on the stored rows' quantization residuals, the kernel's int16 query rounding and its
float32 sums, plus numpy's own rounding on both sides); the rows whose upper bound reaches
the k-th best lower bound are the candidates (`lk_topk_candidates`), and those few are
scored exactly in float32 and ranked. The top k of the exact scores is always among the
candidates, so the result is the exact search's, while the pass over all rows streams a
quarter of the bytes: the search is bound by memory bandwidth.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

METRICS = ("dot", "cosine", "l2")
PREFILTER_MIN_ROWS = 16384
_U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff


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
    The index is read-only: contiguous float32 vectors are kept without a copy, and the
    norms and the q8_0 copy of a large index are computed from them once, so changing the
    array afterwards would make searches inexact; build a new index instead.
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
        self._prefilter: Optional[_Prefilter] = None

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
                if self.dtype == "float32" and len(self) >= PREFILTER_MIN_ROWS and \
                        self.dim % 32 == 0 and 4 * k <= len(self):
                    if self._prefilter is None:
                        self._prefilter = _Prefilter(self.data, self.metric)
                    found = self._prefilter.search(q, self.data, int(k))
                    if found is not None:
                        return found
                return distance.topk(q, self.data, int(k), self.metric, self.norms)
            if backend == "native":
                raise RuntimeError("the native kernels are not built; use backend='numpy'")
        ids, s = reference_topk(q, self.data, int(k), self.metric)
        return ids, s.astype(np.float32)


class _Prefilter:
    """The q8_0 copy of a float32 index and the per-row terms of its error bound (see the
    module docstring). Built on the first search that uses it."""

    CHUNK = 8192  # rows converted at a time (no float64 copy of the whole index)

    def __init__(self, data: np.ndarray, metric: str):
        from .quant import core_formats as CF
        from .quant.formats import pack

        n, d = data.shape
        packed = pack(CF.Q8_0, "vectors", data)
        resid = np.empty(n, np.float32)
        xhat_norm = np.empty(n, np.float32)
        norm = np.empty(n, np.float64)
        for r0 in range(0, n, self.CHUNK):
            rows = slice(r0, min(n, r0 + self.CHUNK))
            x = data[rows].astype(np.float64)
            xhat = CF.q8_0_to_float(packed.data[rows], d).astype(np.float64)
            # rounded up a little: the bound must hold for the float32 copies too
            resid[rows] = np.sqrt(((x - xhat) ** 2).sum(1)) * (1 + 1e-6)
            xhat_norm[rows] = np.sqrt((xhat ** 2).sum(1)) * (1 + 1e-6)
            norm[rows] = np.sqrt((x ** 2).sum(1))
        self.packed = CF.native_layout(packed)
        self.metric, self.d = metric, d
        self.r, self.xn = resid, xhat_norm
        # score = A m p + o: cosine divides by both norms, l2 ranks 2 q.x - |x|^2 (|q|^2 is
        # the same for every row); e: the rounding of o and of numpy's own l2 sum
        self.m = np.ones(n, np.float32)
        self.o = np.zeros(n, np.float32)
        self.e = np.zeros(n, np.float32)
        if metric == "cosine":
            self.m = np.where(norm > 0, 1.0 / np.maximum(norm, 1e-300), 0.0).astype(np.float32)
        elif metric == "l2":
            self.m[:] = 2.0
            self.o = (-(norm ** 2)).astype(np.float32)
            self.e = (8 * _U * norm ** 2).astype(np.float32)

    def search(self, q: np.ndarray, data: np.ndarray, k: int):
        """(ids, scores) as the exact search gives them, or None when the bound leaves too
        many candidates to pay (nearly equal vectors): the caller then scores every row."""
        from .kernels import matmuls
        from .kernels.runtime import _FLOATS, _INT64S, _L, _fb

        nq, n = q.shape[0], self.m.shape[0]
        A = matmuls.matmul(q, self.packed)  # [nq, n] approximate q . x
        qd = q.astype(np.float64)
        qn = np.sqrt((qd ** 2).sum(1))
        # the kernel rounds a query to int16 per block of 32 (scale amax / 32767): at most
        # half a step per value
        amax = np.abs(qd.reshape(nq, -1, 32)).max(axis=2)
        eq = np.sqrt((32 * (amax / 32767 / 2) ** 2).sum(1))
        nb = self.d // 32
        # |q.x - A| <= |q| r + |e_q| |x^| + (float32 sums of nb block products) + numpy's own
        # rounding of the exact score (d products), both sides, with room to spare
        alpha = (qn * (1 + 1e-5)).astype(np.float32)
        beta = (eq * 1.01 + (nb + 2 + 2 * self.d) * 2 * _U * qn * 1.01).astype(np.float32)
        p = np.ones(nq, np.float32)
        if self.metric == "cosine":
            p = np.where(qn > 0, 1.0 / np.maximum(qn, 1e-300), 0.0).astype(np.float32)
        cap = max(8 * k, 64)
        for _ in range(2):
            cand = np.empty((nq, cap), np.int64)
            counts = np.empty(nq, np.int64)
            rc = _L.lk_topk_candidates(
                _fb(_FLOATS, A), nq, n, k, _fb(_FLOATS, self.m), _fb(_FLOATS, self.o),
                _fb(_FLOATS, self.r), _fb(_FLOATS, self.xn), _fb(_FLOATS, self.e),
                _fb(_FLOATS, p), _fb(_FLOATS, alpha), _fb(_FLOATS, beta), cap,
                _fb(_INT64S, cand), _fb(_INT64S, counts))
            if rc == -5:
                raise MemoryError("vector search: out of memory")
            if rc:
                raise ValueError(f"vector search: bad sizes (queries {q.shape}, k {k})")
            most = int(counts.max()) if nq else 0
            if most > n // 4:
                return None
            if most <= cap:
                break
            cap = most
        # every query's candidates scored at once (padded to the longest list), in
        # float64 as `reference_scores` scores them
        width = int(counts.max())
        c = cand[:, :width]
        valid = np.arange(width)[None, :] < counts[:, None]
        c = np.where(valid, c, 0)
        x = data[c].astype(np.float64)  # [nq, width, d]
        dots = np.einsum("qwd,qd->qw", x, qd)
        if self.metric == "dot":
            s = dots
        elif self.metric == "l2":
            s = (qd ** 2).sum(1)[:, None] - 2 * dots + (x ** 2).sum(2)
        else:
            den = qn[:, None] * np.sqrt((x ** 2).sum(2))
            s = np.divide(dots, den, out=np.zeros_like(dots), where=den > 0)
        key = np.where(valid, s if self.metric == "l2" else -s, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]  # ties: lower id (c is sorted)
        return np.take_along_axis(c, order, axis=1), \
            np.take_along_axis(s, order, axis=1).astype(np.float32)
