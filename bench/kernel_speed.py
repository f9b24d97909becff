"""Micro-bench of the native matvec kernels against the machine's read bandwidth.

Decode is a matvec per weight matrix, bound by how fast the weights stream from memory,
so each kernel is reported in GB/s of weight bytes read and as a fraction of a plain
streaming read of a 1 GiB buffer with the same threads (`bw`; `bw+pf` is the same read
with software prefetch). Weights are cycled through enough copies (>= --working-set
bytes, in one huge-page-aligned buffer) that every call reads from DRAM, as in decode of
a model larger than the cache; `hot` repeats one matrix (cache resident when it fits).

Prefill is a matmul of M (default 512) activation rows against each weight matrix,
bound by arithmetic: reported in GFLOP/s (2 M N K per call), the weights hot in cache.

    python bench/kernel_speed.py [--threads 2] [--repeats 5] [--prefill-m 512] [--no-matvec]
    python bench/kernel_speed.py --no-matvec --prefill-m 1,8,16,512 --shapes 896x4864,4864x896,896x896 \
        --formats q8_0,q4_sym_g32,q4_asym_g32     # plugin formats: any registered name

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lattice_engine import kernels  # noqa: E402
from lattice_engine.quant.core_formats import F16, Q8_0, Q8_0_R16  # noqa: E402
from lattice_engine.quant.formats import PackedMatrix, pack  # noqa: E402
from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

SHAPES = [(896, 4864), (4864, 896), (151936, 896)]  # [N x K]: down, gate/up, lm_head of a 0.5B
FORMATS = [F16, Q8_0, Q8_0_R16]


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def read_bandwidth(nbytes: int, repeats: int) -> tuple[float, float]:
    """GB/s of a plain streaming sum, and of the same sum with software prefetch (the
    better probe of what the memory system can deliver); medians of `repeats`."""
    buf = np.ones(nbytes // 4, dtype=np.float32)
    kernels.bench_read(buf)  # fault the pages in
    plain, pf = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernels.bench_read(buf)
        t1 = time.perf_counter()
        kernels.bench_read(buf, prefetch=True)
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        pf.append(t2 - t1)
    del buf
    return nbytes / float(np.median(plain)) / 1e9, nbytes / float(np.median(pf)) / 1e9


def make_copies(fmt, n: int, k: int, working_set: int, rng) -> list[PackedMatrix]:
    """Copies of one [n x k] matrix, enough to cover `working_set` bytes, carved from one
    2 MiB-aligned buffer so the kernel reads huge-page-backed memory, as an engine that
    loads its weights into one arena would (separate 4-5 MB arrays measured ~20% slower
    for q8_0 [4864 x 896]: TLB misses, not the kernel)."""
    # quantize a small block of rows once and tile it: contents do not matter for speed
    base_rows = min(n, 4096)
    src = pack(fmt, "bench", rng.standard_normal((base_rows, k)).astype(np.float32) * 0.05)
    reps = -(-n // base_rows)
    one = np.ascontiguousarray(np.tile(src.data, (reps, 1))[:n])
    copies = max(1, -(-working_set // one.nbytes))
    huge = 2 << 20
    arena = np.empty(copies * one.nbytes + huge, dtype=np.uint8)
    start = (-arena.ctypes.data) % huge
    mats = []
    for i in range(copies):
        view = arena[start + i * one.nbytes: start + (i + 1) * one.nbytes].reshape(one.shape)
        view[...] = one
        mats.append(PackedMatrix(fmt, n, k, view))
    return mats


def time_matvec(mats: list[PackedMatrix], x: np.ndarray, out: np.ndarray, min_time: float) -> float:
    """Median seconds per call, cycling through `mats`."""
    for w in mats[:2]:
        kernels.matmul(x, w, out=out)
    times = []
    t_end = time.perf_counter() + min_time
    i = 0
    while time.perf_counter() < t_end or len(times) < 2 * len(mats) or len(times) < 20:
        w = mats[i % len(mats)]
        t0 = time.perf_counter()
        kernels.matmul(x, w, out=out)
        times.append(time.perf_counter() - t0)
        i += 1
        if len(times) > 20000:
            break
    return float(np.median(times))


# Clock of the prefill table: wall time, or with --cpu-time (one thread only) the calling
# thread's CPU time, which other jobs on a shared machine do not inflate: a call longer
# than a scheduler slice is preempted by them, and its wall time with it.
CLOCK = time.perf_counter


def time_prefill(w: PackedMatrix, x: np.ndarray, out: np.ndarray, min_time: float) -> float:
    """Median seconds per prefill call (one matrix, so its weights are cache-warm)."""
    kernels.matmul(x, w, out=out)
    times = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = CLOCK()
        kernels.matmul(x, w, out=out)
        times.append(CLOCK() - t0)
    return float(np.median(times))


def registered_formats(names: list[str]) -> list:
    """The formats called `names`: the core's, or any a plugin registers (e.g. the
    lattice-quant-q4 plugin's q4_sym_g32); an unknown name is an error naming the known."""
    from lattice_engine.plugins import get_plugin_manager
    registry = get_plugin_manager().registry
    known = registry.names("weight_formats")
    missing = [n for n in names if n not in known]
    if missing:
        raise SystemExit(f"unknown weight format(s) {missing}; registered: {sorted(known)}")
    return [registry.get("weight_formats", n) for n in names]


def prefill_table(ms: list[int], min_time: float, rng, formats, shapes) -> list[dict]:
    head = f"{'format':<6} {'shape [N x K]':<15} {'M':>5} {'ms/call':>9} {'GFLOP/s':>8}"
    print(head)
    print("-" * len(head))
    results = []
    for fmt in formats:
        for n, k in shapes:
            w = make_copies(fmt, n, k, 0, rng)[0]
            for m in ms:
                x = rng.standard_normal((m, k)).astype(np.float32)
                out = np.empty((m, n), dtype=np.float32)
                t = time_prefill(w, x, out, min_time)
                gflops = 2.0 * m * n * k / t / 1e9
                print(f"{fmt.name:<6} {f'{n} x {k}':<15} {m:5d} {t * 1e3:9.3f} {gflops:8.1f}")
                results.append({"format": fmt.name, "shape": [n, k], "m": m,
                                "ms_per_call": round(t * 1e3, 4), "gflops": round(gflops, 2)})
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the bandwidth probe")
    ap.add_argument("--bw-bytes", type=int, default=1 << 30, help="bandwidth probe buffer size")
    ap.add_argument("--working-set", type=int, default=1 << 30,
                    help="bytes of weight copies cycled per shape (defeats the cache)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--prefill-m", default="512",
                    help="x rows for the prefill table, comma-separated (0: skip)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES),
                    help="comma-separated N x K weight shapes, e.g. 896x4864,4864x896")
    ap.add_argument("--no-matvec", action="store_true", help="skip the matvec (bandwidth) table")
    ap.add_argument("--cpu-time", action="store_true",
                    help="prefill table in the calling thread's CPU time (needs --threads 1)")
    ap.add_argument("--formats", default=",".join(f.name for f in FORMATS),
                    help="comma-separated weight formats to measure (any registered name)")
    add_results_option(ap)
    args = ap.parse_args()

    if args.cpu_time:
        if args.threads != 1:
            raise SystemExit("--cpu-time measures the calling thread only: use --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    formats = registered_formats(args.formats.split(","))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.prefill_m.split(",") if int(v) > 0]
    if not kernels.available():
        print("native kernels are not built; run `pip install -e . --no-build-isolation`")
        return 1
    kernels.set_threads(args.threads)
    rng = np.random.default_rng(0)
    load0 = load_average()
    # the bandwidth probe only matters for the matvec table
    bw, bw_pf = read_bandwidth(args.bw_bytes, args.repeats) if not args.no_matvec else (0.0, 0.0)
    try:  # which q8_0 kernel runs at the AVX2 level (avx2 / avxvnni / avx512vnni)
        q8 = kernels.q8_variant() if kernels.isa() == "avx2" else "-"
    except AttributeError:  # a build from before the variants
        q8 = "?"
    print(f"isa={kernels.isa()} q8_0 kernel={q8} threads={kernels.threads()} load_avg_1m={load0:.2f}")
    print(f"read bandwidth, streaming sum of {args.bw_bytes / 2**30:.2f} GiB:  {bw:6.2f} GB/s  (bw)")
    print(f"  the same with software prefetch:           {bw_pf:6.2f} GB/s  (bw+pf)")
    print()
    head = (f"{'format':<6} {'shape [N x K]':<15} {'MB':>7} {'us/call':>9} {'GB/s':>7} {'of bw':>6} "
            f"{'of bw+pf':>8} {'hot GB/s':>9}")
    print(head)
    print("-" * len(head))
    results = []
    for fmt in formats if not args.no_matvec else ():
        for n, k in shapes:
            mats = make_copies(fmt, n, k, args.working_set, rng)
            x = rng.standard_normal((1, k)).astype(np.float32)
            out = np.empty((1, n), dtype=np.float32)
            nbytes = mats[0].nbytes
            t_cold = time_matvec(mats, x, out, args.min_time)
            t_hot = time_matvec(mats[:1], x, out, args.min_time / 2)
            gbs, hot = nbytes / t_cold / 1e9, nbytes / t_hot / 1e9
            print(f"{fmt.name:<6} {f'{n} x {k}':<15} {nbytes / 1e6:7.2f} {t_cold * 1e6:9.1f} "
                  f"{gbs:7.2f} {gbs / bw:6.0%} {gbs / bw_pf:8.0%} {hot:9.2f}")
            results.append({"format": fmt.name, "shape": [n, k], "bytes": nbytes,
                            "us_per_call": round(t_cold * 1e6, 2), "gbs": round(gbs, 3),
                            "frac_of_bw": round(gbs / bw, 4), "frac_of_bw_pf": round(gbs / bw_pf, 4),
                            "hot_gbs": round(hot, 3)})
            del mats
    print()
    prefill = prefill_table(ms, args.min_time, rng, formats, shapes) if ms else []
    print()
    emit({"isa": kernels.isa(), "q8_variant": q8, "threads": kernels.threads(),
          "clock": "thread cpu" if args.cpu_time else "wall",
          "read_bw_gbs": round(bw, 3), "read_bw_prefetch_gbs": round(bw_pf, 3),
          "load_avg_1m": round(load0, 2),
          "load_avg_1m_end": round(load_average(), 2), "matvec": results,
          "prefill": prefill}, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
