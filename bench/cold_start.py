"""Cold start: from a fresh process to the first generated token, lattice next to llama.cpp
(llama-cpp-python) on the same GGUF file, same run.

    python bench/cold_start.py [--model qwen2.5-coder-0.5b] [--runs 3] [--threads 2]
                               [--quant METHOD]

Each run is a new Python process that imports the engine, loads the model as a user's
first command would (lattice: `Engine.load` with --quant, default as stored, so a Q4_K_M
file runs as q8_0; llama.cpp: `Llama(model_path)` with its defaults, which map the file)
and greedily generates one token from a short prompt. Reports the median wall time of the
runs, each engine's peak RSS, and the ratio lattice / llama.cpp of both. The page cache
holds the file for every run after the first (a warm-up run of each engine is not timed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from provenance import add_results_option, emit  # bench/, next to this file

PROMPT = "def fibonacci(n):"

LATTICE = """
import json, resource, sys, time
t0 = time.perf_counter()
from lattice_engine.engine import Engine
from lattice_engine.loading import set_threads
set_threads({threads})
engine = Engine.load({model!r}, quant={quant!r})
loaded = time.perf_counter()
out = engine.generate({prompt!r}, max_tokens=1, temperature=0)
done = time.perf_counter()
print(json.dumps({{"load_s": loaded - t0, "first_token_s": done - t0,
                  "quant": engine.loaded.quant,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

LLAMA_CPP = """
import json, resource, time
t0 = time.perf_counter()
import llama_cpp
llm = llama_cpp.Llama(model_path={path!r}, n_ctx=512, n_threads={threads},
                      n_threads_batch={threads}, verbose=False)
loaded = time.perf_counter()
llm.create_completion({prompt!r}, max_tokens=1, temperature=0)
done = time.perf_counter()
print(json.dumps({{"load_s": loaded - t0, "first_token_s": done - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def run(code: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got["wall_s"] = wall  # interpreter start included: what a user waits for
    return got


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalog name or .gguf")
    parser.add_argument("--quant", default=None, help="lattice quant method (default: as "
                                                      "stored)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    add_results_option(parser)
    args = parser.parse_args()

    from lattice_engine.io.catalog import resolve
    path = str(resolve(args.model))
    if not path.endswith(".gguf"):
        parser.error(f"{path} is not a GGUF file: llama.cpp needs one")
    ours_code = LATTICE.format(threads=args.threads, model=args.model, quant=args.quant,
                               prompt=PROMPT)
    peer_code = LLAMA_CPP.format(threads=args.threads, path=path, prompt=PROMPT)
    results = {}
    for name, code in (("lattice", ours_code), ("llama.cpp", peer_code)):
        run(code)  # warm-up: the file into the page cache
        runs = []
        for _ in range(args.runs):  # alternated engines would share the page cache the same
            got = run(code)
            if "error" in got:
                results[name] = got
                break
            runs.append(got)
        else:
            results[name] = {"wall_s": median_of(runs, "wall_s"),
                             "load_s": median_of(runs, "load_s"),
                             "first_token_s": median_of(runs, "first_token_s"),
                             "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                             **({"quant": runs[0]["quant"]} if runs[0].get("quant") else {})}
    ours, peer = results["lattice"], results["llama.cpp"]
    print(f"{'engine':<12}{'wall s':>9}{'load s':>9}{'peak RSS MB':>14}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<12} error: {r['error']}")
        else:
            print(f"{name:<12}{r['wall_s']:>9.2f}{r['load_s']:>9.2f}{r['peak_rss_mb']:>14.0f}")
    row = {"bench": "cold_start", "model": args.model, "file": path, "quant": args.quant,
           "runs": args.runs, "threads": args.threads, "lattice": ours, "llama_cpp": peer}
    if "error" not in ours and "error" not in peer:
        row["wall_ratio"] = round(ours["wall_s"] / peer["wall_s"], 3)
        row["rss_ratio"] = round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3)
        print(f"lattice / llama.cpp: wall {row['wall_ratio']}x, peak RSS {row['rss_ratio']}x")
    emit(row, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
