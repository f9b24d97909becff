"""A/B of the 4-bit weight layouts: the plain GGUF-compatible blocks (q4_sym_g32, ...)
against their _r16 twins (16 rows interleaved, converted at load; lattice-quant-q4), with
q8_0 / q8_0_r16 as the peer, in the same process and interleaved round by round (the
machine may be shared: each figure is the fastest of --rounds, the ratios are per round).

    python bench/q4_layout.py [--threads 2] [--m 1,4,8,16,512] [--isa avx512vnni,avx2]
                              [--families q4_sym,q4_asym] [--group 32] [--cpu]

Per ISA variant of the q4 kernels, family, shape [N x K] and M: us per call of
y = x[M, K] @ W^T with the plain layout, with _r16, their ratio, and q8_0 in the layout the
core runs (its fastest of q8_0 / q8_0_r16) for M = 1. The weights are hot in cache (one
matrix): this measures the kernels' arithmetic, which is what the layout changes; decode
of a whole model (bench/quant_quality.py speed, bench/decode.py) adds the memory stream.
Prints a table, then one JSON line (bench/provenance.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lattice_engine import kernels  # noqa: E402
from lattice_engine.quant.core_formats import Q8_0, Q8_0_R16, r16_pays  # noqa: E402
from lattice_engine.quant.formats import pack  # noqa: E402
from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

SHAPES = [(4864, 896), (896, 4864), (896, 896)]  # gate/up, down, o of Qwen2.5-0.5B


def per_call(fn, inner: int, clock) -> float:
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--m", default="1,4,8,16,512")
    p.add_argument("--isa", default="", help="q4 kernel variants (default: the best one)")
    p.add_argument("--families", default="q4_sym,q4_asym")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.05, help="seconds per timed loop")
    p.add_argument("--cpu", action="store_true",
                   help="with --threads 1: the thread's CPU time, not wall time")
    add_results_option(p)
    args = p.parse_args(argv)
    if args.cpu and args.threads != 1:
        p.error("--cpu needs --threads 1 (worker threads' time is not the caller's)")
    try:
        from lattice_quant_q4 import formats as F, kernels as K
    except ImportError as exc:
        raise SystemExit(f"lattice-quant-q4 is not installed ({exc}): "
                         f"pip install -e ./plugins/quant_q4")
    if not (kernels.available() and K.available()):
        raise SystemExit("the native kernels are not built")
    clock = time.thread_time if args.cpu else time.perf_counter
    kernels.set_threads(args.threads)
    isas = [v for v in args.isa.split(",") if v] or [K.isa()]
    ms = [int(v) for v in args.m.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    print(f"threads {args.threads}, {'thread CPU' if args.cpu else 'wall'} time, "
          f"load {load0:.2f}, q8_0 layout {'q8_0_r16' if r16_pays() else 'q8_0'}")
    print(f"{'isa':<10} {'format':<12} {'N x K':<11} {'M':>4} {'plain us':>9} {'r16 us':>9} "
          f"{'r16 x':>6} {'q8_0 us':>8}")
    rows, start = [], K.isa()
    try:
        for n, k in shapes:
            x_all = rng.standard_normal((max(ms), k)).astype(np.float32)
            w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
            q8 = pack(Q8_0_R16 if r16_pays() and n % 16 == 0 else Q8_0, "w", w)
            for isa in isas:
                if K.set_isa(isa) != isa:
                    print(f"{isa}: not on this CPU, skipped")
                    continue
                for family in args.families.split(","):
                    plain = F.quantize(family, args.group, w)
                    r16 = K.relayout(family, args.group, plain.copy(), k, True)
                    bpb = F.bytes_per_block(family, args.group)
                    mm = K.make_matmul(family, args.group, bpb)
                    mr = K.make_matmul(family, args.group, bpb, True)
                    for m in ms:
                        x = x_all[:m]
                        if not np.array_equal(mm(x, plain), mr(x, r16)):
                            raise SystemExit(f"{isa} {family} M={m}: the layouts disagree")
                        one = per_call(lambda: mm(x, plain), 1, time.perf_counter)
                        inner = max(1, int(args.budget / max(one, 1e-6)))
                        ta, tb, tq, ratios = [], [], [], []
                        for _ in range(args.rounds):
                            a = per_call(lambda: mm(x, plain), inner, clock)
                            b = per_call(lambda: mr(x, r16), inner, clock)
                            ta.append(a)
                            tb.append(b)
                            ratios.append(a / b)
                            if m == 1:
                                tq.append(per_call(lambda: kernels.matmul(x, q8), inner, clock))
                        name = f"{family}_g{args.group}"
                        q8us = f"{min(tq) * 1e6:8.1f}" if tq else f"{'':>8}"
                        print(f"{isa:<10} {name:<12} {f'{n}x{k}':<11} {m:>4} "
                              f"{min(ta) * 1e6:9.1f} {min(tb) * 1e6:9.1f} "
                              f"{float(np.median(ratios)):6.2f} {q8us}")
                        rows.append({"isa": isa, "format": name, "N": n, "K": k, "M": m,
                                     "plain_us": round(min(ta) * 1e6, 2),
                                     "r16_us": round(min(tb) * 1e6, 2),
                                     "r16_speedup_median": round(float(np.median(ratios)), 3),
                                     "q8_0_us": round(min(tq) * 1e6, 2) if tq else None})
    finally:
        K.set_isa(start)
    emit({"threads": args.threads, "clock": "thread CPU" if args.cpu else "wall",
          "load_avg": load0, "load_avg_end": os.getloadavg()[0], "rows": rows},
         args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
