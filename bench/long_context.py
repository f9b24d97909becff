"""Decode and prefill at long contexts: lattice next to llama.cpp on the same GGUF, same run.

    python bench/long_context.py --model qwen2.5-coder-0.5b --quant q8_0
                                 [--context 512 --context 4096 --context 16384]
                                 [--kv-cache auto|f32|f16|q8_0] [--threads 2] [--decode-tokens 32]

For each context length L, each engine in its own subprocess:
- prefill: the first L tokens of WikiText-2 (repeated when it is shorter), timed from an
  empty cache to the logits of the last token, the way each engine's own generation does it
  (lattice: chunks of generate.PREFILL_CHUNK into the dense cache; llama.cpp: `eval` with
  n_batch = n_ubatch = 512 and its default KV cache, f16);
- decode: then --decode-tokens greedy tokens one at a time, each timed; the figure is the
  median per-token time after two warm-up tokens, so it is the speed at context ~L.
Both engines load bench/gguf_variants.py's file of the model at --quant (lattice reads its
blocks as they are). The context length is printed on every row. Prefill at 16k is
quadratic in L for both engines and takes minutes; --context picks the lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit, run_script, peak_rss_mb  # bench/

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
WARMUP = 2


def context_ids(encode, length: int) -> list[int]:
    """The first `length` tokens of WikiText-2 (the test split has ~280k tokens)."""
    text = WIKITEXT.read_text(encoding="utf-8")
    ids: list[int] = []
    # encode a generous prefix (about 4 characters per token), cycling if it is short
    while len(ids) < length:
        ids += encode(text[: length * 6])
    return ids[:length]


def summarize(prefill_s: float, token_s: list[float], length: int) -> dict:
    steady = token_s[WARMUP:] or token_s
    return {"context": length, "prefill_s": prefill_s, "prefill_tok_s": length / prefill_s,
            "decode_tok_s": 1.0 / statistics.median(steady),
            "decode_ms_p90": 1e3 * float(np.percentile(steady, 90)),
            "peak_rss_mb": peak_rss_mb()}


def worker_lattice(path: str, quant: str, threads: int, length: int, n: int,
                   kv_cache: str) -> dict:
    from lattice_engine.generate import PREFILL_CHUNK
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(threads)
    loaded = load(path, quant=QuantSpec(quant), kv_cache=kv_cache)
    model = loaded.model
    ids = context_ids(lambda t: loaded.tokenizer.encode(t, add_special_tokens=False), length)
    # warm-up on a short prompt: page the weights in
    warm = model.make_cache(batch=1, capacity=64)
    model.forward(np.asarray([ids[:32]]), warm, last_only=True)

    cache = model.make_cache(batch=1, capacity=length + n + 1)
    start = time.perf_counter()
    for lo in range(0, length, PREFILL_CHUNK):
        logits = model.forward(np.asarray([ids[lo:lo + PREFILL_CHUNK]]), cache, last_only=True)
    prefill_s = time.perf_counter() - start
    times = []
    for _ in range(n):
        token = int(logits[0, -1].argmax())
        start = time.perf_counter()
        logits = model.forward(np.array([[token]]), cache, last_only=True)
        times.append(time.perf_counter() - start)
    return summarize(prefill_s, times, length) | {"kv_cache": model.kv_cache}


def worker_llama_cpp(path: str, threads: int, length: int, n: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=length + n + 16, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = context_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False), length)
    llm.eval(ids[:32])  # warm-up: page the weights in
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - start
    times = []
    for _ in range(n):
        token = llm.sample(temp=0.0)
        start = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - start)
    return summarize(prefill_s, times, length) | {"kv_cache": "f16 (llama.cpp default)"}


def run_worker(argv: list[str]) -> dict:
    return run_script(__file__, argv, label=" ".join(argv))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b",
                        help="catalog name (bench/gguf_variants.py) or .gguf path")
    parser.add_argument("--quant", default="q8_0", choices=("f32", "f16", "q8_0"))
    parser.add_argument("--context", type=int, action="append")
    parser.add_argument("--kv-cache", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                        help="lattice's KV dtype (default: the engine's, auto: f16 for "
                             "quantized weights)")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-peer", action="store_true", help="lattice only")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    contexts = args.context or [512, 4096, 16384]

    if args.worker:
        length = contexts[0]
        if args.worker == "lattice":
            result = worker_lattice(args.path, args.quant, args.threads, length,
                                    args.decode_tokens, args.kv_cache)
        else:
            result = worker_llama_cpp(args.path, args.threads, length, args.decode_tokens)
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(HERE))
    from gguf_variants import variant
    path = args.model if args.model.endswith(".gguf") else str(variant(args.model, args.quant))
    common = ["--path", path, "--quant", args.quant, "--threads", str(args.threads),
              "--decode-tokens", str(args.decode_tokens), "--kv-cache", args.kv_cache]
    load = os.getloadavg()
    print(f"model {args.model}, quant {args.quant}, lattice KV {args.kv_cache}, "
          f"{args.threads} threads, load average {load[0]:.2f}, file {path}")
    print(f"{'context':>8s} {'engine':10s} {'decode tok/s':>13s} {'prefill tok/s':>14s} "
          f"{'peak RSS MB':>12s}")
    rows = []
    for length in contexts:
        results = {"lattice": run_worker(common + ["--worker", "lattice",
                                                   "--context", str(length)])}
        if not args.no_peer:
            results["llama.cpp"] = run_worker(common + ["--worker", "llama.cpp",
                                                        "--context", str(length)])
        for name, r in results.items():
            if "error" in r:
                print(f"{length:8d} {name:10s} error: {r['error']}")
                continue
            print(f"{length:8d} {name:10s} {r['decode_tok_s']:13.1f} {r['prefill_tok_s']:14.1f} "
                  f"{r['peak_rss_mb']:12.0f}")
        row = {"bench": "long_context", "model": args.model, "quant": args.quant,
               "context": length, "threads": args.threads, "loadavg_start": load,
               "engines": results}
        ours, peer = results["lattice"], results.get("llama.cpp", {})
        if "error" not in ours and peer and "error" not in peer:
            row["decode_ratio"] = ours["decode_tok_s"] / peer["decode_tok_s"]
            row["prefill_ratio"] = ours["prefill_tok_s"] / peer["prefill_tok_s"]
            print(f"{length:8d} lattice / llama.cpp: decode {row['decode_ratio']:.2f}x, "
                  f"prefill {row['prefill_ratio']:.2f}x")
        rows.append(emit(row, args.results, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
