"""Reference values for the Sinkhorn tests from the POT library (`pip install pot`).

    python scripts/make_transport_fixtures.py

Writes tests/fixtures/transport/pot_reference.safetensors and pot_reference.json: random
problems (point clouds, weights, costs) with POT's answers, so the suite checks
lattice_engine.transport against POT without needing it:

  balanced_{i}:   ot.sinkhorn (plan) and ot.sinkhorn2 (<P, M>), method "sinkhorn_log"
  unbalanced_{i}: ot.unbalanced.sinkhorn_unbalanced (plan, reg_type "kl") and
                  sinkhorn_unbalanced2 with returnCost "linear" and "total"
  divergence_{i}: the debiased divergence built from POT's plans
                  (objective <P, M> + reg KL(P | a x b) [+ unbalanced terms])
  small_eps:      a problem at eps 1e-3 where the plain-domain solver (POT's "sinkhorn")
                  returns NaN / zeros, with ot.emd2's exact cost for comparison
Run to convergence (stopThr 1e-13); POT's plain Sinkhorn is used only to show it fails.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import ot
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "transport"
STOP, ITERS = 1e-13, 200_000


def kl(p, q):
    pos = p > 0
    return float(np.sum(p[pos] * np.log(p[pos] / q[pos])) - p.sum() + q.sum())


def objective(P, a, b, M, reg, reg_m=None):
    v = float(np.sum(P * M)) + reg * kl(P, np.outer(a, b))
    if reg_m is not None:
        v += reg_m * (kl(P.sum(1), a) + kl(P.sum(0), b))
    return v


def problem(rng, n, m, d):
    x = rng.standard_normal((n, d))
    y = rng.standard_normal((m, d)) * 1.3 + 0.5
    a = rng.random(n) + 0.1
    b = rng.random(m) + 0.1
    return x, y, a, b


def main() -> None:
    rng = np.random.default_rng(2026)
    tensors, meta = {}, {"pot": ot.__version__, "cases": []}
    for i, (n, m, d, reg) in enumerate([(7, 9, 2, 0.5), (20, 15, 3, 0.1), (40, 40, 5, 1.0)]):
        x, y, a, b = problem(rng, n, m, d)
        a, b = a / a.sum(), b / b.sum()
        M = ot.dist(x, y)  # squared Euclidean
        P = ot.sinkhorn(a, b, M, reg, method="sinkhorn_log", numItermax=ITERS, stopThr=STOP)
        cost = float(ot.sinkhorn2(a, b, M, reg, method="sinkhorn_log", numItermax=ITERS,
                                  stopThr=STOP))
        key = f"balanced_{i}"
        tensors.update({f"{key}.a": a, f"{key}.b": b, f"{key}.M": M, f"{key}.plan": P})
        meta["cases"].append({"key": key, "reg": reg, "cost": cost,
                              "value": objective(P, a, b, M, reg)})
    for i, (n, m, d, reg, reg_m) in enumerate([(8, 6, 2, 0.5, 1.0), (25, 30, 3, 0.2, 0.5),
                                               (30, 20, 4, 1.0, 5.0)]):
        x, y, a, b = problem(rng, n, m, d)
        a, b = a / a.sum(), 1.5 * b / b.sum()  # unequal masses
        M = ot.dist(x, y)
        P = ot.unbalanced.sinkhorn_unbalanced(a, b, M, reg, reg_m, reg_type="kl",
                                              numItermax=ITERS, stopThr=STOP)
        lin = float(ot.unbalanced.sinkhorn_unbalanced2(a, b, M, reg, reg_m, reg_type="kl",
                                                       returnCost="linear",
                                                       numItermax=ITERS, stopThr=STOP))
        total = float(ot.unbalanced.sinkhorn_unbalanced2(a, b, M, reg, reg_m, reg_type="kl",
                                                         returnCost="total",
                                                         numItermax=ITERS, stopThr=STOP))
        key = f"unbalanced_{i}"
        tensors.update({f"{key}.a": a, f"{key}.b": b, f"{key}.M": M, f"{key}.plan": P})
        meta["cases"].append({"key": key, "reg": reg, "reg_m": reg_m, "cost": lin,
                              "total": total, "value": objective(P, a, b, M, reg, reg_m)})
    for i, (n, m, d, reg, reg_m) in enumerate([(15, 12, 3, 0.3, None), (15, 12, 3, 0.3, 2.0)]):
        x, y, _, _ = problem(rng, n, m, d)
        a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)

        def ot_value(p, q, X, Y):
            C = ot.dist(X, Y)
            if reg_m is None:
                plan = ot.sinkhorn(p, q, C, reg, method="sinkhorn_log", numItermax=ITERS,
                                   stopThr=STOP)
            else:
                plan = ot.unbalanced.sinkhorn_unbalanced(p, q, C, reg, reg_m, reg_type="kl",
                                                         numItermax=ITERS, stopThr=STOP)
            return objective(plan, p, q, C, reg, reg_m)

        div = ot_value(a, b, x, y) - 0.5 * (ot_value(a, a, x, x) + ot_value(b, b, y, y))
        key = f"divergence_{i}"
        tensors.update({f"{key}.x": x, f"{key}.y": y})
        meta["cases"].append({"key": key, "reg": reg, "reg_m": reg_m, "divergence": div})
    # small epsilon: C / eps reaches ~1e4, exp underflows to 0 in the plain domain
    x, y, a, b = problem(rng, 30, 30, 2)
    a, b = a / a.sum(), b / b.sum()
    M = ot.dist(x, y) * 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = float(ot.sinkhorn2(a, b, M, 1e-3, method="sinkhorn", numItermax=1000))
    tensors.update({"small_eps.a": a, "small_eps.b": b, "small_eps.M": M})
    meta["small_eps"] = {"reg": 1e-3, "plain_domain_cost": plain if np.isfinite(plain) else
                         repr(plain), "emd2": float(ot.emd2(a, b, M)),
                         "cost_over_eps_max": float(M.max() / 1e-3)}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
              str(OUT / "pot_reference.safetensors"))
    (OUT / "pot_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta["small_eps"]))


if __name__ == "__main__":
    main()
