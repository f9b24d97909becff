"""Cost of structured output: decode tok/s with a JSON-schema constraint vs without.

    python bench/grammar.py --model qwen2.5-coder-0.5b [--quant q8_0] [--threads 2] [--runs 3]

Both modes decode the same chat prompt greedily with `generate_step`; the constrained one
masks every step's logits with an xgrammar matcher (fill the numpy bitmask, set the
disallowed logits to -inf, accept the sampled token). The schema is a list of at least 40
records (string, bounded integer, enum, array fields), so the grammar cannot finish inside
the measured window and every step is masked. Decode tok/s by the slope method,
(N2 - N1) / (T(N2) - T(N1)), median of --runs, the two modes interleaved so machine load
hits both alike. A replay of the constrained tokens then splits the per-step cost into
xgrammar's bitmask fill and the numpy mask application. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

N1, N2 = 32, 160
RECORD = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"enum": ["Paris", "Berlin", "Tokyo", "Lima", "Cairo"]},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "maxItems": 3}},
          "required": ["name", "age", "city", "tags"]}
SCHEMA = {"type": "array", "items": RECORD, "minItems": 40}
PROMPT = "List forty people with their name, age, city and tags as JSON."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="catalog name or .gguf path")
    parser.add_argument("--quant", default="q8_0", choices=("f32", "f16", "q8_0"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    add_results_option(parser)
    args = parser.parse_args()

    from gguf_variants import variant
    from lattice_engine.generate import generate_step
    from lattice_engine.grammar import GrammarSpec, apply_bitmask, grammar_compiler
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.sampling import SamplingParams, make_sampler

    set_threads(args.threads)
    path = args.model if args.model.endswith(".gguf") else str(variant(args.model, args.quant))
    loaded = load(path, quant=QuantSpec(args.quant))
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    compiler = grammar_compiler(tok, model.vocab_size)
    spec = GrammarSpec.json_schema(SCHEMA)
    compiler.compile(spec)  # compile once, outside the timed runs (a cached schema)
    greedy = SamplingParams(temperature=0)

    def run(n: int, constrained: bool) -> tuple[float, float, list[int]]:
        matcher = compiler.matcher(spec) if constrained else None
        start, cpu = time.perf_counter(), time.process_time()
        tokens = [t for t, _ in generate_step(model, ids, make_sampler(greedy), max_tokens=n,
                                              grammar=matcher)]
        return time.perf_counter() - start, time.process_time() - cpu, tokens

    run(8, True)  # warm-up: page in the weights
    times = {(mode, n): [] for mode in (False, True) for n in (N1, N2)}
    cpu_times = {key: [] for key in times}
    for _ in range(args.runs):
        for n in (N1, N2):
            for mode in (False, True):
                wall, cpu, _ = run(n, mode)
                times[(mode, n)].append(wall)
                cpu_times[(mode, n)].append(cpu)

    def slope(mode: bool, table=times) -> float:
        return (N2 - N1) / (statistics.median(table[(mode, N2)])
                            - statistics.median(table[(mode, N1)]))

    free, constrained = slope(False), slope(True)
    # CPU seconds of this process per token: less disturbed than wall time when other
    # jobs share the cores (both modes use the same kernel threads)
    cpu_ratio = slope(True, cpu_times) / slope(False, cpu_times)
    _, _, tokens = run(N2, True)

    # replay the constrained tokens to time the two halves of masking per step
    matcher = compiler.matcher(spec)
    row = np.zeros(model.vocab_size, dtype=np.float32)
    fill_s, apply_s, accept_s, masked = [], [], [], 0
    for token in tokens:
        t0 = time.perf_counter()
        need = matcher.fill_bitmask()
        t1 = time.perf_counter()
        logits = row.copy()  # generate_step masks a copy: the raw row gives the logprob
        apply_bitmask(logits, matcher.bitmask[0])
        t2 = time.perf_counter()
        matcher.accept(token)
        t3 = time.perf_counter()
        fill_s.append(t1 - t0)
        apply_s.append(t2 - t1)
        accept_s.append(t3 - t2)
        masked += bool(need)
    text = tok.decode(tokens)
    load_avg = os.getloadavg()

    summary = {
        "model": args.model, "quant": args.quant, "threads": args.threads,
        "decode_tok_s_unconstrained": free, "decode_tok_s_json_schema": constrained,
        "ratio": constrained / free, "ratio_cpu_time": cpu_ratio,
        "mask_fill_us": 1e6 * statistics.mean(fill_s),
        "mask_apply_numpy_us": 1e6 * statistics.mean(apply_s),
        "mask_accept_us": 1e6 * statistics.mean(accept_s),
        # the grammar's own work per step against an unconstrained step: a load-robust
        # bound on the ratio (what the slope ratio approaches on a quiet machine)
        "ratio_bound": 1 / (1 + (statistics.mean(fill_s) + statistics.mean(apply_s)
                                 + statistics.mean(accept_s)) * free),
        "masked_steps": masked, "steps": len(tokens), "vocab": model.vocab_size,
        "load_avg_1m": load_avg[0],
    }
    print(f"model {args.model}, quant {args.quant}, {args.threads} threads, file {path}")
    print(f"unconstrained decode  {free:7.1f} tok/s")
    print(f"JSON-schema decode    {constrained:7.1f} tok/s  ({summary['ratio']:.1%} of "
          f"unconstrained; {masked}/{len(tokens)} steps masked)")
    print(f"by CPU time of this process: {cpu_ratio:.1%} of unconstrained")
    print(f"per step: bitmask fill {summary['mask_fill_us']:.0f} us, numpy copy+apply "
          f"{summary['mask_apply_numpy_us']:.0f} us over {model.vocab_size} logits, accept "
          f"{summary['mask_accept_us']:.0f} us; against a {1e3 / free:.1f} ms unconstrained "
          f"step that bounds the ratio at {summary['ratio_bound']:.1%}")
    print(f"constrained output starts: {text[:100]!r}")
    print(f"load average {load_avg[0]:.2f} {load_avg[1]:.2f} {load_avg[2]:.2f}")
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
