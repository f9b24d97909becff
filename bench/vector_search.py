"""Exact top-k search over stored embeddings: lattice's C kernels next to numpy, same run.

    python bench/vector_search.py [--n 100000] [--dim 384] [--k 10] [--queries 1 16] [--runs 5]

Stored vectors: random unit vectors (as normalised embeddings are). lattice searches through
`VectorIndex.search`, as a user does: a float32 index this large takes the exact two-pass
search (the q8_0 pass with its error bound, then the candidates scored exactly; column
"path"), an int8 index the full scan of distance.c. numpy's exact search
is the usual one: scores = queries @ db.T (BLAS), np.argpartition for the top k, then a
sort of those k; for cosine the stored norms are precomputed for both. int8: the vectors
quantized per row (lattice_engine.vectors.quantize_int8); numpy scores them with an
integer matmul (no BLAS for integers). Prints one JSON row per (dtype, metric, queries)
with both times, the ratio numpy / lattice, and the share of ids equal to numpy's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file


def numpy_search(q, db, k, metric, norms):
    if metric == "l2":
        s = -((q.astype(np.float32) ** 2).sum(1)[:, None] - 2 * (q @ db.T) + norms[None, :] ** 2)
    else:
        s = q @ db.T
        if metric == "cosine":
            s = s / (np.linalg.norm(q, axis=1)[:, None] * norms[None, :])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def timed(fn, runs):
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--metrics", nargs="+", default=["cosine", "dot", "l2"])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    add_results_option(ap)
    args = ap.parse_args()

    from lattice_engine.kernels import distance, set_threads
    from lattice_engine.vectors import VectorIndex, quantize_int8

    set_threads(args.threads)
    rng = np.random.default_rng(0)
    db = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    dbi, _ = quantize_int8(db)
    for nq in args.queries:
        q = rng.standard_normal((nq, args.dim)).astype(np.float32)
        qi, _ = quantize_int8(q)
        for dtype, x, qq in (("float32", db, q), ("int8", dbi, qi)):
            norms = np.linalg.norm(x.astype(np.float32), axis=1).astype(np.float32)
            for metric in args.metrics:
                index = VectorIndex(x, metric=metric, dtype=dtype)
                ours = timed(lambda: index.search(qq, args.k), args.runs)
                if dtype == "int8":  # numpy on the same integers: exact int64 scores
                    xi64, qi64 = x.astype(np.int64), qq.astype(np.int64)
                    peer_fn = lambda: numpy_search(qi64, xi64, args.k, metric,  # noqa: E731
                                                   np.sqrt((xi64 ** 2).sum(1)))
                else:
                    peer_fn = lambda: numpy_search(qq, x, args.k, metric, norms)  # noqa: E731
                peer = timed(peer_fn, max(1, args.runs // (5 if dtype == "int8" else 1)))
                ids, _ = index.search(qq, args.k)
                same = float((ids == peer_fn()).mean())
                path = "q8_0 pass + exact candidates" if index._prefilter is not None \
                    else "full scan"
                emit({"bench": "vector_search", "n": args.n, "dim": args.dim, "k": args.k,
                      "queries": nq, "dtype": dtype, "metric": metric,
                      "variant": distance.variant(), "path": path,
                      "lattice_ms": round(ours * 1e3, 3), "numpy_ms": round(peer * 1e3, 3),
                      "ratio": round(peer / ours, 2), "same_ids": same},
                     args.results, threads=args.threads)


if __name__ == "__main__":
    main()
