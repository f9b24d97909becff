"""Where one batched decode step's time goes, at 1 and N streams, without the server.

    python bench/batch_step.py --model qwen2.5-coder-0.5b --quant q8_0 [--streams 1,8]

A `BatchRunner` gets N requests (32-token prompts, temperature 0, ignore_eos); once all
are decoding, --steps steps are timed (the fastest third's median: the machine is
shared), then one more batch of steps runs under cProfile, whose top entries show the
split between the model's matmuls, attention, Python glue, sampling and detokenizing.
Prints per stream count: ms per step, tokens/s, and the ratio of N streams to 1.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", type=int, default=0, help="top N cProfile entries (0: none)")
    args = ap.parse_args(argv)

    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    from lattice_engine.sampling import SamplingParams

    from lattice_engine.loading import set_threads

    set_threads(args.threads)
    engine = Engine.load(args.model, quant=args.quant, backend="native")
    result = {"model": args.model, "quant": args.quant, "threads": args.threads,
              "load_avg_start": os.getloadavg()[0], "rows": []}
    base = None
    for n in [int(s) for s in args.streams.split(",")]:
        runner = engine.start_batching(BatchingOptions(max_running=max(n, 1) + 2))
        params = SamplingParams(temperature=0.0, max_tokens=10 ** 6)
        for i in range(n):
            prompt = [(1000 + 37 * i + 11 * t) % 20000 for t in range(32)]
            runner.enqueue(runner.make_sequence(prompt, params, ignore_eos=True))
        while any(s.num_generated == 0 for s in runner.scheduler.running) or runner.num_waiting():
            runner.step()
        for _ in range(3):
            runner.step()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t0)
        times.sort()
        ms = 1e3 * times[len(times) // 6]  # median of the fastest third
        tok_s = n / (ms / 1e3)
        base = base or tok_s
        print(f"{n} streams: {ms:.2f} ms/step, {tok_s:.1f} tok/s, {tok_s / base:.2f}x  "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)
        result["rows"].append({"streams": n, "ms_per_step": round(ms, 3),
                               "tok_s": round(tok_s, 2)})
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.steps):
                runner.step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
        for s in list(runner.scheduler.running):
            runner.abort(s.request_id)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
