"""Where one batched decode step's time goes, at 1 and N streams, without the server.

    python bench/batch_step.py --model qwen2.5-coder-0.5b --quant q8_0 [--streams 1,8]

A `BatchRunner` gets N requests (32-token prompts, temperature 0, ignore_eos); once all
are decoding, --steps steps are timed (the fastest third's median: the machine is
shared; the mean of all, which includes the steps that snapshot recurrent state, is
printed beside it), then one more batch of steps runs under cProfile, whose top entries show the
split between the model's matmuls, attention, Python glue, sampling and detokenizing.
Prints per stream count: ms per step, tokens/s, and the ratio of N streams to 1.

    python bench/batch_step.py --pacing 2000 [--pacing-streams 4]

instead shows the prefill pacer at work without the server: once the streams decode, a
prompt of that many tokens arrives, and every mixed step prints its prefill budget and time
next to the decode-only step (the rise the pacer aims to keep within max_itl_rise).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--quant", default="q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", type=int, default=0, help="top N cProfile entries (0: none)")
    ap.add_argument("--pacing", type=int, default=0, help="long prompt tokens (0: off)")
    ap.add_argument("--pacing-streams", type=int, default=4)
    add_results_option(ap)
    args = ap.parse_args(argv)

    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    from lattice_engine.sampling import SamplingParams

    from lattice_engine.loading import set_threads

    set_threads(args.threads)
    engine = Engine.load(args.model, quant=args.quant, backend="native")
    result = {"model": args.model, "quant": args.quant, "threads": args.threads,
              "load_avg_start": os.getloadavg()[0], "rows": []}
    if args.pacing:
        return pacing(engine, args)
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
        mean_ms = 1e3 * sum(times) / len(times)  # what a server delivers (every step)
        times.sort()
        ms = 1e3 * times[len(times) // 6]  # median of the fastest third
        tok_s = n / (ms / 1e3)
        base = base or tok_s
        print(f"{n} streams: {ms:.2f} ms/step, {tok_s:.1f} tok/s, {tok_s / base:.2f}x  "
              f"(mean step {mean_ms:.2f} ms; load {os.getloadavg()[0]:.2f})", flush=True)
        result["rows"].append({"streams": n, "ms_per_step": round(ms, 3),
                               "mean_ms_per_step": round(mean_ms, 3),
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
    emit(result, args.results, args.threads)
    return 0


def pacing(engine, args) -> int:
    from lattice_engine.batching import BatchingOptions
    from lattice_engine.sampling import SamplingParams

    runner = engine.start_batching(BatchingOptions(max_running=args.pacing_streams + 2))
    params = SamplingParams(temperature=0.0, max_tokens=10 ** 6)
    for i in range(args.pacing_streams):
        prompt = [(1000 + 37 * i + 11 * t) % 20000 for t in range(32)]
        runner.enqueue(runner.make_sequence(prompt, params, ignore_eos=True))
    for _ in range(20):
        runner.step()
    decode = []
    for _ in range(10):
        t0 = time.perf_counter()
        runner.step()
        decode.append(time.perf_counter() - t0)
    t_decode = sorted(decode)[len(decode) // 2]
    print(f"decode-only step {1e3 * t_decode:.1f} ms ({args.pacing_streams} streams)")
    long = runner.make_sequence([(500 + 13 * t) % 20000 for t in range(args.pacing)], params,
                                ignore_eos=True)
    runner.enqueue(long)
    steps = []
    while long.num_generated == 0:
        budget = runner.pacer.budget()
        t0 = time.perf_counter()
        runner.step()
        steps.append(time.perf_counter() - t0)
        print(f"mixed step {len(steps)}: budget {budget} tokens, {1e3 * steps[-1]:.1f} ms "
              f"({steps[-1] / t_decode:.2f}x)", flush=True)
    mean = sum(steps) / len(steps)
    emit({"model": args.model, "quant": args.quant, "threads": args.threads,
          "pacing_streams": args.pacing_streams, "long_prompt_tokens": args.pacing,
          "decode_ms": round(1e3 * t_decode, 2), "mixed_steps": len(steps),
          "mixed_mean_ms": round(1e3 * mean, 2), "rise": round(mean / t_decode, 3),
          "load_avg": os.getloadavg()[0]}, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
