"""Distance kernels (dot, cosine, squared L2; float32 and int8) and the exact top-k search
against the numpy reference, for every kernel variant the CPU runs. int8 scores are exact
integers, so their rankings must equal numpy's exactly; float32 scores differ by summation
order only (bounded by `testing.tolerance.dot_bound`), so a float32 ranking may differ
from numpy's only between scores closer than that bound."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lattice_engine.testing.tolerance import dot_bound
from lattice_engine.vectors import (VectorIndex, quantize_int8, reference_scores,
                                    reference_topk)

METRICS = ["dot", "cosine", "l2"]


@pytest.fixture(params=["generic", "avx2", "avx512"])
def variant(request):
    pytest.importorskip("lattice_engine._native")
    from lattice_engine.kernels import distance
    if request.param != "generic" and os.environ.get("LATTICE_ISA") == "generic":
        pytest.skip(f"the {request.param} kernels are disabled by LATTICE_ISA=generic")
    if request.param not in distance.variants():
        pytest.skip(f"this CPU does not run the {request.param} distance kernels")
    distance.variant(request.param)
    assert distance.variant() == request.param
    yield request.param
    distance.variant("best")


def data(n=3000, d=389, nq=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((nq, d)).astype(np.float32),
            rng.standard_normal((n, d)).astype(np.float32))


def float_bound(q, x, metric):
    q64, x64 = np.abs(q.astype(np.float64)), np.abs(x.astype(np.float64))
    if metric == "l2":
        mag = (q64 ** 2).sum(1)[:, None] + (x64 ** 2).sum(1)[None, :] + 2 * q64 @ x64.T
    else:
        mag = q64 @ x64.T
    if metric == "cosine":
        mag = mag / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(x, axis=1)[None, :])
        return 3 * dot_bound(q.shape[1], mag)  # the dot and two norms
    return dot_bound(q.shape[1], mag)


@pytest.mark.native
@pytest.mark.parametrize("metric", METRICS)
def test_pair_and_all_scores(variant, metric):
    from lattice_engine.kernels import distance
    q, x = data(n=200)
    want = reference_scores(q, x, metric)
    got = distance.scores(q, x, metric)
    assert np.all(np.abs(got - want) <= float_bound(q, x, metric) + 1e-30)
    assert abs(distance.distance(q[0], x[0], metric) - want[0, 0]) <= float_bound(q, x, metric)[0, 0]
    qi, _ = quantize_int8(q)
    xi, _ = quantize_int8(x)
    assert np.array_equal(distance.scores(qi, xi, metric).astype(np.float64)[:, :50],
                          reference_scores(qi, xi[:50], metric).astype(np.float32))
    assert distance.distance(qi[1], xi[2], metric) == pytest.approx(
        reference_scores(qi[1], xi[2], metric)[0, 0], rel=1e-12 if metric != "cosine" else 1e-9)


@pytest.mark.native
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [1, 10, 100])
def test_topk_equals_numpy_exact_search(variant, metric, k):
    from lattice_engine.kernels import distance
    q, x = data()
    ids, scores = distance.topk(q, x, k, metric)
    want_ids, want_scores = reference_topk(q, x, k, metric)
    assert ids.shape == scores.shape == (q.shape[0], k)
    bound = float_bound(q, x, metric)
    full = reference_scores(q, x, metric)
    for r in range(q.shape[0]):
        # our scores are the true scores of our ids, within the bound
        assert np.all(np.abs(scores[r] - full[r, ids[r]]) <= bound[r, ids[r]])
        differ = ids[r] != want_ids[r]
        # a different id at a rank is a near-tie: both scores within the bound
        assert np.all(np.abs(full[r, ids[r][differ]] - want_scores[r][differ])
                      <= 2 * bound[r].max())
    assert (ids == want_ids).mean() > 0.99
    # int8: exact integer scores, so exactly numpy's ranking (ties: lower id first)
    qi, xi = quantize_int8(q)[0], quantize_int8(x)[0]
    iids, iscores = distance.topk(qi, xi, k, metric)
    want_iids, want_iscores = reference_topk(qi, xi, k, metric)
    assert np.array_equal(iids, want_iids)
    assert np.allclose(iscores, want_iscores, rtol=1e-6)


@pytest.mark.native
def test_ties_rank_the_lower_id_first(variant):
    from lattice_engine.kernels import distance
    x = np.tile(np.arange(8, dtype=np.float32), (50, 1))  # 50 identical rows
    x[17] += 1
    ids, _ = distance.topk(x[:1], x, 5, "dot")
    assert ids[0].tolist() == [17, 0, 1, 2, 3]
    xi = x.astype(np.int8)
    assert distance.topk(xi[:1], xi, 5, "l2")[0][0].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("metric", METRICS)
def test_vector_index_native_equals_numpy(dtype, metric):
    q, x = data(n=2000, d=64)
    index = VectorIndex(x, metric=metric, dtype=dtype)
    ids_np, s_np = index.search(q, 7, backend="numpy")
    want_ids, _ = reference_topk(index._queries(q), index.data, 7, metric)
    assert np.array_equal(ids_np, want_ids)
    from lattice_engine import kernels
    if not kernels.available():
        pytest.skip("native kernels not built")
    ids, s = index.search(q, 7)
    if dtype == "int8":
        assert np.array_equal(ids, ids_np)
    else:
        assert (ids == ids_np).mean() > 0.99
    assert np.allclose(s, s_np, rtol=1e-4, atol=1e-4)


@pytest.mark.native
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", ["random", "clustered", "scaled"])
def test_the_q8_0_prefilter_gives_the_exact_search(metric, kind):
    """A float32 index of PREFILTER_MIN_ROWS rows or more searches through the q8_0 pass and
    the bound: its ids must be the float64 exact search's, every one, tie order included."""
    from lattice_engine import kernels, vectors
    if not kernels.available():
        pytest.skip("native kernels not built")
    rng = np.random.default_rng({"random": 1, "clustered": 2, "scaled": 3}[kind])
    n, d = vectors.PREFILTER_MIN_ROWS + 37, 64
    if kind == "random":
        x = rng.standard_normal((n, d))
    elif kind == "clustered":  # many close rivals around each query
        centres = rng.standard_normal((20, d))
        x = centres[rng.integers(0, 20, n)] + 0.05 * rng.standard_normal((n, d))
    else:  # norms over three orders of magnitude, exact duplicates, a zero row
        x = rng.standard_normal((n, d)) * np.exp(rng.uniform(-3, 3, (n, 1)))
        x[100:110] = x[5]
        x[7] = 0
    x = x.astype(np.float32)
    q = (x[rng.integers(0, n, 5)] + 0.01 * rng.standard_normal((5, d))).astype(np.float32)
    index = VectorIndex(x, metric=metric)
    for k in (1, 10, 50):
        ids, scores = index.search(q, k)
        want_ids, want_scores = reference_topk(q, x, k, metric)
        assert index._prefilter is not None
        assert np.array_equal(ids, want_ids)
        assert np.allclose(scores, want_scores, rtol=1e-6, atol=1e-6)


@pytest.mark.native
def test_the_prefilter_steps_aside_when_the_bound_cannot_separate_rows():
    from lattice_engine import kernels, vectors
    if not kernels.available():
        pytest.skip("native kernels not built")
    x = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (vectors.PREFILTER_MIN_ROWS, 1))
    x[3000] *= 1.5  # one row stands out, the rest are equal: every row is a candidate
    index = VectorIndex(x, metric="dot")
    ids, _ = index.search(x[:1], 4)
    assert ids[0].tolist() == [3000, 0, 1, 2]


def test_bad_arguments():
    q, x = data(n=20, d=8)
    index = VectorIndex(x)
    for k in (0, 21, 2.0):
        with pytest.raises(ValueError, match=r"k = .* must be an integer in 1\.\.20"):
            index.search(q, k)
    with pytest.raises(ValueError, match=r"queries must be \[nq, 8\]"):
        index.search(np.zeros((2, 9)), 3)
    with pytest.raises(ValueError, match="metric"):
        VectorIndex(x, metric="manhattan")
    with pytest.raises(ValueError, match="non-empty matrix"):
        VectorIndex(np.zeros((0, 4)))
    from lattice_engine import kernels
    if kernels.available():
        from lattice_engine.kernels import distance
        with pytest.raises(ValueError, match="one width and one dtype"):
            distance.topk(q, x.astype(np.int8), 3)
        with pytest.raises(ValueError, match="k = 0"):
            distance.topk(q, x, 0)
