"""Online drift detection over a stream of vectors (embeddings of incoming prompts), as the
seed's transport crate does it: the first `window` observations are frozen as the
reference; after that a rolling window holds the latest `window` observations, and every
`every` observations (16) the debiased Sinkhorn divergence (`transport.sinkhorn_divergence`)
between the reference and the rolling window is compared with a threshold.

States: Warming (the reference or the first rolling window is not full yet), Stable
(the last check was under the threshold), Drift (over it: the alarm).

The threshold is given, or calibrated from the reference when it freezes: the reference
is split at random into halves `calibration` times and the divergence between the halves
measured; the threshold is `margin` times the largest of them. Two halves of W / 2 points
differ more, by sampling alone, than two windows of W points from one distribution (the
divergence between samples shrinks as they grow), so the calibrated threshold sits above
what stationary windows reach. Epsilon defaults to `blur` times the mean cost between
reference points (the cost's scale), so the detector needs no tuning per embedding model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .transport import sinkhorn, sinkhorn_divergence, sqeuclidean

WARMING, STABLE, DRIFT = "warming", "stable", "drift"
MIN_WINDOW, MAX_WINDOW = 128, 4096
# the marginal violation (L1) at which each Sinkhorn solve stops: the divergence is then
# off by about epsilon x 1e-4, far below the calibrated threshold's scale (the solver
# itself is checked to 1e-6 against POT in tests/test_transport.py)
_TOL = 1e-4


@dataclass(frozen=True)
class DriftCheck:
    """One check: the divergence, the threshold it was compared with, the state after it,
    and how many observations had been seen."""

    distance: float
    threshold: float
    state: str
    observations: int


class DriftDetector:
    """Feed vectors with `observe`; read `state`, `last` (the last DriftCheck), `alarm`."""

    def __init__(self, window: int = 256, *, every: int = 16, threshold: Optional[float] = None,
                 epsilon: Optional[float] = None, blur: float = 0.05, margin: float = 1.5,
                 calibration: int = 8, seed: int = 0):
        if not (isinstance(window, int) and MIN_WINDOW <= window <= MAX_WINDOW):
            raise ValueError(f"window = {window!r} must be an integer in {MIN_WINDOW}.."
                             f"{MAX_WINDOW} (observations frozen as the reference)")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every = {every!r} must be an integer >= 1")
        if threshold is not None and not threshold > 0:
            raise ValueError(f"threshold = {threshold!r} must be > 0 (or None to calibrate)")
        if epsilon is not None and not epsilon > 0:
            raise ValueError(f"epsilon = {epsilon!r} must be > 0 (or None: blur x cost scale)")
        self.window, self.every = window, every
        self.threshold = threshold
        self.epsilon = epsilon
        self.blur, self.margin, self.calibration = blur, margin, calibration
        self._rng = np.random.default_rng(seed)
        self._reference: list[np.ndarray] = []
        self.reference: Optional[np.ndarray] = None
        self._recent: Optional[np.ndarray] = None  # ring buffer [window, d]
        self._filled = 0
        self._head = 0
        self.observations = 0
        self._since_check = 0
        self.state = WARMING
        self.last: Optional[DriftCheck] = None
        self.checks = 0
        self._ref_self: Optional[float] = None
        self._warm = None  # (observations, f_xy, g_xy, f_yy) of the last check
        self._lock = threading.Lock()        # the windows and the published state
        self._check_lock = threading.Lock()  # one Sinkhorn check at a time

    @property
    def alarm(self) -> bool:
        return self.state == DRIFT

    def observe(self, vectors) -> list[DriftCheck]:
        """Add one vector [d] or several [k, d]; returns the checks this ran (usually
        none, one every `every` observations once warm). Thread-safe: the windows are
        updated under a short lock and each due check gets a copy of the rolling window
        as it was at its observation; the Sinkhorn solves run outside that lock (one at a
        time), so `snapshot` (/metrics) never waits for them."""
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"observe takes a vector [d] or vectors [k, d], got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("observed vectors must be finite")
        due = []
        with self._lock:
            d = self._dim()
            if d is not None and v.shape[1] != d:
                raise ValueError(f"vectors of width {v.shape[1]} do not match the reference's "
                                 f"{d}")
            for row in v:
                window = self._observe_one(row)
                if window is not None:
                    due.append((window, self.observations))
        return [self._run_check(window, seen) for window, seen in due]

    def _dim(self) -> Optional[int]:
        if self.reference is not None:
            return self.reference.shape[1]
        return self._reference[0].size if self._reference else None

    def _observe_one(self, row: np.ndarray) -> Optional[np.ndarray]:
        """Add a row; the rolling window (a copy, oldest first) when a check is due."""
        self.observations += 1
        if self.reference is None:
            self._reference.append(row)
            if len(self._reference) == self.window:
                self.reference = np.stack(self._reference)
                self._reference = []
                self._recent = np.empty_like(self.reference)
            return None
        self._recent[self._head] = row
        self._head = (self._head + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        self._since_check += 1
        if self._filled < self.window or self._since_check < self.every:
            return None
        self._since_check = 0
        return np.roll(self._recent, -self._head, axis=0)

    def _calibrate(self) -> None:
        """epsilon, threshold and OT(ref, ref) from the frozen reference (once; under
        the check lock)."""
        ref = self.reference
        w = np.full(self.window, 1.0 / self.window)
        if self.epsilon is None:
            cost = sqeuclidean(ref, ref)
            scale = float(cost.sum() / max(cost.size - len(ref), 1))
            self.epsilon = self.blur * scale if scale > 0 else 1e-3
        if self.threshold is None:
            half = self.window // 2
            null = []
            for _ in range(self.calibration):
                perm = self._rng.permutation(self.window)
                null.append(sinkhorn_divergence(ref[perm[:half]], ref[perm[half:2 * half]],
                                                self.epsilon, tol=_TOL))
            self.threshold = self.margin * max(max(null), 1e-12)
        if self._ref_self is None:  # OT(ref, ref) never changes: solved once
            self._ref_self = sinkhorn(w, w, sqeuclidean(ref, ref), self.epsilon, tol=_TOL,
                                      symmetric=True).value

    def _warm_start(self, seen: int, cost_xy: np.ndarray):
        """Potentials of the last check moved to this window (which dropped its `shift`
        oldest points and appended as many new ones), or None. New points get the
        c-transform of the reference potentials (xy) / the kept points' mean (yy)."""
        if self._warm is None:
            return None, None
        last_seen, f_xy, g_xy, f_yy = self._warm
        shift = seen - last_seen
        if not 0 < shift < self.window:
            return None, None
        log_w = -np.log(self.window)
        eps = self.epsilon
        new = cost_xy[:, self.window - shift:]
        z = log_w + (f_xy[:, None] - new) / eps
        top = z.max(axis=0)
        g_new = -eps * (np.log(np.exp(z - top).sum(axis=0)) + top)
        g = np.concatenate([g_xy[shift:], g_new])
        f_self = np.concatenate([f_yy[shift:], np.full(shift, f_yy[shift:].mean())])
        return (f_xy, g), (f_self, f_self)

    def _run_check(self, recent: np.ndarray, seen: int) -> DriftCheck:
        with self._check_lock:
            self._calibrate()
            w = np.full(self.window, 1.0 / self.window)
            cost_xy = sqeuclidean(self.reference, recent)
            init_xy, init_yy = self._warm_start(seen, cost_xy)
            xy = sinkhorn(w, w, cost_xy, self.epsilon, tol=_TOL, init=init_xy)
            yy = sinkhorn(w, w, sqeuclidean(recent, recent), self.epsilon, tol=_TOL,
                          symmetric=True, init=init_yy)
            self._warm = (seen, xy.f, xy.g, yy.f)
            distance = xy.value - 0.5 * (self._ref_self + yy.value)
            state = DRIFT if distance > self.threshold else STABLE
            check = DriftCheck(float(distance), float(self.threshold), state, seen)
            with self._lock:
                if self.last is None or seen >= self.last.observations:
                    self.state, self.last = state, check
                self.checks += 1
            return check

    def check(self) -> DriftCheck:
        """Compare the rolling window with the reference now (it must be full)."""
        with self._lock:
            if self.reference is None or self._filled < self.window:
                raise RuntimeError("the detector is still warming: no full window to compare")
            window, seen = np.roll(self._recent, -self._head, axis=0), self.observations
        return self._run_check(window, seen)

    def snapshot(self) -> dict:
        """State for /metrics: state, distance, threshold, observations, checks (never
        waits for a check in progress)."""
        with self._lock:
            last = self.last
            return {"state": self.state, "alarm": self.alarm, "observations": self.observations,
                    "checks": self.checks,
                    "distance": None if last is None else last.distance,
                    "threshold": None if last is None else last.threshold,
                    "epsilon": self.epsilon}
