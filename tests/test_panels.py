"""kernels.panels: float32 matmuls in the BLAS order (each output one blocked FMA chain
along K) for the encoders on AVX2 CPUs without AVX-512, which the BERT encoder and the
vision tower take there. Bounds from testing.tolerance's float32 model (any summation
order). Skipped where they do not run (AVX-512 or generic CPUs, LATTICE_PANELS=0)."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import kernels
from lattice_engine.kernels import encoder, panels
from lattice_engine.testing.tolerance import dot_bound, matmul_magnitude

pytestmark = pytest.mark.skipif(not (kernels.available() and panels.ready()),
                                reason="this CPU (or process) does not run panel matmuls")


@pytest.mark.parametrize("m,k,n", [(1, 1, 16), (5, 7, 32), (37, 384, 64), (13, 700, 48),
                                   (256, 96, 1536), (7, 3072, 16)])
def test_panel_matmul_is_within_the_float32_error_model(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :min(k, 4)] = [1e4, -3e-3, 7.5, 0.0][:min(k, 4)]  # wide magnitudes in one row
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
    got = panels.matmul(x, panels.PanelWeight(w))
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    bound = dot_bound(k, matmul_magnitude(x, w), evaluations=1)
    assert got.shape == (m, n) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound)


def test_a_row_does_not_depend_on_its_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    w = panels.PanelWeight(rng.standard_normal((64, 300)).astype(np.float32))
    together = panels.matmul(x, w)
    for i in (0, 5, 6, 17, 39):  # first, last of a 6-row tile, next tile, inside, last
        assert np.array_equal(panels.matmul(x[i:i + 1], w)[0], together[i])
        assert np.array_equal(panels.matmul(x[i:], w)[0], together[i])


def test_shapes_it_cannot_pack_are_refused_or_left_to_float32():
    with pytest.raises(ValueError, match="multiple of 16"):
        panels.PanelWeight(np.zeros((24, 64), np.float32))
    assert panels.PanelWeight.of(np.zeros((24, 64), np.float32)) is None
    w = panels.PanelWeight(np.zeros((32, 64), np.float32))
    with pytest.raises(ValueError, match="x has 32 columns, the weight 64"):
        panels.matmul(np.zeros((2, 32), np.float32), w)
    assert panels.matmul(np.zeros((0, 64), np.float32), w).shape == (0, 32)
    assert isinstance(encoder.weight(np.zeros((32, 64), np.float32)), panels.PanelWeight)
