"""The log-domain Sinkhorn solver against POT's answers (tests/fixtures/transport, made by
scripts/make_transport_fixtures.py with POT 0.9.7, so the suite does not need POT):
balanced and unbalanced plans and costs, the debiased divergence, and a small epsilon
where the plain-domain solver returns garbage and ours stays finite and near the exact
optimal-transport cost."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES
from lattice_engine.transport import sinkhorn, sinkhorn_divergence, sqeuclidean

REF = FIXTURES / "transport"
TENSORS = load_file(str(REF / "pot_reference.safetensors"))
META = json.loads((REF / "pot_reference.json").read_text())
CASES = {c["key"]: c for c in META["cases"]}
TOL = 1e-6


def case(key):
    c = CASES[key]
    return c, {name.split(".", 1)[1]: v for name, v in TENSORS.items()
               if name.startswith(key + ".")}


@pytest.mark.parametrize("key", [k for k in CASES if k.startswith("balanced")])
@pytest.mark.parametrize("scaling", [0.5, 1.0])
def test_balanced_matches_pot(key, scaling):
    c, t = case(key)
    r = sinkhorn(t["a"], t["b"], t["M"], c["reg"], scaling=scaling)
    assert abs(r.cost - c["cost"]) <= TOL  # ot.sinkhorn2
    assert np.abs(r.plan - t["plan"]).max() <= TOL  # ot.sinkhorn
    assert abs(r.value - c["value"]) <= TOL
    assert np.allclose(r.plan.sum(1), t["a"], atol=1e-10)
    assert np.allclose(r.plan.sum(0), t["b"], atol=1e-10)
    # strong duality: the regularised objective is the dual value <a, f> + <b, g>
    assert abs(r.value - (t["a"] @ r.f + t["b"] @ r.g)) <= TOL


@pytest.mark.parametrize("key", [k for k in CASES if k.startswith("unbalanced")])
def test_unbalanced_matches_pot(key):
    c, t = case(key)
    r = sinkhorn(t["a"], t["b"], t["M"], c["reg"], rho=c["reg_m"])
    assert np.abs(r.plan - t["plan"]).max() <= TOL  # ot.unbalanced.sinkhorn_unbalanced
    assert abs(r.cost - c["cost"]) <= TOL  # sinkhorn_unbalanced2, returnCost="linear"
    assert abs(r.value - c["value"]) <= TOL
    # masses are not matched exactly: the KL penalty trades them against transport cost
    assert not np.allclose(r.plan.sum(1), t["a"], atol=1e-3)


@pytest.mark.parametrize("key", [k for k in CASES if k.startswith("divergence")])
def test_debiased_divergence_matches_pot_plans(key):
    c, t = case(key)
    got = sinkhorn_divergence(t["x"], t["y"], c["reg"], rho=c["reg_m"])
    assert abs(got - c["divergence"]) <= TOL
    assert got > 0
    # S(x, x) = 0: the debiasing removes the entropic bias (up to the solves' tolerance:
    # the cross term is solved by alternating updates, the self terms by averaged ones)
    assert abs(sinkhorn_divergence(t["x"], t["x"], c["reg"], rho=c["reg_m"])) <= 1e-7


def test_small_epsilon_stays_finite_where_the_plain_domain_fails():
    t = {k.split(".", 1)[1]: v for k, v in TENSORS.items() if k.startswith("small_eps.")}
    meta = META["small_eps"]
    assert meta["cost_over_eps_max"] > 745  # exp(-C / eps) underflows to 0 in float64
    plain = meta["plain_domain_cost"]
    assert isinstance(plain, str) or abs(plain - meta["emd2"]) > 1  # POT plain: NaN or ~0
    # Sinkhorn needs O(C / eps) iterations to converge here (about 10^5 reach a marginal
    # error of 1e-3, cost 4.8258 against ot.emd2's 4.8243): bounded runs show the iterates
    # stay finite while the marginal error falls
    early = sinkhorn(t["a"], t["b"], t["M"], meta["reg"], max_iter=300)
    r = sinkhorn(t["a"], t["b"], t["M"], meta["reg"], max_iter=1500)
    for res in (early, r):
        assert np.isfinite(res.f).all() and np.isfinite(res.g).all()
        assert np.isfinite(res.plan).all() and np.isfinite(res.cost) and np.isfinite(res.value)
    assert r.error < early.error < 0.1
    assert abs(r.cost - meta["emd2"]) < 0.2


def test_epsilon_scaling_needs_fewer_iterations():
    c, t = case("balanced_1")
    scaled = sinkhorn(t["a"], t["b"], t["M"], 0.05, tol=1e-9)
    flat = sinkhorn(t["a"], t["b"], t["M"], 0.05, tol=1e-9, scaling=1.0)
    assert abs(scaled.value - flat.value) <= 1e-6
    assert scaled.iterations < flat.iterations


def test_bad_arguments_name_the_value():
    a = np.full(3, 1 / 3)
    m = np.ones((3, 3))
    with pytest.raises(ValueError, match="epsilon = 0"):
        sinkhorn(a, a, m, 0)
    with pytest.raises(ValueError, match="equal masses"):
        sinkhorn(a, 2 * a, m, 0.1)
    with pytest.raises(ValueError, match=r"must be \[len\(a\), len\(b\)\]"):
        sinkhorn(a, a, np.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="rho"):
        sinkhorn(a, a, m, 0.1, rho=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        sinkhorn(a, a, np.full((3, 3), np.inf), 0.1)
    assert sqeuclidean(np.eye(2), np.eye(2)).tolist() == [[0, 2], [2, 0]]
