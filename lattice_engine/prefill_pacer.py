"""`PrefillPacer`: how many prompt tokens a mixed step may prefill while requests decode,
so their inter-token latency rises by at most a set factor, and how long a prefill-only
step may run (so a short request waiting behind a long prompt is admitted soon)."""

from __future__ import annotations

import statistics
from collections import deque
from typing import Optional


class PrefillPacer:
    """Sizes the prefill slice of mixed steps so the decoders' inter-token latency rises by
    at most `max_rise`: from measured steps it keeps an estimate of a decode-only step
    (t_decode) and of the cost of one more row in a step (per_token), and allows
    (max_rise - 1) * t_decode / per_token prefill tokens. Timing noise only changes chunk
    sizes, never results.

    A step's cost grows with its rows, decode or prefill alike (every matmul has M = rows):
    26 ms for one decoding row, 45 ms for eight on Qwen2.5-0.5B q8_0. So decode-only steps
    are kept per row count (the median of the last few: a server's step can be slowed once
    by its event loop, 88 ms against 47 when a 2,000-token request arrived, and an average
    would carry that through the whole prefill that follows, when no decode-only step
    updates it: measured, it let the latency rise 2.5x instead of 2x). A row count never
    seen decode-only (streams join while others still prefill, so every step is mixed) is
    estimated from the nearest one seen plus per_token per extra row; charging those rows
    to the prefill slice instead shrank it to one token a step. per_token is a running
    average because it moves steadily (attention over a longer prefix costs more per token:
    2.3 -> 7 ms over a 2,000-token prompt), quicker to follow a rise than a fall (a lag
    behind a rise overshoots every step). Until a mixed step has been measured the slice is
    at most PROBE tokens."""

    SMOOTHING = 0.3
    RISING = 0.7
    WINDOW = 9   # decode-only steps kept per row count
    PROBE = 16

    PREFILL_PROBE = 64   # a prefill-only step before one has been measured
    MIN_PREFILL = 16     # never smaller: a step has fixed costs too

    def __init__(self, max_rise: float, cap: int, prefill_seconds: float = 0.0,
                 prefill_cap: int = 512):
        self.max_rise, self.cap = max_rise, cap
        self._decode: dict[int, deque] = {}
        self.rows = 0  # decoding rows in the latest step: the next step's likely count
        self.per_token: Optional[float] = None
        self.prefill_seconds, self.prefill_cap = prefill_seconds, prefill_cap
        self.prefill_per_token: Optional[float] = None  # seconds per token, prefill alone

    def _measured(self, rows: int) -> tuple[int, float]:
        """The measured row count nearest `rows` and its median decode-only step."""
        near = min(self._decode, key=lambda r: (abs(r - rows), -r))
        return near, statistics.median(self._decode[near])

    def decode_time(self, rows: int) -> Optional[float]:
        """Estimated decode-only step for `rows` decoding rows (None before any)."""
        if not self._decode:
            return None
        near, t = self._measured(rows)
        if near == rows or not self.per_token:
            return t
        return max(t + (rows - near) * self.per_token, 0.5 * t)

    def step_time(self, rows: int) -> Optional[float]:
        """The cost of a step of `rows` rows through the model, for speculative decoding's
        plan, whose verify steps add row counts far above the decoders': the measured one,
        else a line through the measured counts around it, else `decode_time`."""
        if not self._decode:
            return None
        below = [r for r in self._decode if r <= rows]
        above = [r for r in self._decode if r >= rows]
        if below and above:
            lo, hi = max(below), min(above)
            t_lo, t_hi = (statistics.median(self._decode[r]) for r in (lo, hi))
            return t_lo if hi == lo else t_lo + (t_hi - t_lo) * (rows - lo) / (hi - lo)
        return self.decode_time(rows)

    def has_measured_near(self, rows: int) -> bool:
        """Whether a decode-only step of about `rows` rows (within a quarter) was measured:
        speculative decoding compares against it, and a batch that always speculates never
        measures it otherwise."""
        return any(abs(r - rows) <= max(1, rows // 4) for r in self._decode)

    @property
    def t_decode(self) -> Optional[float]:
        return self.decode_time(self.rows)

    def _ema(self, old: Optional[float], new: float) -> float:
        return new if old is None else old + self.SMOOTHING * (new - old)

    def _track(self, old: Optional[float], new: float) -> float:
        """A running estimate that follows a rising cost quickly and a falling one slowly:
        an estimate lagging a rise lets every step overshoot the target."""
        if old is not None and new > old:
            return old + self.RISING * (new - old)
        return self._ema(old, new)

    def record(self, decode_rows: int, prefill_rows: int, seconds: float) -> None:
        if not decode_rows:
            if prefill_rows:  # attention makes a token dearer as the prompt grows: track it
                self.prefill_per_token = self._track(self.prefill_per_token,
                                                     seconds / prefill_rows)
            return
        self.rows = decode_rows
        if not prefill_rows:
            self._decode.setdefault(decode_rows, deque(maxlen=self.WINDOW)).append(seconds)
        elif self._decode:
            near, base = self._measured(decode_rows)
            extra_rows = prefill_rows + decode_rows - near
            if extra_rows > 0:
                self.per_token = self._track(self.per_token,
                                             max(seconds - base, 0.0) / extra_rows)

    def prefill_budget(self) -> int:
        """Tokens for a step with no decoders: as many as take about prefill_seconds, so
        a request arriving during a long prefill waits at most about that long for the
        step in flight (a whole 512-token step took 6 s late in an 8,000-token prompt on
        SmolLM2 with 2 busy cores). Attention over the prefix costs the same however it
        is chunked, so smaller steps cost little throughput."""
        if not self.prefill_seconds:
            return self.prefill_cap
        if self.prefill_per_token is None:
            return min(self.prefill_cap, self.PREFILL_PROBE)
        allowed = int(self.prefill_seconds / max(self.prefill_per_token, 1e-9))
        return max(min(self.MIN_PREFILL, self.prefill_cap), min(self.prefill_cap, allowed))

    def budget(self) -> int:
        if not self.max_rise:
            return self.cap
        t_decode = self.t_decode
        if t_decode is None or not self.per_token:
            return min(self.cap, self.PROBE)
        allowed = (self.max_rise - 1.0) * t_decode / self.per_token
        return max(1, min(self.cap, int(allowed)))
