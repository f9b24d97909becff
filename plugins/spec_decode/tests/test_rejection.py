"""The rejection sampler keeps the target distribution, in the style of vLLM's
rejection-sampler test: on a small vocabulary with known p and q, the empirical
distribution of emitted tokens converges to p (total-variation distance shrinking with the
sample count, and below a derived bound at 100k samples), with temperature, top-p and a
grammar-style mask shaping p through the engine's own Sampler and `TargetRows`."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lattice_engine.sampling import SamplingParams, make_sampler
from lattice_engine.speculative import Draft, TargetRows, run_verify
from lattice_spec_decode import RejectionVerifier, rejection_sample

V = 16
ALLOWED = list(range(1, 13))  # the "grammar" allows these tokens only


class AllowMask:
    """A grammar-style mask (apply / accept / rollback / steps, as a GrammarMatcher)."""

    def __init__(self):
        self.allowed = np.zeros(V, bool)
        self.allowed[ALLOWED] = True
        self.steps = 0

    def apply(self, logits):
        logits[~self.allowed] = -np.inf

    def accept(self, token):
        assert self.allowed[token], f"masked token {token} accepted"
        self.steps += 1

    def rollback(self, n):
        self.steps -= n

    def is_terminated(self):
        return False


class FixedRows:
    """Rows whose distributions are given (the bulk loop: the same p at every position)."""

    greedy = False

    def __init__(self, p):
        self.p = p

    def probs(self, i):
        return self.p

    def processed(self, i):
        return np.log(self.p)


def target_setup(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=V).astype(np.float32)
    sampler = make_sampler(SamplingParams(temperature=0.8, top_p=0.9, seed=seed))
    rows = TargetRows(np.tile(logits, (4, 1)), [0], Draft([1, 2, 3]), sampler, AllowMask())
    p = rows.probs(0)
    return logits, sampler, p


def tv(counts, p):
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def bound(p, n, confidence=1e-6):
    """E[TV] <= 1/2 sum_x sqrt(p(x)(1 - p(x)) / n) (Jensen on each |p_hat - p|); TV of n
    samples changes by at most 1/n per sample, so McDiarmid gives P(TV > E + t) <=
    exp(-2 n t^2): t = sqrt(ln(1/confidence) / (2n))."""
    mean = 0.5 * float(np.sqrt(p * (1 - p) / n).sum())
    return mean + math.sqrt(math.log(1 / confidence) / (2 * n))


def test_target_rows_give_the_plain_sampling_distribution():
    logits, sampler, p = target_setup()
    masked = logits.copy()
    masked[[t for t in range(V) if t not in ALLOWED]] = -np.inf
    want = sampler.probabilities(sampler.process([0], masked))
    assert np.array_equal(p, want)
    assert p[0] == 0 and p[13:].sum() == 0  # the mask removed them
    assert (p > 0).sum() < len(ALLOWED)      # top-p removed some more


@pytest.mark.parametrize("drafter", ["sampled q", "one-hot q"])
def test_emitted_tokens_converge_to_the_target_distribution(drafter):
    _, _, p = target_setup()
    rng = np.random.default_rng(1)
    q = rng.dirichlet(np.ones(V))  # puts mass on masked and top-p-cut tokens too
    rows = FixedRows(p)
    n, k = 100_000, 3
    first = np.empty(n, np.int64)
    second = []
    accepted = 0
    for trial in range(n):
        tokens = rng.choice(V, size=k, p=q)
        draft = Draft(tokens.tolist(), np.tile(q, (k, 1)) if drafter == "sampled q" else None)
        out = rejection_sample(rows, draft, rng)
        first[trial] = out[0]
        if len(out) > 1:
            second.append(out[1])
        accepted += len(out) - 1
    assert 0 < accepted < n * k  # both branches ran
    counts = lambda xs: np.bincount(xs, minlength=V).astype(np.float64)  # noqa: E731
    distances = [tv(counts(first[:m]), p) for m in (1_000, 10_000, 100_000)]
    assert distances[0] > distances[1] > distances[2], distances
    assert distances[2] < bound(p, n), (distances, bound(p, n))
    # a token p gives no mass (masked, or cut by top-p) is never emitted
    assert counts(first)[p == 0].sum() == 0
    # the token after a kept draft is distributed as p too
    assert tv(counts(np.array(second)), p) < bound(p, len(second))


def test_the_real_rows_path_matches_the_bulk_one():
    """Through TargetRows + run_verify (mask advanced, rolled back and advanced again):
    the first emitted token follows p, and the mask's step count is the emitted count."""
    logits, sampler, p = target_setup()
    rng = np.random.default_rng(2)
    q = rng.dirichlet(np.ones(V))
    n = 6_000
    first = np.empty(n, np.int64)
    for trial in range(n):
        mask = AllowMask()
        draft = Draft(rng.choice(V, size=3, p=q).tolist(), np.tile(q, (3, 1)))
        rows = TargetRows(np.tile(logits, (4, 1)), [0], draft, sampler, mask)
        out, kept = run_verify(RejectionVerifier(), rows, draft, rng)
        assert mask.steps == len(out) and out[:kept] == draft.tokens[:kept]
        first[trial] = out[0]
    assert tv(np.bincount(first, minlength=V).astype(float), p) < bound(p, n)


def test_greedy_rows_keep_drafts_while_they_are_the_argmax():
    logits = np.full((4, V), -1.0, np.float32)
    logits[0, 5] = logits[1, 6] = logits[2, 9] = logits[3, 2] = 3.0
    sampler = make_sampler(SamplingParams())
    rng = np.random.default_rng(0)
    for drafts, want in (([5, 6, 9], [5, 6, 9, 2]), ([5, 7, 9], [5, 6]), ([4, 6, 9], [5])):
        rows = TargetRows(logits, [0], Draft(drafts), sampler)
        assert run_verify(RejectionVerifier(), rows, Draft(drafts), rng)[0] == want
