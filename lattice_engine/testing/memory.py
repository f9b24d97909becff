"""Measuring what a piece of code allocates, for tests that bound memory (not time).

- `traced_peak(fn)`: the peak of Python and numpy heap allocations while `fn` runs
  (tracemalloc; numpy reports its array buffers to it). Deterministic: it counts bytes
  asked for, not pages the kernel happened to keep.
- `rss_peak_growth(fn)`: how far the process's peak resident set rose above where it
  stood before `fn` (Linux: the high-water mark is reset through /proc/self/clear_refs).
  Unlike tracemalloc it sees memory maps and anonymous regions (a memory-mapped file's
  pages once touched, huge-page buffers), which is where a whole-tensor copy made with
  `mmap` would hide. None where the kernel does not offer it.
"""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Optional

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """(fn(), peak bytes traced by tracemalloc above the level at the start)."""
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return result, peak


def _status_kb(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_rss_peak() -> bool:
    """Reset the high-water mark (VmHWM) to the current RSS; False where unsupported."""
    try:
        _status_kb("VmHWM")
        _CLEAR_REFS.write_text("5")
        return True
    except (OSError, KeyError, ValueError):
        return False


def rss_peak_growth(fn: Callable[[], Any]) -> tuple[Any, Optional[int]]:
    """(fn(), bytes by which the peak RSS during fn exceeded the RSS before it), or
    (fn(), None) when /proc/self/clear_refs cannot reset the high-water mark."""
    gc.collect()
    if not reset_rss_peak():
        return fn(), None
    before = _status_kb("VmRSS")
    result = fn()
    return result, (_status_kb("VmHWM") - before) * 1024
