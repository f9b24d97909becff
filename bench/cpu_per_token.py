"""CPU time per decoded token, lattice or llama.cpp, one thread: a load-robust probe.

    python bench/cpu_per_token.py lattice PATH.gguf METHOD [--group-size G]
    python bench/cpu_per_token.py llama.cpp PATH.gguf

On a busy machine wall-clock decode speed mostly measures the scheduler (llama.cpp's
threads wait for each other at every barrier when a core is taken away); process CPU time
of one thread per token, 20 tokens after a 4-token prompt, is far less sensitive to that.
It is not a replacement for bench/decode.py on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file

STEPS = 20


def lattice(path: str, method: str, group_size) -> float:
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec
    set_threads(1)
    m = load(path, quant=QuantSpec(method, {}, group_size)).model
    cache = m.make_cache(capacity=64)
    m.forward(np.array([[1, 2, 3, 4]]), cache, last_only=True)
    start = time.process_time()
    for _ in range(STEPS):
        m.forward(np.array([[5]]), cache, last_only=True)
    return (time.process_time() - start) / STEPS


def llama_cpp(path: str) -> float:
    import llama_cpp as lc
    llm = lc.Llama(model_path=path, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    llm.eval([1, 2, 3, 4])
    start = time.process_time()
    for _ in range(STEPS):
        llm.eval([5])
    return (time.process_time() - start) / STEPS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=("lattice", "llama.cpp"))
    p.add_argument("path")
    p.add_argument("method", nargs="?", default="q4_asym")
    p.add_argument("--group-size", type=int, default=None)
    add_results_option(p)
    a = p.parse_args()
    sec = lattice(a.path, a.method, a.group_size) if a.engine == "lattice" else llama_cpp(a.path)
    print(f"{a.engine} {a.path} {a.method if a.engine == 'lattice' else ''}: "
          f"{sec * 1e3:.1f} ms CPU per token (1 thread)")
    emit({"engine": a.engine, "path": a.path,
          "method": a.method if a.engine == "lattice" else None,
          "group_size": a.group_size if a.engine == "lattice" else None,
          "cpu_ms_per_token": round(sec * 1e3, 3), "tokens": STEPS}, a.results, threads=1)


if __name__ == "__main__":
    main()
