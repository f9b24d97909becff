"""A/B of the 4-bit weight layouts: the plain GGUF-compatible blocks (q4_sym_g32, ...)
against their _r16 twins (16 rows interleaved, converted at load; lattice-quant-q4), with
q8_0 / q8_0_r16 as the peer, in the same process and interleaved round by round (the
machine may be shared: each figure is the fastest of --rounds, the ratios are per round).

    python bench/q4_layout.py [--threads 2] [--m 1,4,8,16,512] [--isa avx512vnni,avx2]
                              [--families q4_sym,q4_asym] [--group 32] [--cpu]

Per ISA variant of the q4 kernels, family, shape [N x K] and M: us per call of
y = x[M, K] @ W^T with the plain layout, with _r16, their ratio, and q8_0 in the layout the
core runs (its fastest of q8_0 / q8_0_r16), on the first family's rows. The weights are hot in cache (one
matrix): this measures the kernels' arithmetic, which is what the layout changes; decode
of a whole model (bench/quant_quality.py speed, bench/decode.py) adds the memory stream.
Prints a table, then one JSON line (bench/provenance.py).

    python bench/q4_layout.py --decode [--model qwen2.5-coder-0.5b] [--rounds 3]
                              [--threads 1 --cpu]

Whole-model decode instead: the model loaded from its float32 GGUF (bench/gguf_variants.py)
as q8_0 (the core's layout), q4_sym and q4_asym each twice, plain (LATTICE_Q4_R16=0) and
_r16 (LATTICE_Q4_R16=1), all in this process; each round times every model's greedy decode
(tokens per second from the slope between two lengths, as bench/decode.py) one after the
other, so a burst of load hits all of them alike. Also the weight bytes per token.
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


def decode_ab(args) -> int:
    """--decode: the whole-model A/B (see the module docstring)."""
    import statistics

    import decode as dec  # bench/decode.py
    from gguf_variants import variant
    from lattice_engine.generate import generate_step
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.sampling import SamplingParams, make_sampler

    kernels.set_threads(args.threads)
    path = str(variant(args.model, "f32"))
    runs = [("q8_0", None)] + [(f, lay) for f in args.families.split(",") for lay in ("0", "1")]
    models = {}
    for quant, layout in runs:
        if layout is not None:
            os.environ["LATTICE_Q4_R16"] = layout
        loaded = load(path, quant=QuantSpec(quant))
        os.environ.pop("LATTICE_Q4_R16", None)
        name = quant + {None: "", "0": " plain", "1": " r16"}[layout]
        held = loaded.model.layers[0].mlp.down_proj.weight.format.name
        models[name] = (loaded, held)
        print(f"loaded {name}: down_proj held as {held}", flush=True)
    first = next(iter(models.values()))[0]
    ids = dec.prompt_ids(lambda t: first.tokenizer.encode(t, add_special_tokens=False))
    greedy = SamplingParams(temperature=0)

    # --cpu (one thread): the process's CPU time, which other jobs on the cores inflate less
    clock = time.process_time if args.cpu else time.perf_counter

    def decode_time(model, n: int) -> float:
        start = clock()
        for _ in generate_step(model, ids[:dec.SHORT_PROMPT], make_sampler(greedy), max_tokens=n):
            pass
        return clock() - start

    for loaded, _ in models.values():
        decode_time(loaded.model, 8)  # warm-up: page in the weights
    times = {name: {dec.N1: [], dec.N2: []} for name in models}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, (loaded, _) in models.items():
            for n in (dec.N1, dec.N2):
                times[name][n].append(decode_time(loaded.model, n))
        print(f"round {r + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", flush=True)
    q8 = dec.slope(times["q8_0"])
    rows = []
    print(f"{'model':<16} {'held as':<18} {'MB/token':>9} {'tok/s':>7} {'x q8_0':>7}")
    for name, (loaded, held) in models.items():
        tok_s = dec.slope(times[name])
        mb = sum(w.nbytes for w in dec.model_matrices(loaded.model)) / 1e6
        print(f"{name:<16} {held:<18} {mb:9.1f} {tok_s:7.1f} {tok_s / q8:7.2f}")
        rows.append({"model": name, "held_as": held, "weight_mb_per_token": round(mb, 1),
                     "decode_tok_s": round(tok_s, 2), "vs_q8_0": round(tok_s / q8, 3),
                     "median_s": {n: round(statistics.median(v), 4)
                                  for n, v in times[name].items()}})
    emit({"mode": "decode", "model": args.model, "threads": args.threads,
          "clock": "process CPU" if args.cpu else "wall",
          "rounds": args.rounds, "load_avg": load0, "load_avg_end": os.getloadavg()[0],
          "rows": rows}, args.results, args.threads)
    return 0


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
    p.add_argument("--decode", action="store_true", help="whole-model decode A/B (see above)")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    add_results_option(p)
    args = p.parse_args(argv)
    if args.cpu and args.threads != 1:
        p.error("--cpu needs --threads 1 (worker threads' time is not the caller's)")
    if args.decode:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        return decode_ab(args)
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
                            if family == args.families.split(",")[0]:  # once per M
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
