"""Where a decode step's time goes, next to the bandwidth roofline.

    python bench/decode_profile.py --model qwen2.5-coder-0.5b --quant q8_0 [--threads 2]

Measures, interleaved in one process so a busy machine skews them alike:
- step:       one decode step as the engine runs it (the fused C step, then the lm_head);
- per-kernel: the same step through one Python call per kernel (fused decode off), so
              per-kernel minus step is what Python costs per token;
- matmuls:    only the weight matmuls of that step, grouped as the step groups them
              (q/k/v and gate/up as one job each), so step minus matmuls is the time spent
              in C outside the weight streams (norms, rope, attention, adds);
- the read bandwidth (kernels.measure_read_bandwidth) and the roofline it implies.
Minimum and median of --runs repetitions; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from decode import model_matrices  # noqa: E402  (bench/ is the working directory's sibling)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalog name, GGUF or HF folder")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--position", type=int, default=128, help="tokens already in the cache")
    args = ap.parse_args()

    from lattice_engine import kernels
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(args.threads)
    model = load(args.model, quant=QuantSpec(args.quant), backend="native").model
    cache = model.make_cache(capacity=args.position + 8)
    model.forward(np.arange(args.position)[None] % 1000 + 10, cache)
    token = np.array([[100]])

    def step(fused: bool):
        def run():
            model.fused_decode = fused
            cache.truncate(args.position)
            model.forward(token, cache, last_only=True)
        return run

    groups = []
    for block in model.layers:
        a, m = block.self_attn, block.mlp
        groups += [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.o_proj.weight],
                   [m.gate_proj.weight, m.up_proj.weight], [m.down_proj.weight]]
    groups.append([model.lm_head])
    inputs = [(np.random.default_rng(0).standard_normal((1, g[0].cols)).astype(np.float32), g,
               [np.empty((1, w.rows), np.float32) for w in g]) for g in groups]

    def matmuls():
        for x, g, outs in inputs:
            kernels.matmul_multi(x, g, outs)

    cases = {"step": step(True), "per-kernel": step(False), "matmuls": matmuls}
    for fn in cases.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    step(True)()  # leave the model as the engine runs it
    bandwidth = kernels.measure_read_bandwidth()
    nbytes = sum(w.nbytes for w in model_matrices(model))
    roofline_ms = nbytes / (bandwidth * 1e9) * 1e3
    best = {k: min(v) * 1e3 for k, v in times.items()}
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    print(f"{args.model} {args.quant}, {args.threads} threads, position {args.position}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"weights read per token {nbytes / 1e6:.0f} MB; read bandwidth {bandwidth:.1f} GB/s; "
          f"roofline {roofline_ms:.2f} ms/token ({1e3 / roofline_ms:.1f} tok/s)")
    print(f"{'':12} {'min ms':>8} {'median':>8} {'GB/s':>7} {'of roofline':>12}")
    for name in cases:
        print(f"{name:12} {best[name]:8.2f} {median[name]:8.2f} "
              f"{nbytes / best[name] / 1e6:7.1f} {roofline_ms / best[name]:12.0%}")
    print(f"Python per token (per-kernel - step): {best['per-kernel'] - best['step']:.2f} ms; "
          f"C outside the weight matmuls (step - matmuls): {best['step'] - best['matmuls']:.2f} ms")
    print(json.dumps({"model": args.model, "quant": args.quant, "threads": args.threads,
                      "weight_bytes_per_token": nbytes, "read_bandwidth_gb_s": bandwidth,
                      "step_ms": best["step"], "per_kernel_ms": best["per-kernel"],
                      "matmuls_ms": best["matmuls"], "roofline_ms": roofline_ms,
                      "roofline_frac": roofline_ms / best["step"],
                      "load_avg_1m": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
