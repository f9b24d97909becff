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
_TOL = 1e-9  # marginal violation (L1) at which each Sinkhorn solve stops


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
        self._lock = threading.Lock()

    @property
    def alarm(self) -> bool:
        return self.state == DRIFT

    def observe(self, vectors) -> list[DriftCheck]:
        """Add one vector [d] or several [k, d]; returns the checks this ran (usually
        none, one every `every` observations once warm). Thread-safe."""
        v = np.asarray(vectors, dtype=np.float64)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[0] == 0:
            raise ValueError(f"observe takes a vector [d] or vectors [k, d], got {v.shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("observed vectors must be finite")
        with self._lock:
            d = self._dim()
            if d is not None and v.shape[1] != d:
                raise ValueError(f"vectors of width {v.shape[1]} do not match the reference's "
                                 f"{d}")
            checks = []
            for row in v:
                check = self._observe_one(row)
                if check is not None:
                    checks.append(check)
            return checks

    def _dim(self) -> Optional[int]:
        if self.reference is not None:
            return self.reference.shape[1]
        return self._reference[0].size if self._reference else None

    def _observe_one(self, row: np.ndarray) -> Optional[DriftCheck]:
        self.observations += 1
        if self.reference is None:
            self._reference.append(row)
            if len(self._reference) == self.window:
                self._freeze()
            return None
        self._recent[self._head] = row
        self._head = (self._head + 1) % self.window
        self._filled = min(self._filled + 1, self.window)
        self._since_check += 1
        if self._filled < self.window or self._since_check < self.every:
            return None
        self._since_check = 0
        return self.check()

    def _freeze(self) -> None:
        ref = np.stack(self._reference)
        self._reference = []
        self.reference = ref
        self._recent = np.empty_like(ref)
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

    def check(self) -> DriftCheck:
        """Compare the rolling window with the reference now (it must be full)."""
        if self.reference is None or self._filled < self.window:
            raise RuntimeError("the detector is still warming: no full window to compare")
        recent = self._recent
        w = np.full(self.window, 1.0 / self.window)
        if self._ref_self is None:  # OT(ref, ref) never changes: solved once
            self._ref_self = sinkhorn(w, w, sqeuclidean(self.reference, self.reference),
                                      self.epsilon, tol=_TOL).value
        xy = sinkhorn(w, w, sqeuclidean(self.reference, recent), self.epsilon, tol=_TOL).value
        yy = sinkhorn(w, w, sqeuclidean(recent, recent), self.epsilon, tol=_TOL).value
        distance = xy - 0.5 * (self._ref_self + yy)
        self.state = DRIFT if distance > self.threshold else STABLE
        self.checks += 1
        self.last = DriftCheck(distance, float(self.threshold), self.state, self.observations)
        return self.last

    def snapshot(self) -> dict:
        """State for /metrics: state, distance, threshold, observations, checks."""
        with self._lock:
            last = self.last
            return {"state": self.state, "alarm": self.alarm, "observations": self.observations,
                    "checks": self.checks,
                    "distance": None if last is None else last.distance,
                    "threshold": self.threshold, "epsilon": self.epsilon}
