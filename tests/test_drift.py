"""The online drift detector: Warming until the reference (first W) and a rolling window
are full, then a check every 16 observations; no alarm over 1,000 checks of a stationary
stream, the alarm at the first check after a planted shift, and back to Stable after it."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine.drift import DRIFT, STABLE, WARMING, DriftDetector

W, EVERY, D = 128, 16, 4


def warmed(seed: int = 0, **kw) -> tuple[DriftDetector, np.random.Generator]:
    rng = np.random.default_rng(seed)
    det = DriftDetector(W, every=EVERY, **kw)
    assert det.observe(rng.standard_normal((W, D))) == []  # the reference
    assert det.state == WARMING and det.reference is not None
    assert det.observe(rng.standard_normal((W - 1, D))) == []  # rolling window not full
    assert det.state == WARMING
    checks = det.observe(rng.standard_normal(D))
    assert len(checks) == 1 and det.state == STABLE
    return det, rng


def test_no_alarm_over_1000_stationary_checks():
    det, rng = warmed()
    states, distances = [], []
    while det.checks < 1000:
        for c in det.observe(rng.standard_normal((EVERY * 25, D))):
            states.append(c.state)
            distances.append(c.distance)
    assert len(states) >= 999 and set(states) == {STABLE}
    assert max(distances) < det.threshold
    assert det.observations == 2 * W + EVERY * (len(states))


@pytest.mark.parametrize("shift", [2.0, 4.0])
def test_alarm_within_one_check_period_of_a_planted_shift(shift):
    det, rng = warmed(seed=1)
    for _ in range(5):  # a few stable checks first
        assert det.observe(rng.standard_normal((EVERY, D)))[0].state == STABLE
    # the shift starts right after a check: the next check (16 observations later) sees it
    checks = det.observe(rng.standard_normal((EVERY, D)) + shift)
    assert len(checks) == 1 and checks[0].state == DRIFT and det.alarm
    assert checks[0].distance > checks[0].threshold
    # it stays raised while the stream stays shifted, and clears once the window is
    # back to the reference's distribution
    assert all(c.state == DRIFT for c in det.observe(rng.standard_normal((4 * EVERY, D)) + shift))
    det.observe(rng.standard_normal((2 * W, D)))
    assert det.state == STABLE and not det.alarm


def test_a_shift_mid_period_alarms_by_the_next_check():
    det, rng = warmed(seed=2)
    det.observe(rng.standard_normal((EVERY - 5, D)))  # 5 before the next check
    checks = det.observe(rng.standard_normal((EVERY + 5, D)) + 4.0)
    assert [c.state for c in checks][-1] == DRIFT


def test_given_threshold_and_epsilon_are_used():
    rng = np.random.default_rng(3)
    det = DriftDetector(W, threshold=1e9, epsilon=0.5)
    det.observe(rng.standard_normal((2 * W, D)))
    check = det.observe(rng.standard_normal((EVERY, D)) + 10.0)[0]
    assert check.threshold == 1e9 and det.epsilon == 0.5 and check.state == STABLE
    snap = det.snapshot()
    assert snap["distance"] == check.distance and snap["state"] == STABLE
    assert snap["checks"] == 2 and snap["observations"] == 2 * W + EVERY


def test_bad_arguments():
    for window in (127, 4097, 200.0):
        with pytest.raises(ValueError, match=r"window = .* must be an integer in 128\.\.4096"):
            DriftDetector(window)
    with pytest.raises(ValueError, match="every"):
        DriftDetector(W, every=0)
    with pytest.raises(ValueError, match="threshold"):
        DriftDetector(W, threshold=-1.0)
    det = DriftDetector(W)
    det.observe(np.zeros((3, D)))
    with pytest.raises(ValueError, match="width 5 do not match"):
        det.observe(np.zeros(5))
    with pytest.raises(ValueError, match="finite"):
        det.observe(np.full(D, np.nan))
    with pytest.raises(RuntimeError, match="warming"):
        det.check()
