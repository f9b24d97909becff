"""Memory-bandwidth probes: `bench_read` streams a buffer once with the kernels' threads,
`measure_read_bandwidth` turns that into GB/s (the roofline's numerator in the benches).
"""

from __future__ import annotations

import numpy as np

from .runtime import _L, _fb

def measure_read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5,
                           prefetch: bool = False) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): the median of `repeats` streaming sums of a
    `nbytes` buffer with the current threads (the roofline's numerator)."""
    import time

    buf = np.ones(max(nbytes, 32) // 4, dtype=np.float32)
    bench_read(buf, prefetch)  # fault the pages in
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bench_read(buf, prefetch)
        times.append(time.perf_counter() - t0)
    return buf.nbytes / float(np.median(times)) / 1e9


def bench_read(buf: np.ndarray, prefetch: bool = False) -> float:
    """Stream `buf` once with all threads (a read-bandwidth probe), optionally with software
    prefetch; returns its float sum."""
    b = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    return float(_L.lk_bench_read(_fb(b), b.size, 1 if prefetch else 0))
