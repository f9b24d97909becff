"""LoRA serving and online-training speed (issue "Done when" 3), each case against its
no-adapter peer measured in the same run:

  1 stream with an adapter            vs 1 stream without          (target >= 0.9x)
  8 streams using 4 different adapters vs 8 streams without        (target >= 0.85x)
  adapt_step on a 128-token example: seconds (target < 2 s), with its ratio to a prefill
  of the same tokens (a no-adapter forward, measured in the same run), and the decode
  speed of 8 streams while it trains in another thread vs without training (>= 0.5x)

The adapters are rank-R LoRAs on every linear layer with random factors (speed does not
depend on their values). Decode speed is tokens per second over --tokens steps after the
prefill, median of --repeats; the machine's load average is printed with the rows.

    python bench/lora.py [--model qwen2.5-coder-0.5b] [--quant q8_0] [--threads 2]
                         [--rank 16] [--tokens 48] [--repeats 3]

Prints one line per case, then one JSON object (with provenance) last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lattice_engine.adapters import AdapterWeights, LowRank, named_linears  # noqa: E402
from lattice_engine.batching import BatchingOptions  # noqa: E402
from lattice_engine.engine import Engine  # noqa: E402
from lattice_engine.sampling import SamplingParams  # noqa: E402
from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def random_adapter(model, name: str, rank: int, seed: int) -> AdapterWeights:
    rng = np.random.default_rng(seed)
    mods = {}
    for module, lin in named_linears(model).items():
        a = rng.standard_normal((rank, lin.weight.cols)).astype(np.float32) * 0.01
        b = rng.standard_normal((lin.weight.rows, rank)).astype(np.float32) * 0.01
        mods[module] = LowRank(a, b, 2.0)
    return AdapterWeights(name, mods)


def decode_speed(engine, adapters: list, tokens: int, during=None) -> float:
    """Aggregate decode tokens/s of len(adapters) streams (None: no adapter) over `tokens`
    steps after every prompt is in; `during` runs in a thread once decoding started."""
    runner = engine.start_batching(BatchingOptions(kv_cache_tokens=8192, max_running=16))
    ids = engine.prompt_ids(PROMPT)
    params = SamplingParams(max_tokens=tokens + 2, temperature=0.0)
    for name in adapters:
        seq = runner.make_sequence(ids, params, ignore_eos=True,
                                   adapter=engine.adapter_for_request(name))
        runner.enqueue(seq)
    while runner.scheduler.waiting or any(s.prefilling for s in runner.scheduler.running):
        runner.step()
    runner.step()
    worker = None
    if during is not None:
        worker = threading.Thread(target=during)
        worker.start()
    start, produced = time.perf_counter(), 0
    for _ in range(tokens):
        produced += sum(len(o.token_ids) for o in runner.step())
        if worker is not None and not worker.is_alive():
            break
    elapsed = time.perf_counter() - start
    if worker is not None:
        worker.join()
    while runner.has_unfinished():
        for seq in list(runner.scheduler.running):
            runner.abort(seq.request_id)
    return produced / elapsed


def median(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-tokens", type=int, default=128)
    add_results_option(ap)
    args = ap.parse_args(argv)

    from lattice_engine.loading import set_threads
    set_threads(args.threads)
    engine = Engine.load(args.model, quant=args.quant)
    for i in range(4):
        engine.adapters.put(random_adapter(engine.model, f"a{i}", args.rank, i))
    rows = {}

    base1 = median(lambda: decode_speed(engine, [None], args.tokens), args.repeats)
    with1 = median(lambda: decode_speed(engine, ["a0"], args.tokens), args.repeats)
    rows["one_stream"] = {"tok_s": with1, "peer_tok_s": base1, "ratio": with1 / base1}
    print(f"1 stream: {with1:.2f} tok/s with a rank-{args.rank} adapter, {base1:.2f} "
          f"without: {with1 / base1:.3f}x (target >= 0.9)")

    base8 = median(lambda: decode_speed(engine, [None] * 8, args.tokens), args.repeats)
    mix8 = median(lambda: decode_speed(engine, [f"a{i % 4}" for i in range(8)], args.tokens),
                  args.repeats)
    rows["eight_streams_four_adapters"] = {"tok_s": mix8, "peer_tok_s": base8,
                                           "ratio": mix8 / base8}
    print(f"8 streams, 4 adapters: {mix8:.2f} tok/s, without adapters {base8:.2f}: "
          f"{mix8 / base8:.3f}x (target >= 0.85)")

    rng = np.random.default_rng(0)
    example = rng.integers(0, engine.model.config.vocab_size, args.train_tokens).tolist()
    engine.adapters.train("a1", example[:8], {"kind": "adamw", "lr": 1e-4})  # float view

    def prefill() -> float:
        cache = engine.model.make_cache(batch=1, capacity=args.train_tokens)
        t = time.perf_counter()
        engine.model.forward(np.asarray([example]), cache)
        return time.perf_counter() - t

    def step() -> float:
        t = time.perf_counter()
        engine.adapters.train("a1", example, {"kind": "adamw", "lr": 1e-4})
        return time.perf_counter() - t

    prefill_s = median(prefill, args.repeats)
    train_s = median(step, args.repeats)
    timing = {}

    def train():
        t = time.perf_counter()
        engine.adapters.train("a1", example, {"kind": "adamw", "lr": 1e-4})
        timing["during"] = time.perf_counter() - t

    streams = [f"a{i % 4}" for i in range(8)]
    alone = decode_speed(engine, streams, args.tokens)
    during = decode_speed(engine, streams, 10_000, during=train)
    rows["adapt_step"] = {"seconds": train_s, "prefill_seconds": prefill_s,
                          "ratio_to_prefill": train_s / prefill_s,
                          "seconds_while_decoding": timing.get("during"),
                          "tokens": args.train_tokens, "decode_tok_s_during": during,
                          "decode_tok_s_alone": alone, "decode_ratio": during / alone}
    print(f"adapt_step on {args.train_tokens} tokens: {train_s:.2f} s alone (target < 2), "
          f"{train_s / prefill_s:.2f}x a prefill of them ({prefill_s:.2f} s), "
          f"{timing.get('during', float('nan')):.2f} s beside 8 streams, which kept "
          f"{during:.2f} of {alone:.2f} tok/s: {during / alone:.3f}x (target >= 0.5)")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (timings on a shared "
          f"machine are distorted by its load)")
    emit({"model": args.model, "quant": args.quant, "threads": args.threads,
          "rank": args.rank, "load_average": list(load), **rows}, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
