"""Orthogonal rotations built from fast Walsh-Hadamard transforms, for any width.

QuaRot multiplies the residual stream by a randomised Hadamard matrix. A Hadamard matrix of
order n exists only for n = 1, 2 or a multiple of 4, and a fast transform only for powers
of two, while model widths are 896 = 7 x 128, 4864 = 19 x 256, 3584 = 7 x 512. So a width
n = m * p (p the largest power of two dividing n) uses

    M = diag(s) (mix kron H_p) / sqrt(p)

with s random signs, H_p the Sylvester Hadamard matrix (applied by a fast transform) and mix
an m x m random orthogonal matrix that spreads each channel over the m groups as well: every
output is a combination of all n inputs with weights of magnitude ~1/sqrt(n), like a
Hadamard of order n, and it costs n log p + n m per row. The core's `ops.block_rotate` /
`kernels.block_rotate` apply the sign-free part online; the signs of an online rotation are
folded into the weights that produce its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lattice_engine import ops


def power_of_two_factor(n: int) -> int:
    """The largest power of two dividing n (n >= 1)."""
    if n < 1:
        raise ValueError(f"width must be >= 1, got {n}")
    return n & -n


@dataclass(frozen=True)
class Rotation:
    """x -> x M with M = diag(signs) (mix kron H_block) / sqrt(block), orthogonal."""

    signs: np.ndarray  # [n] of +-1
    mix: np.ndarray    # [m, m] orthogonal, float64
    block: int         # a power of two; n = m * block

    @property
    def size(self) -> int:
        return self.mix.shape[0] * self.block

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x @ M along the last axis, in float64 (weights are folded in double precision)."""
        x = np.asarray(x, dtype=np.float64) * self.signs
        m = self.mix.shape[0]
        groups = x.reshape(*x.shape[:-1], m, self.block)
        if m > 1:
            groups = np.einsum("...ir,ij->...jr", groups, self.mix)
        return (ops.fwht(groups) / np.sqrt(self.block)).reshape(x.shape)

    def apply_transposed(self, x: np.ndarray) -> np.ndarray:
        """x @ M^T along the last axis (undoes `apply`)."""
        x = np.asarray(x, dtype=np.float64)
        m = self.mix.shape[0]
        groups = ops.fwht(x.reshape(*x.shape[:-1], m, self.block)) / np.sqrt(self.block)
        if m > 1:
            groups = np.einsum("...jr,ij->...ir", groups, self.mix)
        return groups.reshape(x.shape) * self.signs

    def matrix(self) -> np.ndarray:
        """M as a dense matrix (tests)."""
        return self.apply(np.eye(self.size))

    def online_spec(self) -> dict:
        """The model config entry for applying the sign-free part at run time."""
        return {"block": self.block, "mix": self.mix.tolist()}


def random_rotation(n: int, rng: np.random.Generator, signs: bool = True) -> Rotation:
    """A randomised rotation of width n (random signs, random orthogonal mix)."""
    block = power_of_two_factor(n)
    m = n // block
    if m > 1:
        q, r = np.linalg.qr(rng.standard_normal((m, m)))
        mix = q * np.sign(np.diag(r))  # Haar-distributed
    else:
        mix = np.ones((1, 1))
    s = rng.choice([-1.0, 1.0], size=n) if signs else np.ones(n)
    return Rotation(s, mix, block)
