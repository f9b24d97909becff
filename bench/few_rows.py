"""Micro-bench of the few-rows matmul path (batched decode): time of y = x @ W^T for
M = 1..8 x rows against one weight matrix kept hot in cache, per format and shape
(fastest of --repeats timed loops: the machine is shared).

Batched decode of M streams runs every weight matrix once with M rows of x; this shows
what an extra stream costs in the kernel (ideal: close to nothing while the weights
stream from memory).

    python bench/few_rows.py [--threads 2] [--formats q8_0,q8_0_r16,f16,f32] [--m 1,2,4,8] [--cpu]

Prints a table (ms per call, and the ratio to M = 1), then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lattice_engine import kernels  # noqa: E402
from lattice_engine.quant.core_formats import CORE_FORMATS, Q8_0, native_layout  # noqa: E402
from lattice_engine.quant.formats import pack  # noqa: E402
from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

SHAPES = [(4864, 896), (896, 4864)]  # [N x K]: gate/up and down of Qwen2.5-0.5B


def time_call(x, w, repeats: int, inner: int, clock) -> float:
    out = np.empty((x.shape[0], w.rows), np.float32)
    kernels.matmul(x, w, out)
    runs = []
    for _ in range(repeats):
        t0 = clock()
        for _ in range(inner):
            kernels.matmul(x, w, out)
        runs.append((clock() - t0) / inner)
    return float(min(runs))  # the least disturbed run (the machine is shared)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--formats", default="q8_0,f16,f32")
    p.add_argument("--m", default="1,2,3,4,5,6,7,8")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--cpu", action="store_true",
                   help="with --threads 1: time the thread's CPU time, not wall time (less "
                        "disturbed by other jobs on the cores)")
    add_results_option(p)
    args = p.parse_args(argv)
    if args.cpu and args.threads != 1:
        p.error("--cpu needs --threads 1 (worker threads' time is not the caller's)")
    clock = time.thread_time if args.cpu else time.perf_counter
    kernels.set_threads(args.threads)
    fmts = {f.name: f for f in CORE_FORMATS}
    ms = [int(m) for m in args.m.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    print(f"isa {kernels.isa()}, q8_0 {kernels.q8_variant()}, threads {args.threads}, "
          f"{'thread CPU' if args.cpu else 'wall'} time, load {os.getloadavg()[0]:.2f}")
    for name in args.formats.split(","):
        for n, k in SHAPES:
            wf = rng.standard_normal((n, k)).astype(np.float32)
            # q8_0_r16 is a layout of q8_0's blocks: quantize, then re-lay
            w = native_layout(pack(Q8_0, "w", wf), force=True) if name == "q8_0_r16" \
                else pack(fmts[name], "w", wf)
            t = {}
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                t[m] = time_call(x, w, args.repeats, args.inner, clock)
            base = t[ms[0]]
            print(f"{name:5s} {n:5d}x{k:<5d} " + "  ".join(
                f"M={m} {1e3 * v:.3f} ms ({v / base:.2f}x)" for m, v in t.items()))
            rows.append({"format": name, "N": n, "K": k,
                         "ms": {m: round(1e3 * v, 4) for m, v in t.items()}})
    emit({"threads": args.threads, "q8_variant": kernels.q8_variant(),
          "clock": "thread CPU" if args.cpu else "wall",
          "load_avg": os.getloadavg()[0], "rows": rows}, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
