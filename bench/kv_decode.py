"""Decode speed at a long context with each KV-cache dtype, in the same run.

    python bench/kv_decode.py --model qwen2.5-coder-0.5b --quant q8_0 --context 4096 \
        [--kv-cache f32 --kv-cache f16 --kv-cache q8_0] [--threads 2] [--runs 3]

A decode step reads the whole KV cache once: at a 4,096-token context on
Qwen2.5-Coder-0.5B that is 100 MB in f32, a fifth of the q8_0 weights, so the dtype
(`[model] kv_cache`) shows in tok/s. Per dtype: one prefill of `--context` WikiText-2
tokens (the fused step and attention kernels then read the cache in that dtype), then
greedy decoding from that position by the slope method: T(n) is the time to decode n
tokens after rolling the cache back to the context (KVCache.truncate), decode tok/s =
(N2 - N1) / (T(N2) - T(N1)), median of --runs. The first dtype is the peer: the others'
ratios to it are printed, then one JSON line with provenance (bench/provenance.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit, peak_rss_mb  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
N1, N2 = 16, 64


def context_ids(encode, n: int) -> list[int]:
    text = WIKITEXT.read_text(encoding="utf-8")
    ids: list[int] = []
    chars = 8 * n
    while len(ids) < n and chars < 8 * len(text):
        ids = encode(text[:chars])
        chars *= 2
    if len(ids) < n:
        raise SystemExit(f"--context {n}: WikiText-2 gives only {len(ids)} tokens")
    return ids[:n]


def measure(model, ids: list[int], runs: int) -> dict:
    cache = model.make_cache(batch=1, capacity=len(ids) + N2 + 1)
    start = time.perf_counter()
    logits = model.forward(np.asarray([ids]), cache, last_only=True)
    prefill_s = time.perf_counter() - start
    first = int(np.argmax(logits[0, -1]))

    def decode_time(n: int) -> float:
        cache.truncate(len(ids))
        token = first
        t0 = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(model.forward(np.asarray([[token]]), cache)[0, -1]))
        return time.perf_counter() - t0

    decode_time(4)  # warm-up
    times = {n: [decode_time(n) for _ in range(runs)] for n in (N1, N2)}
    decode = (N2 - N1) / (statistics.median(times[N2]) - statistics.median(times[N1]))
    kv_bytes = sum(a[:, :len(ids)].nbytes for a in cache.keys + cache.values)
    return {"decode_tok_s": round(decode, 2), "prefill_tok_s": round(len(ids) / prefill_s, 1),
            "kv_mb_at_context": round(kv_bytes / 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--kv-cache", action="append", default=None,
                        choices=("f32", "f16", "q8_0"), help="repeatable; the first is the peer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    add_results_option(parser)
    args = parser.parse_args()
    dtypes = args.kv_cache or ["f32", "f16"]
    sys.path.insert(0, str(HERE.parent))
    from lattice_engine.loading import load, set_kv_cache, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(args.threads)
    loaded = load(args.model, quant=QuantSpec(args.quant))
    ids = context_ids(lambda t: loaded.tokenizer.encode(t, add_special_tokens=False),
                      args.context)
    load_avg = os.getloadavg()
    rows = {}
    for dtype in dtypes:
        set_kv_cache(loaded.model, dtype)
        rows[dtype] = measure(loaded.model, ids, args.runs)
    peer = rows[dtypes[0]]
    print(f"{args.model} {args.quant}, context {args.context}, threads {args.threads}, "
          f"load average {load_avg[0]:.2f} at start / {os.getloadavg()[0]:.2f} at end")
    print(f"{'kv_cache':9} {'decode tok/s':>12} {'vs ' + dtypes[0]:>8} {'prefill tok/s':>14} "
          f"{'KV MB':>7}")
    for dtype, r in rows.items():
        print(f"{dtype:9} {r['decode_tok_s']:12.2f} {r['decode_tok_s'] / peer['decode_tok_s']:8.3f}"
              f" {r['prefill_tok_s']:14.1f} {r['kv_mb_at_context']:7.1f}")
    emit({"bench": "kv_decode", "model": args.model, "quant": args.quant,
          "context": args.context, "rows": rows,
          "decode_ratio_vs_" + dtypes[0]: {d: round(r["decode_tok_s"] / peer["decode_tok_s"], 3)
                                           for d, r in rows.items()},
          "load_average": [round(x, 2) for x in load_avg], "peak_rss_mb": peak_rss_mb()},
         args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
