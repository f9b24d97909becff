"""kernels.bf16x3: float32 matmuls on AMX-BF16 (x and W split into bf16 high and low parts,
three products summed in float32), which the BERT encoder takes where the CPU has them
(tests/test_embedding.py checks the encoder takes it).
Bounds from testing.tolerance's model with unit U_BF16X3. Skipped on CPUs without AMX-BF16
(and under LATTICE_ISA=generic / LATTICE_AMX=0)."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import kernels
from lattice_engine.kernels import bf16x3
from lattice_engine.testing.tolerance import U_BF16X3, dot_bound, matmul_magnitude

pytestmark = pytest.mark.skipif(not (kernels.available() and bf16x3.ready()),
                                reason="this CPU (or process) has no AMX-BF16")


@pytest.mark.parametrize("m,k,n", [(1, 32, 32), (15, 64, 96), (37, 384, 64), (256, 96, 1536)])
def test_bf16x3_matmul_is_within_its_error_model(m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, :4] = [1e4, -3e-3, 7.5, 0.0]  # wide magnitudes in one row
    w = (0.05 * rng.standard_normal((n, k))).astype(np.float32)
    got = bf16x3.matmul(x, bf16x3.Bf16x3Weight(w))
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    bound = dot_bound(k, matmul_magnitude(x, w), evaluations=1, unit=U_BF16X3)
    assert got.shape == (m, n) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound)
    # far closer than one bf16 product per term would be (relative 2^-9)
    assert np.abs(got - exact).max() < 1e-3 * np.abs(exact).max()


def test_a_row_does_not_depend_on_its_batch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    w = bf16x3.Bf16x3Weight(rng.standard_normal((64, 64)).astype(np.float32))
    together = bf16x3.matmul(x, w)
    for i in (0, 17, 39):
        assert np.array_equal(bf16x3.matmul(x[i:i + 1], w)[0], together[i])


def test_shapes_it_cannot_pack_are_refused_or_left_to_float32():
    with pytest.raises(ValueError, match="multiples of 32"):
        bf16x3.Bf16x3Weight(np.zeros((48, 64), np.float32))
    assert bf16x3.Bf16x3Weight.of(np.zeros((48, 64), np.float32)) is None
    w = bf16x3.Bf16x3Weight(np.zeros((32, 64), np.float32))
    with pytest.raises(ValueError, match="columns"):
        bf16x3.matmul(np.zeros((2, 32), np.float32), w)
