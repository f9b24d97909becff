"""Where a decode step's time goes, next to the bandwidth roofline (llama family and Qwen3.5).

    python bench/decode_profile.py --model qwen2.5-coder-0.5b --quant q8_0 [--threads 2]
    python bench/decode_profile.py --model qwen3_5 --quant f16     (the 0.8B random checkpoint)

`--model qwen3_5` is the checkpoint of scripts/make_qwen3_5_checkpoint.py
($LATTICE_HOME/bench/qwen3_5-0.8b-random); otherwise a catalog name, GGUF or HF folder.
Measured interleaved in one process, so a busy machine skews them alike:
- step:       one decode step as the engine runs it (the fused C step when there is one,
              then the lm_head);
- per-kernel: the same step through one Python call per kernel (fused decode off), so
              per-kernel minus step is what Python costs per token;
- matmuls:    only the weight matmuls of that step, grouped as the fused step groups them
              (q/k/v, gate/up, a Gated DeltaNet layer's input projections as one job
              each), so step minus matmuls is the time spent in C outside the weight
              streams (norms, rope, attention, the conv and delta rule, adds);
- lm_head:    the lm_head alone (part of matmuls);
- the read bandwidth (kernels.measure_read_bandwidth) and the roofline it implies.
Minimum and median of --runs repetitions; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file


def resolve_model(name: str) -> str:
    if name != "qwen3_5":
        return name
    home = Path(os.environ.get("LATTICE_HOME") or "~/.cache/lattice").expanduser()
    return str(home / "bench" / "qwen3_5-0.8b-random")


def matmul_groups(model) -> list[list]:
    """The decode step's weight matrices, grouped by the input they read."""
    groups = []
    for block in model.layers:
        if getattr(block, "kind", None) == "linear_attention":
            a = block.linear_attn
            groups += [[a.in_proj_qkv.weight, a.in_proj_z.weight, a.in_proj_b.weight,
                        a.in_proj_a.weight], [a.out_proj.weight]]
        else:
            a = block.self_attn
            groups += [[a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.o_proj.weight]]
        m = block.mlp
        groups += [[m.gate_proj.weight, m.up_proj.weight], [m.down_proj.weight]]
    return groups


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b",
                    help="catalog name, GGUF or HF folder; qwen3_5: the 0.8B random checkpoint")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--position", type=int, default=64, help="tokens already in the cache")
    add_results_option(ap)
    args = ap.parse_args()

    from lattice_engine import kernels
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(args.threads)
    model = load(resolve_model(args.model), quant=QuantSpec(args.quant), backend="native").model
    cache = model.make_cache(capacity=args.position + 8)
    model.forward(np.arange(args.position)[None] % 1000 + 10, cache)
    # a hybrid cache's recurrent states cannot be truncated: restore a snapshot instead
    if hasattr(cache, "snapshot"):
        snap = cache.snapshot()
        reset = lambda: cache.restore(snap)  # noqa: E731
    else:
        reset = lambda: cache.truncate(args.position)  # noqa: E731
    token = np.array([[100]])

    def step(fused: bool):
        def run():
            model.fused_decode = fused
            reset()
            model.forward(token, cache, last_only=True)
        return run

    rng = np.random.default_rng(0)
    groups = matmul_groups(model)
    inputs = [(rng.standard_normal((1, g[0].cols)).astype(np.float32), g,
               [np.empty((1, w.rows), np.float32) for w in g]) for g in groups]
    head_in = rng.standard_normal((1, model.lm_head.cols)).astype(np.float32)
    head_out = np.empty((1, model.lm_head.rows), np.float32)

    def lm_head():
        kernels.matmul(head_in, model.lm_head, head_out)

    def matmuls():
        for x, g, outs in inputs:
            kernels.matmul_multi(x, g, outs)
        lm_head()

    cases = {"step": step(True), "per-kernel": step(False), "matmuls": matmuls,
             "lm_head": lm_head}
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
    nbytes = sum(w.nbytes for g in groups for w in g) + model.lm_head.nbytes
    roofline_ms = nbytes / (bandwidth * 1e9) * 1e3
    best = {k: min(v) * 1e3 for k, v in times.items()}
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}

    print(f"{args.model} {args.quant}, {args.threads} threads, position {args.position}, "
          f"load average {os.getloadavg()[0]:.2f}, fused step: "
          f"{model._decode_step() is not None}")
    print(f"weights read per token {nbytes / 1e6:.0f} MB (lm_head {model.lm_head.nbytes / 1e6:.0f}); "
          f"read bandwidth {bandwidth:.1f} GB/s; roofline {roofline_ms:.2f} ms/token "
          f"({1e3 / roofline_ms:.1f} tok/s)")
    print(f"{'':12} {'min ms':>8} {'median':>8} {'GB/s':>7} {'of roofline':>12}")
    for name in cases:
        nb = model.lm_head.nbytes if name == "lm_head" else nbytes
        rl = nb / (bandwidth * 1e9) * 1e3
        print(f"{name:12} {best[name]:8.2f} {median[name]:8.2f} "
              f"{nb / best[name] / 1e6:7.1f} {rl / best[name]:12.0%}")
    print(f"Python per token (per-kernel - step): {best['per-kernel'] - best['step']:.2f} ms; "
          f"C outside the weight matmuls (step - matmuls): {best['step'] - best['matmuls']:.2f} ms")
    emit({"model": args.model, "quant": args.quant, "threads": args.threads,
          "weight_bytes_per_token": nbytes, "read_bandwidth_gb_s": bandwidth,
          "step_ms": best["step"], "per_kernel_ms": best["per-kernel"],
          "matmuls_ms": best["matmuls"], "lm_head_ms": best["lm_head"],
          "step_median_ms": median["step"],
          "roofline_ms": roofline_ms, "roofline_frac": roofline_ms / best["step"],
          "load_avg_1m": os.getloadavg()[0]}, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
