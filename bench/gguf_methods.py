"""One GGUF file under several quant methods: decode speed alternated in one process (this
VM's speed drifts by 20% in minutes, so separate runs do not compare), load time, resident
memory and WikiText-2 NLL per method.

    python bench/gguf_methods.py --model qwen2.5-coder-1.5b --methods gguf q8_0 [--rounds 5]

- decode tok/s by the slope method (greedy, 32 and 96 new tokens after a 16-token prompt),
  per round every method in turn; the ratios are medians of per-round ratios to the last
  method.
- load: seconds to `load()` in a fresh subprocess and its peak RSS then; NLL over the first
  512 tokens of WikiText-2's test set, in that subprocess.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit, peak_rss_mb  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
N1, N2, PROMPT = 32, 96, list(range(100, 116))


def load_method(path: str, method: str):
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    return load(path, quant=QuantSpec(None if method == "default" else method))


def worker(path: str, method: str, threads: int) -> dict:
    """Load time, NLL of 512 tokens and peak RSS, in this (fresh) process."""
    from lattice_engine.loading import set_threads
    set_threads(threads)
    start = time.perf_counter()
    loaded = load_method(path, method)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mb()  # before the NLL pass's [512, vocab] logits
    model = loaded.model
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)[:513]
    logits = model.forward(np.asarray([ids[:-1]]), model.make_cache(capacity=len(ids)))
    lg = logits[0].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(-1)) + top[:, 0]
    nll = float(np.mean(lse - lg[np.arange(len(ids) - 1), ids[1:]]))
    return {"load_s": load_s, "nll_512": nll, "peak_rss_mb": rss_loaded, "quant": loaded.quant}


def decode_rounds(path: str, methods: list[str], rounds: int, threads: int) -> dict:
    from lattice_engine.generate import generate_step
    from lattice_engine.loading import set_threads
    from lattice_engine.sampling import SamplingParams, make_sampler
    set_threads(threads)
    models = {m: load_method(path, m).model for m in methods}

    def timed(model, n: int) -> float:
        start = time.perf_counter()
        for _ in generate_step(model, PROMPT, make_sampler(SamplingParams(temperature=0)),
                               max_tokens=n):
            pass
        return time.perf_counter() - start

    for m in methods:
        timed(models[m], 8)  # warm-up: page the weights in
    speeds = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            t1, t2 = timed(models[m], N1), timed(models[m], N2)
            speeds[m].append((N2 - N1) / (t2 - t1))
    return speeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="catalog name or .gguf path")
    parser.add_argument("--methods", nargs="+", default=["gguf", "q8_0"],
                        help="quant methods ('default': none asked for); ratios are to the last")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("PATH", "METHOD"), help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.threads)))
        return 0
    if not args.model:
        parser.error("--model is required")
    from lattice_engine.loading import resolve_source
    path = str(resolve_source(args.model))
    per = {}
    for m in args.methods:
        out = subprocess.run([sys.executable, __file__, "--worker", path, m, "--threads",
                              str(args.threads)], capture_output=True, text=True, check=True)
        per[m] = json.loads(out.stdout.strip().splitlines()[-1])
    speeds = decode_rounds(path, args.methods, args.rounds, args.threads)
    base = args.methods[-1]
    print(f"model {args.model} ({path}), {args.threads} threads, {args.rounds} rounds")
    print(f"{'method':10s} {'decode tok/s':>13s} {'vs ' + base:>10s} {'load s':>8s} "
          f"{'peak RSS MB':>12s} {'NLL 512':>8s}")
    summary = {"model": args.model, "threads": args.threads, "rounds": args.rounds,
               "methods": {}}
    for m in args.methods:
        ratio = statistics.median(a / b for a, b in zip(speeds[m], speeds[base]))
        row = dict(per[m], decode_tok_s=statistics.median(speeds[m]), decode_rounds=speeds[m],
                   decode_ratio=ratio)
        summary["methods"][m] = row
        print(f"{m:10s} {row['decode_tok_s']:13.2f} {ratio:9.3f}x {row['load_s']:8.2f} "
              f"{row['peak_rss_mb']:12.0f} {row['nll_512']:8.4f}")
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
