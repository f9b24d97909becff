"""Qwen3.5 speed at the 0.8B shape: lattice (F16, Q8_0) next to transformers float32 and,
when its converter accepts the model, llama.cpp, on the same random weights, same run.

    python bench/qwen3_5.py [--model DIR] [--quant f16 --quant q8_0 --quant q4_asym ...]
                            [--peer transformers]
                            [--peer llama.cpp] [--threads 2] [--runs 3]

DIR is the checkpoint of scripts/make_qwen3_5_checkpoint.py (default
$LATTICE_HOME/bench/qwen3_5-0.8b-random). Random weights have no tokenizer, so prompts are
fixed pseudo-random token ids (speed does not depend on which ids). Every engine runs in its
own subprocess. llama.cpp reads DIR/f16.gguf, q8_0.gguf, q4_0.gguf (beside lattice q4_sym) and
q4_1.gguf (beside q4_asym), made by bench/qwen3_5_gguf.py.
- decode tok/s by the slope method: T(N) = prefill a 16-token prompt + N greedy tokens;
  decode = (N2 - N1) / (T(N2) - T(N1)), medians of --runs.
- prefill tok/s: one 512-token prompt in one call, median of --runs.
- roofline: measured read bandwidth (kernels.measure_read_bandwidth, same threads) / weight
  bytes a decode step reads (every layer matrix + the lm_head; the recurrent states and
  the KV cache are a few MB and left out).
Prints a table, then one JSON line.
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

SHORT_PROMPT, PROMPT_TOKENS = 16, 512
# llama.cpp's file compared with each lattice format (bench/qwen3_5_gguf.py makes them): the
# 4-bit formats face the llama.cpp type of the same shape (q4_sym: 32-value blocks with one
# scale, Q4_0; q4_asym: a scale and a minimum, Q4_1); f32 has no llama.cpp row here.
PEER_GGUF = {"f32": None, "f16": "f16", "q8_0": "q8_0", "q4_sym": "q4_0", "q4_asym": "q4_1"}


def default_model() -> Path:
    home = Path(os.environ.get("LATTICE_HOME") or "~/.cache/lattice").expanduser()
    return home / "bench" / "qwen3_5-0.8b-random"


def token_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, min(vocab, 150000), n).tolist()


def slope(times: dict[int, list[float]], n1: int, n2: int) -> float:
    return (n2 - n1) / (statistics.median(times[n2]) - statistics.median(times[n1]))



def measure(prefill_once, decode_n, runs: int, n1: int, n2: int) -> dict:
    decode_n(4)  # warm-up: page the weights in
    times = {n: [decode_n(n) for _ in range(runs)] for n in (n1, n2)}
    prefill = [prefill_once() for _ in range(runs)]
    return {"decode_tok_s": slope(times, n1, n2),
            "prefill_tok_s": PROMPT_TOKENS / statistics.median(prefill),
            "peak_rss_mb": peak_rss_mb()}


def worker_lattice(path: str, quant: str, threads: int, runs: int, n1: int, n2: int) -> dict:
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(threads)
    model = load(path, quant=QuantSpec(quant)).model
    ids = token_ids(model.vocab_size, PROMPT_TOKENS)

    def prefill_once() -> float:
        start = time.perf_counter()
        model.forward(np.asarray([ids]), model.make_cache(capacity=len(ids)), last_only=True)
        return time.perf_counter() - start

    def decode_n(n: int) -> float:
        start = time.perf_counter()
        cache = model.make_cache(capacity=SHORT_PROMPT + n)
        logits = model.forward(np.asarray([ids[:SHORT_PROMPT]]), cache, last_only=True)
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            logits = model.forward(np.array([[token]]), cache, last_only=True)
        return time.perf_counter() - start

    result = measure(prefill_once, decode_n, runs, n1, n2)
    result["weight_bytes_per_token"] = weight_bytes(model)
    result["backend"] = getattr(model.ops, "name", "numpy")
    return result


def weight_bytes(model) -> int:
    """Bytes of every matrix one decode step streams: all layer weights and the lm_head."""
    seen, total = set(), 0

    def visit(obj, depth=0):
        nonlocal total
        if depth > 3 or not hasattr(obj, "__dict__"):
            return
        for value in vars(obj).values():
            if hasattr(value, "format") and hasattr(value, "nbytes") and id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
            elif hasattr(value, "__dict__"):
                visit(value, depth + 1)

    for layer in model.layers:
        visit(layer)
    total += model.lm_head.nbytes
    return total


def worker_transformers(path: str, threads: int, runs: int, n1: int, n2: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32).eval()
    ids = token_ids(model.config.text_config.vocab_size, PROMPT_TOKENS)

    def prefill_once() -> float:
        start = time.perf_counter()
        model(torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        return time.perf_counter() - start

    def decode_n(n: int) -> float:
        start = time.perf_counter()
        model.generate(torch.tensor([ids[:SHORT_PROMPT]]), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False)
        return time.perf_counter() - start

    result = measure(prefill_once, decode_n, runs, n1, n2)
    result["quant"] = "f32"
    return result


def worker_llama_cpp(path: str, threads: int, runs: int, n1: int, n2: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    ids = token_ids(llm.n_vocab(), PROMPT_TOKENS)

    def prefill_once() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - start

    def decode_n(n: int) -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids[:SHORT_PROMPT])
        for _ in range(n):
            llm.eval([llm.sample(temp=0.0)])
        return time.perf_counter() - start

    return measure(prefill_once, decode_n, runs, n1, n2)


def run_worker(argv: list[str]) -> dict:
    return run_script(__file__, argv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_model()))
    parser.add_argument("--quant", action="append", choices=tuple(PEER_GGUF))
    parser.add_argument("--peer", action="append", choices=("transformers", "llama.cpp"))
    parser.add_argument("--gguf", default=None, help="llama.cpp's GGUF of the same weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--n1", type=int, default=8)
    parser.add_argument("--n2", type=int, default=40)
    add_results_option(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common = (args.threads, args.runs, args.n1, args.n2)

    if args.worker:
        if args.worker.startswith("lattice:"):
            result = worker_lattice(args.model, args.worker.split(":", 1)[1], *common)
        elif args.worker == "transformers":
            result = worker_transformers(args.model, *common)
        else:
            result = worker_llama_cpp(args.gguf, *common)
        print(json.dumps(result))
        return 0

    base = ["--model", args.model, "--threads", str(args.threads), "--runs", str(args.runs),
            "--n1", str(args.n1), "--n2", str(args.n2)]
    results = {}
    for quant in args.quant or ["f16", "q8_0"]:
        results[f"lattice {quant}"] = run_worker(base + ["--worker", f"lattice:{quant}"])
    for peer in args.peer or ["transformers", "llama.cpp"]:
        if peer == "transformers":
            results[peer] = run_worker(base + ["--worker", peer])
            continue
        for quant in args.quant or ["f16", "q8_0"]:  # GGUFs from bench/qwen3_5_gguf.py
            if PEER_GGUF[quant] is None:
                continue
            gguf = Path(args.model) / f"{PEER_GGUF[quant]}.gguf"
            results[f"llama.cpp {quant}"] = (
                run_worker(base + ["--gguf", str(gguf), "--worker", peer]) if gguf.exists()
                else {"error": f"{gguf} is missing; make it with bench/qwen3_5_gguf.py"})

    from lattice_engine import kernels
    kernels.set_threads(args.threads)
    bandwidth = kernels.measure_read_bandwidth()
    load = os.getloadavg()
    print(f"model {args.model}, {args.threads} threads, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, read bandwidth {bandwidth:.1f} GB/s")
    print(f"{'engine':16s} {'decode tok/s':>13s} {'prefill tok/s':>14s} {'peak RSS MB':>12s} "
          f"{'roofline':>9s}")
    summary = {"model": args.model, "threads": args.threads, "read_bandwidth_gb_s": bandwidth,
               "loadavg": load, "engines": results}
    ref = results.get("transformers", {})
    for name, r in results.items():
        if "error" in r:
            print(f"{name:16s} error: {r['error']}")
            continue
        frac = ""
        if "weight_bytes_per_token" in r:
            r["roofline_tok_s"] = bandwidth * 1e9 / r["weight_bytes_per_token"]
            r["roofline_frac"] = r["decode_tok_s"] / r["roofline_tok_s"]
            frac = f"{r['roofline_frac']:.0%}"
        print(f"{name:16s} {r['decode_tok_s']:13.2f} {r['prefill_tok_s']:14.1f} "
              f"{r['peak_rss_mb']:12.0f} {frac:>9s}")
        if name.startswith("lattice") and "decode_tok_s" in ref:
            r["decode_vs_transformers"] = r["decode_tok_s"] / ref["decode_tok_s"]
            r["prefill_vs_transformers"] = r["prefill_tok_s"] / ref["prefill_tok_s"]
        peer = results.get(name.replace("lattice", "llama.cpp"), {})
        if name.startswith("lattice") and "decode_tok_s" in peer:
            r["decode_vs_llama_cpp"] = r["decode_tok_s"] / peer["decode_tok_s"]
            r["prefill_vs_llama_cpp"] = r["prefill_tok_s"] / peer["prefill_tok_s"]
    for name, r in results.items():
        ratios = {k: v for k, v in r.items() if k.startswith(("decode_vs", "prefill_vs"))}
        if ratios:
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
