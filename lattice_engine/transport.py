"""Entropic optimal transport: a log-domain Sinkhorn solver with epsilon scaling, balanced
and unbalanced, and the debiased Sinkhorn divergence. The drift detector
(`lattice_engine.drift`) measures distances between windows of embeddings with it.

Problem (a, b weights of the two point clouds, C the cost matrix, eps > 0):

    OT_eps(a, b) = min_P <P, C> + eps KL(P | a x b)                       balanced:
                                                                          P 1 = a, P^T 1 = b
    UOT_eps(a, b) = min_P <P, C> + eps KL(P | a x b)
                          + rho KL(P 1 | a) + rho KL(P^T 1 | b)           unbalanced (rho)

with KL(p | q) = sum p log(p / q) - p + q. The solver iterates on the dual potentials
f, g in the log domain,

    f_i = -lam * eps * logsumexp_j(log b_j + (g_j - C_ij) / eps),   lam = 1 (balanced)
    g_j = -lam * eps * logsumexp_i(log a_i + (f_i - C_ij) / eps),   lam = rho / (rho + eps)

and P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). Nothing is exponentiated outside a
log-sum-exp, so it stays finite at any eps (the plain-domain solver forms K = exp(-C/eps),
which underflows to 0 once C / eps passes ~745 and then divides by zero). Epsilon scaling
starts at the cost's scale and lowers eps geometrically to the target, warm-starting each
stage from the last: far fewer iterations at small eps than starting there.

The plan is the one POT's `ot.sinkhorn` / `ot.unbalanced.sinkhorn_unbalanced` (with
reg_type "kl") compute for the same problem: their K = exp(-M / reg) scaled by u, v is
this plan with u = a exp(f / eps), v = b exp(g / eps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class SinkhornResult:
    """f [n], g [m]: dual potentials; plan [n, m]; cost: <P, C> (what `ot.sinkhorn2`
    returns); value: the regularised objective at P (OT_eps or UOT_eps above); iterations;
    error: the last marginal violation (L1), the stopping criterion."""

    f: np.ndarray
    g: np.ndarray
    plan: np.ndarray
    cost: float
    value: float
    iterations: int
    error: float


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(x, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (np.log(np.sum(np.exp(x - top), axis=axis, keepdims=True)) + top).squeeze(axis)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    """sum p log(p / q) - p + q, with 0 log 0 = 0."""
    pos = p > 0
    return float(np.sum(p[pos] * np.log(p[pos] / q[pos])) - p.sum() + q.sum())


def _check(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float,
           rho: Optional[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    cost = np.asarray(cost, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or cost.shape != (a.size, b.size):
        raise ValueError(f"weights a [{a.shape}] and b [{b.shape}] must be vectors and the cost "
                         f"[{cost.shape}] must be [len(a), len(b)]")
    if a.size == 0 or b.size == 0:
        raise ValueError("each distribution needs at least one point")
    if np.any(a < 0) or np.any(b < 0) or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("weights must be finite and >= 0")
    if not np.all(np.isfinite(cost)):
        raise ValueError("the cost matrix has non-finite entries")
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"epsilon = {eps!r} must be a finite number > 0")
    if rho is not None and not (rho > 0):
        raise ValueError(f"rho (the marginal penalty) = {rho!r} must be > 0, or None for "
                         f"balanced transport")
    if rho is None and abs(a.sum() - b.sum()) > 1e-9 * max(a.sum(), b.sum()):
        raise ValueError(f"balanced transport needs equal masses, got {a.sum():.9g} and "
                         f"{b.sum():.9g}; normalise them or give rho for unbalanced transport")
    return a, b, cost


def sinkhorn(a, b, cost, eps: float, *, rho: Optional[float] = None, tol: float = 1e-12,
             max_iter: int = 100_000, scaling: float = 0.5,
             eps_start: Optional[float] = None, symmetric: bool = False,
             init: Optional[tuple] = None) -> SinkhornResult:
    """Entropic OT between weights a [n] and b [m] under cost [n, m] (see the module
    docstring); `rho` makes it unbalanced. Stops when the marginal violation (L1, of the
    column marginal after the row update; for unbalanced, the change of the potentials)
    drops below `tol`. `scaling` in (0, 1) is the factor between epsilon stages (1: no
    scaling); `eps_start` the first stage's epsilon (default: the cost's range).

    `symmetric`: a problem of a distribution with itself (b is a, cost symmetric), as the
    debiasing terms are; then f = g and the averaged update f <- (f + T(f)) / 2 converges
    in a few dozen iterations where the alternating one crawls (Feydy et al. 2019).

    `init`: potentials (f, g) of a nearby problem to start from (a warm start: the drift
    detector's windows change by a few points between checks); no epsilon scaling then."""
    a, b, cost = _check(a, b, cost, eps, rho)
    if symmetric and (a.shape != b.shape or not np.array_equal(a, b) or
                      not np.allclose(cost, cost.T)):
        raise ValueError("symmetric=True needs b equal to a and a symmetric cost")
    if not 0 < scaling <= 1:
        raise ValueError(f"scaling = {scaling!r} must lie in (0, 1]")
    log_a = np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), -np.inf)
    log_b = np.where(b > 0, np.log(np.where(b > 0, b, 1.0)), -np.inf)
    f = np.zeros(a.size)
    g = np.zeros(b.size)
    spread = float(cost.max() - cost.min())
    e = max(eps_start if eps_start is not None else spread, eps)
    stages = []
    while scaling < 1 and e > eps and init is None:
        stages.append(e)
        e *= scaling
    stages.append(eps)
    if init is not None:
        f = np.array(init[0], dtype=np.float64)
        g = np.array(init[1], dtype=np.float64)
        if f.shape != a.shape or g.shape != b.shape or not (np.isfinite(f).all() and
                                                            np.isfinite(g).all()):
            raise ValueError(f"init potentials must be finite, of shapes {a.shape} and "
                             f"{b.shape}; got {f.shape} and {g.shape}")
    iterations, err = 0, np.inf
    for k, e in enumerate(stages):
        lam = 1.0 if rho is None else rho / (rho + e)
        last = k == len(stages) - 1
        budget = max_iter - iterations if last else 4
        for _ in range(budget):
            if symmetric:
                t = -lam * e * _lse(log_b[None, :] + (g[None, :] - cost) / e, axis=1)
                f_new = g_new = 0.5 * (f + t)
            else:
                f_new = -lam * e * _lse(log_b[None, :] + (g[None, :] - cost) / e, axis=1)
                g_new = -lam * e * _lse(log_a[:, None] + (f_new[:, None] - cost) / e, axis=0)
            iterations += 1
            if not last:
                f, g = f_new, g_new
                continue
            if rho is None:
                # column marginals after the g update are exact: measure the rows
                row = np.exp(_lse(log_b[None, :] + (g_new[None, :] + f_new[:, None] - cost) / e,
                                  axis=1) + log_a)
                err = float(np.sum(np.abs(row - a)))
            else:
                err = float(max(np.max(np.abs(f_new - f)), np.max(np.abs(g_new - g)))) / e
            f, g = f_new, g_new
            if err < tol:
                break
    log_plan = log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - cost) / eps
    plan = np.exp(log_plan)
    lin = float(np.sum(plan * cost))
    ab = a[:, None] * b[None, :]
    value = lin + eps * _kl(plan, ab)
    if rho is not None:
        value += rho * (_kl(plan.sum(axis=1), a) + _kl(plan.sum(axis=0), b))
    return SinkhornResult(f, g, plan, lin, value, iterations, err)


def sqeuclidean(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances [n, m] in float64 (POT's default metric)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    d = np.sum(x * x, 1)[:, None] + np.sum(y * y, 1)[None, :] - 2.0 * x @ y.T
    return np.maximum(d, 0.0)


def sinkhorn_divergence(x, y, eps: float, *, a=None, b=None, rho: Optional[float] = None,
                        cost=sqeuclidean, tol: float = 1e-12, scaling: float = 0.5) -> float:
    """The debiased Sinkhorn divergence between point clouds x [n, d] and y [m, d]
    (uniform weights unless a / b are given):

        S = OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2   (+ eps / 2 (m(a) - m(b))^2, unbalanced)

    with OT the regularised objective (`SinkhornResult.value`). S >= 0, S = 0 iff the
    distributions are equal, and unlike OT_eps it does not shrink a cloud towards its
    mean (Feydy et al. 2019; the unbalanced correction after Sejourne et al. 2019)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x {x.shape} and y {y.shape} must be [n, d] and [m, d] with one d")
    a = np.full(len(x), 1.0 / len(x)) if a is None else np.asarray(a, np.float64)
    b = np.full(len(y), 1.0 / len(y)) if b is None else np.asarray(b, np.float64)
    kw = dict(rho=rho, tol=tol, scaling=scaling)
    xy = sinkhorn(a, b, cost(x, y), eps, **kw).value
    xx = sinkhorn(a, a, cost(x, x), eps, symmetric=True, **kw).value
    yy = sinkhorn(b, b, cost(y, y), eps, symmetric=True, **kw).value
    out = xy - 0.5 * (xx + yy)
    if rho is not None:
        out += 0.5 * eps * (a.sum() - b.sum()) ** 2
    return float(out)
