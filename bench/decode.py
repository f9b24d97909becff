"""Decode and prefill speed of lattice next to llama.cpp (and transformers), same run.

    python bench/decode.py --model smollm2-135m --quant q8_0 [--peer llama.cpp] [--threads 2]

Both engines load the same GGUF (bench/gguf_variants.py makes F32 / F16 / Q8_0 files from
the catalog model's dequantized weights; lattice reads Q8_0 blocks as they are). Each
engine runs in its own subprocess so peak RSS is its own.

- decode tok/s by the slope method: T(N) is the time to prefill a short prompt and greedily
  generate N tokens; decode = (N2 - N1) / (T(N2) - T(N1)), median of --runs.
- prefill tok/s: a 512-token prompt (WikiText-2) in one call, median of --runs.
- roofline: measured read bandwidth / weight bytes read per decoded token.
Prints a table, then one JSON line with the ratios (lattice / peer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit, peak_rss_mb  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
N1, N2 = 32, 160
PROMPT_TOKENS = 512
SHORT_PROMPT = 16


def prompt_ids(tokenizer_encode) -> list[int]:
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    return tokenizer_encode(text)[:PROMPT_TOKENS]


def slope(times: dict[int, list[float]]) -> float:
    return (N2 - N1) / (statistics.median(times[N2]) - statistics.median(times[N1]))



# --- workers: each runs in its own process and prints one JSON line ----------------------

def worker_lattice(path: str, quant: str, threads: int, runs: int,
                   transforms: dict | None = None) -> dict:
    from lattice_engine.generate import generate_step
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.sampling import SamplingParams, make_sampler

    set_threads(threads)
    loaded = load(path, quant=QuantSpec(quant), transforms=transforms)
    model = loaded.model
    ids = prompt_ids(lambda t: loaded.tokenizer.encode(t, add_special_tokens=False))
    greedy = SamplingParams(temperature=0)

    def prefill_time() -> float:
        start = time.perf_counter()
        model.forward(np.asarray([ids]), model.make_cache(capacity=len(ids)), last_only=True)
        return time.perf_counter() - start

    def decode_time(n: int) -> float:
        start = time.perf_counter()
        for _ in generate_step(model, ids[:SHORT_PROMPT], make_sampler(greedy), max_tokens=n):
            pass
        return time.perf_counter() - start

    decode_time(8)  # warm-up: page in the weights
    times = {n: [decode_time(n) for _ in range(runs)] for n in (N1, N2)}
    prefill = [prefill_time() for _ in range(runs)]
    weight_bytes = sum(w.nbytes for w in model_matrices(model))
    return {"decode_tok_s": slope(times), "prefill_tok_s": len(ids) / statistics.median(prefill),
            "peak_rss_mb": peak_rss_mb(), "weight_bytes_per_token": weight_bytes,
            "backend": getattr(model.ops, "name", "numpy")}


def model_matrices(model):
    """Every matrix a decode step reads (the embedding row read is negligible)."""
    seen = set()
    for layer in model.layers:
        for obj in vars(layer).values():
            for sub in ([obj] + list(vars(obj).values()) if hasattr(obj, "__dict__") else [obj]):
                w = getattr(sub, "weight", None)
                if w is not None and hasattr(w, "nbytes") and id(w) not in seen:
                    seen.add(id(w))
                    yield w
    yield model.lm_head


def worker_llama_cpp(path: str, threads: int, runs: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = prompt_ids(lambda t: llm.tokenize(t.encode(), add_bos=False, special=False))

    def prefill_time() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def decode_time(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:SHORT_PROMPT])
        for _ in range(n):
            token = llm.sample(temp=0.0)
            llm.eval([token])
        return time.perf_counter() - start

    decode_time(8)
    times = {n: [decode_time(n) for _ in range(runs)] for n in (N1, N2)}
    prefill = [prefill_time() for _ in range(runs)]
    return {"decode_tok_s": slope(times), "prefill_tok_s": len(ids) / statistics.median(prefill),
            "peak_rss_mb": peak_rss_mb()}


def worker_transformers(path: str, threads: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    ids = prompt_ids(lambda t: tok.encode(t, add_special_tokens=False))

    def prefill_time() -> float:
        start = time.perf_counter()
        model(torch.tensor([ids]))
        return time.perf_counter() - start

    def decode_time(n: int) -> float:
        start = time.perf_counter()
        model.generate(torch.tensor([ids[:SHORT_PROMPT]]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        return time.perf_counter() - start

    decode_time(8)
    times = {n: [decode_time(n) for _ in range(runs)] for n in (N1, N2)}
    prefill = [prefill_time() for _ in range(runs)]
    return {"decode_tok_s": slope(times), "prefill_tok_s": len(ids) / statistics.median(prefill),
            "peak_rss_mb": peak_rss_mb(), "quant": "f32 (dequantized)"}


def read_bandwidth_gb_s(threads: int) -> float:
    """Streaming read bandwidth with the native kernels' threads (bench/kernel_speed.py)."""
    from lattice_engine import kernels
    kernels.set_threads(threads)
    return kernels.measure_read_bandwidth()


def run_worker(name: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", name] + argv
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="catalog name or .gguf path")
    parser.add_argument("--quant", default="q8_0", choices=("f32", "f16", "q8_0", "gguf"))
    parser.add_argument("--peer", action="append", default=None,
                        choices=("llama.cpp", "transformers"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    add_results_option(parser)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "lattice":
            result = worker_lattice(args.path, args.quant, args.threads, args.runs)
        elif args.worker == "llama.cpp":
            result = worker_llama_cpp(args.path, args.threads, args.runs)
        else:
            result = worker_transformers(args.path, args.threads, args.runs)
        print(json.dumps(result))
        return 0

    if not args.model:
        parser.error("--model is required")
    sys.path.insert(0, str(HERE))
    from gguf_variants import variant

    path = str(variant(args.model, args.quant)) if not args.model.endswith(".gguf") else args.model
    common = ["--path", path, "--quant", args.quant, "--threads", str(args.threads),
              "--runs", str(args.runs)]
    peers = args.peer or ["llama.cpp", "transformers"]
    results = {"lattice": run_worker("lattice", common)}
    for peer in peers:
        results[peer] = run_worker(peer, common)
    bandwidth = read_bandwidth_gb_s(args.threads)

    ours = results["lattice"]
    print(f"model {args.model}, quant {args.quant}, {args.threads} threads, file {path}")
    print(f"{'engine':14s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'peak RSS MB':>12s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:14s} error: {r['error']}")
            continue
        print(f"{name:14s} {r['decode_tok_s']:13.1f} {r['prefill_tok_s']:14.1f} "
              f"{r['peak_rss_mb']:12.0f}")
    summary = {"model": args.model, "quant": args.quant, "threads": args.threads}
    if "error" not in ours:
        roofline = bandwidth * 1e9 / ours["weight_bytes_per_token"]
        summary.update(decode_tok_s=ours["decode_tok_s"], prefill_tok_s=ours["prefill_tok_s"],
                       peak_rss_mb=ours["peak_rss_mb"], read_bandwidth_gb_s=bandwidth,
                       roofline_tok_s=roofline, roofline_frac=ours["decode_tok_s"] / roofline)
        print(f"roofline: {bandwidth:.1f} GB/s / {ours['weight_bytes_per_token'] / 1e6:.0f} MB "
              f"per token = {roofline:.1f} tok/s; lattice reaches "
              f"{summary['roofline_frac']:.0%}")
    for peer in peers:
        r = results[peer]
        summary.setdefault("peers", {})[peer] = r
        if "error" in r or "error" in ours:
            continue
        key = "" if peer == "llama.cpp" else "_vs_transformers"
        summary[f"decode_ratio{key}"] = ours["decode_tok_s"] / r["decode_tok_s"]
        summary[f"prefill_ratio{key}"] = ours["prefill_tok_s"] / r["prefill_tok_s"]
        summary[f"rss_ratio{key}"] = ours["peak_rss_mb"] / r["peak_rss_mb"]
        print(f"lattice / {peer}: decode {summary[f'decode_ratio{key}']:.2f}x, prefill "
              f"{summary[f'prefill_ratio{key}']:.2f}x, RSS {summary[f'rss_ratio{key}']:.2f}x")
    if "llama.cpp" in summary.get("peers", {}):
        summary["peer"] = summary["peers"]["llama.cpp"]
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
