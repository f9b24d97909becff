"""Speculative decoding benchmark: plain vs n-gram vs draft-model decoding, at T=0 and
T=0.7, 1 and 8 streams, with llama.cpp's prompt lookup as the peer.

    python bench/spec_decode.py --model qwen2.5-coder-1.5b --quant q8_0 \\
        --draft qwen2.5-coder-0.5b --draft-quant q8_0 [--tokens 256] [--streams 1,8]
    python bench/spec_decode.py --model smollm2-135m --quick        # smoke run
    python bench/spec_decode.py --model qwen3_5 [--checkpoint DIR] [--quant q8_0]

`--model qwen3_5` measures what decides whether Qwen3.5 self-drafting pays, at the 0.8B
shape on the random-weight checkpoint of scripts/make_qwen3_5_checkpoint.py (default
$LATTICE_HOME/bench/qwen3_5-0.8b-random; random weights make acceptance meaningless but
costs honest): after a 64-token prompt, the time of one plain decode step and of one
verify step of k + 1 tokens (k = 1 .. 4: the forward over k + 1 rows keeping what a
rollback needs, the lm_head over them, the rollback to one kept row), under continuous
batching (the fused C step, `lk_qwen35_step_paged_trail`) and for one request over the
dense cache (plain: the fused step; verify: the multi-row fused step `lk_qwen35_step_rows`;
plain and verify timed round-robin so that both see the same load), of one MTP draft token
(the head's layer and the shared lm_head) and of one `self` draft token (the
linear-attention blocks and the lm_head), each also over a --draft-vocab prefix of the
lm_head (the drafters' draft_vocab option); medians of --runs. From those costs, the break-even acceptance rate a
for each k: the a at which (1 + a + ... + a^k) tokens per (verify + k drafts) equal one
token per plain step, and the speedup a 60% acceptance rate would give.

Two prompt sets, 8 chat prompts each: input-grounded ones (edit or rewrite a given code
file, summarize a passage quoting it: the n-gram drafter's case) and code-completion
ones (the draft model's case). Every configuration runs the same prompts through the
continuous-batching runner (the serving path; 1 stream: one request at a time, 8: all at
once), max --tokens new tokens each, stopping at end of sequence as a user's request would.

Reported per configuration: decode tok/s (tokens after each request's first, over the
time from the first first-token to the last finish: the aggregate a server delivers; with
--rounds N, plain and speculative runs alternate N times and each rate is the median), the
speculation counters (acceptance rate, tokens per verify, draft and verify seconds), and at
T=0 whether every output equals plain decoding's. Ratios: each method over plain at the
same T and streams; lattice's n-gram over llama.cpp's `LlamaPromptLookupDecoding` (same
GGUF file and prompts; 1 stream, T=0, the peer run in this process when llama-cpp-python
is installed in --peer-python, run as a subprocess; --peer-gguf names the file when
--model is not a GGUF or catalog name).
Prints one line per configuration and, last, one JSON row with provenance.

Timings on a shared machine are distorted by its load (the row records the load average);
correctness (equal outputs at T=0) is not.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the peer worker runs elsewhere
from provenance import add_results_option, emit  # noqa: E402  (bench/, next to this file)

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"

CODE_FILES = [
    '''def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            name, score = line.strip().split(",")
            rows.append((name, int(score)))
    return rows


def best(rows, n):
    rows = sorted(rows, key=lambda r: r[1], reverse=True)
    return rows[:n]
''',
    '''class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        return self.items[-1]
''',
    '''def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def fib_list(n):
    return [fib(i) for i in range(n)]
''',
    '''import json

def read_config(path):
    with open(path) as f:
        config = json.load(f)
    if "name" not in config:
        raise ValueError("config has no name")
    config.setdefault("retries", 3)
    config.setdefault("timeout", 10)
    return config
''',
    '''def merge(a, b):
    out = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out
''',
]

EDITS = ["Add type hints to this code and print the whole file:",
         "Rename every variable to a more descriptive name and print the whole file:",
         "Add a docstring to every function and print the whole file:",
         "Fix any bug you find and print the whole file unchanged otherwise:",
         "Print this file again with comments added above each block:"]

COMPLETIONS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th prime number.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a Python function that parses a CSV line with quoted fields.",
    "Write a Python function that flattens a nested list.",
    "Write a Python function that computes the edit distance of two strings.",
    "Write a Python function that groups words by their anagram class.",
    "Write a Python function that reads a file and counts word frequencies.",
]


def passages(n: int, chars: int = 900) -> list[str]:
    text = WIKITEXT.read_text(encoding="utf-8") if WIKITEXT.exists() else ""
    paras = [p.strip() for p in text.split("\n \n") if len(p.strip()) > chars // 2]
    return [p[:chars] for p in paras[10:10 + n]]


def prompt_sets() -> dict[str, list[list[dict]]]:
    grounded = [[{"role": "user", "content": f"{EDITS[i]}\n```python\n{CODE_FILES[i]}```"}]
                for i in range(5)]
    grounded += [[{"role": "user", "content": "Summarize this passage in three sentences, "
                   f"quoting its key phrases verbatim:\n\n{p}"}] for p in passages(3)]
    completion = [[{"role": "user", "content": c}] for c in COMPLETIONS]
    return {"grounded": grounded, "completion": completion}


def run_lattice(engine, prompts, speculation, temperature: float, streams: int,
                tokens: int, opts) -> dict:
    """Run the prompts through a fresh batch runner; returns outputs and decode tok/s."""
    from lattice_engine.batching import BatchRunner
    runner = BatchRunner(engine.model, engine.tokenizer, engine.plugin_manager.registry, opts,
                         variant=engine.model_variant)
    outputs, decoded, window = [], 0, 0.0
    for start in range(0, len(prompts), streams):
        group = prompts[start:start + streams]
        ids = []
        for i, messages in enumerate(group):
            params = engine.sampling.with_overrides(temperature=temperature, max_tokens=tokens,
                                                    seed=start + i)
            seq = runner.make_sequence(engine.prompt_ids(messages=messages), params,
                                       speculation=speculation)
            runner.enqueue(seq)
            ids.append(seq.request_id)
        got = {i: [] for i in ids}
        first, last = {}, {}
        while runner.has_unfinished():
            for out in runner.step():
                now = time.perf_counter()
                if out.token_ids and out.request_id not in first:
                    first[out.request_id] = now
                got[out.request_id] += out.token_ids
                if out.finished:
                    last[out.request_id] = now
        outputs += [got[i] for i in ids]
        decoded += sum(max(len(got[i]) - 1, 0) for i in ids)
        if first:
            window += max(last.values()) - min(first.values())
    return {"outputs": outputs, "tokens": decoded,
            "decode_tok_s": decoded / window if window > 0 else 0.0}


def run_llama_cpp(gguf: str, prompts, tokens: int, threads: int, k: int, lookup: bool) -> dict:
    """llama.cpp (llama-cpp-python) on the same prompt token ids (lattice's chat template
    rendering; create_chat_completion crashed in 0.3.36), 1 stream, T=0, plain or with
    LlamaPromptLookupDecoding(num_pred_tokens=k); decode tok/s after the first token."""
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:
        return {"error": f"llama-cpp-python is not installed ({exc})"}
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=4096, n_threads=threads,
                          n_threads_batch=threads, verbose=False,
                          draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k)
                          if lookup else None)
    decoded, window = 0, 0.0
    for ids in prompts:
        first = end = None
        n = 0
        llm.reset()
        for chunk in llm.create_completion(ids, max_tokens=tokens, temperature=0.0,
                                           stream=True):
            delta = chunk["choices"][0]["text"]
            if delta:
                now = time.perf_counter()
                first = first or now
                end = now
                n += 1
        if first is not None:
            decoded += n - 1
            window += end - first
    return {"decode_tok_s": decoded / window if window > 0 else 0.0, "tokens": decoded,
            "note": "tokens counted as streamed chunks"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalog name or path")
    parser.add_argument("--quant", default=None, help="quant method (default: as stored)")
    parser.add_argument("--draft", default=None, help="draft model (catalog name or path); "
                        "without it the draft-model rows are skipped")
    parser.add_argument("--draft-quant", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--k", type=int, default=4, help="num_draft_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-gguf", default=None)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="python with llama-cpp-python installed (default: this one)")
    parser.add_argument("--peer-job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None,
                        help="--model qwen3_5: the 0.8B-shape checkpoint folder")
    parser.add_argument("--runs", type=int, default=9, help="--model qwen3_5: timed runs")
    parser.add_argument("--draft-vocab", type=int, default=32768,
                        help="--model qwen3_5: also time drafts over the first N token ids "
                             "(the drafters' draft_vocab option)")
    parser.add_argument("--methods", default="ngram,draft_model",
                        help="drafters to run (draft_model needs --draft)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="plain and speculative runs alternated this many times per "
                             "configuration (each speculative run with a fresh drafter); "
                             "tok/s are medians over the rounds")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 prompts per set, 24 tokens, 1 and 2 streams")
    add_results_option(parser)
    args = parser.parse_args()
    if args.peer_job:  # the llama.cpp worker (see peer_worker)
        job = json.loads(args.peer_job)
        print(json.dumps(run_llama_cpp(job["gguf"], job["prompts"], job["tokens"],
                                       job["threads"], job["k"], job["lookup"])))
        return 0

    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    from lattice_engine.loading import set_threads
    if args.model == "qwen3_5":
        set_threads(args.threads)
        return bench_qwen3_5(args)
    from lattice_engine.speculative import Speculation, SpeculativeOptions

    set_threads(args.threads)
    sets = prompt_sets()
    streams = [int(s) for s in args.streams.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    if args.quick:
        sets = {k: v[:2] for k, v in sets.items()}
        args.tokens, streams = 24, [1, 2]
    engine = Engine.load(args.model, quant=args.quant)
    opts = BatchingOptions(kv_cache_tokens=16384, max_running=max(streams))
    methods = {"ngram": ("grounded", SpeculativeOptions("ngram", args.k)),
               "draft_model": ("completion", SpeculativeOptions(
                   "draft_model", args.k, options={"model": args.draft,
                                                   **({"quant": args.draft_quant}
                                                      if args.draft_quant else {})}))}
    wanted = args.methods.split(",")
    unknown = sorted(set(wanted) - set(methods))
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: unknown; choose from "
                     f"{', '.join(methods)}")
    if not args.draft:
        del methods["draft_model"]
    methods = {k: v for k, v in methods.items() if k in wanted}
    rows = []
    for method, (set_name, spec_opts) in methods.items():
        prompts = sets[set_name]
        for temperature in temps:
            for n in streams:
                plain_rates, spec_rates, equal = [], [], True
                for _ in range(max(1, args.rounds)):  # alternated: both see the same load
                    plain = run_lattice(engine, prompts, None, temperature, n, args.tokens,
                                        opts)
                    spec = Speculation.build(engine.plugin_manager.registry, spec_opts,
                                             engine.model, engine.tokenizer)
                    got = run_lattice(engine, prompts, spec, temperature, n, args.tokens, opts)
                    plain_rates.append(plain["decode_tok_s"])
                    spec_rates.append(got["decode_tok_s"])
                    equal = equal and got["outputs"] == plain["outputs"]
                plain_tok_s = statistics.median(plain_rates)
                spec_tok_s = statistics.median(spec_rates)
                row = {"method": method, "prompts": set_name, "temperature": temperature,
                       "streams": n, "plain_tok_s": round(plain_tok_s, 2),
                       "spec_tok_s": round(spec_tok_s, 2),
                       "ratio": round(spec_tok_s / plain_tok_s, 3) if plain_tok_s else None,
                       "rounds": [[round(p, 2), round(s, 2)]
                                  for p, s in zip(plain_rates, spec_rates)],
                       "stats": {k: round(v, 4) if isinstance(v, float) else v
                                 for k, v in spec.stats.as_dict().items()}}
                if temperature == 0:
                    row["equal_to_plain"] = equal
                rows.append(row)
                print(f"{method:11s} T={temperature:<4} streams={n}: plain "
                      f"{row['plain_tok_s']:7.2f} tok/s, speculative {row['spec_tok_s']:7.2f} "
                      f"tok/s (x{row['ratio']}), acceptance "
                      f"{spec.stats.acceptance_rate:.2f}, tokens/verify "
                      f"{spec.stats.mean_accepted:.2f}"
                      + (f", equal to plain: {row['equal_to_plain']}" if temperature == 0
                         else ""), flush=True)
    peer = {}
    gguf = args.peer_gguf or _gguf_path(args.model)
    if not args.no_peer and gguf:
        prompts = [engine.prompt_ids(messages=m) for m in sets["grounded"]]
        plain = peer_worker(args, gguf, prompts, lookup=False)
        lookup = peer_worker(args, gguf, prompts, lookup=True)
        ours = next((r for r in rows if r["method"] == "ngram" and r["temperature"] == 0
                     and r["streams"] == 1), None)
        peer = {"gguf": gguf, "llama_cpp_plain": plain, "llama_cpp_prompt_lookup": lookup}
        if ours and lookup.get("decode_tok_s"):
            peer["lattice_ngram_over_llama_cpp_lookup"] = round(
                ours["spec_tok_s"] / lookup["decode_tok_s"], 3)
        print(f"llama.cpp   T=0    streams=1: plain {plain.get('decode_tok_s', 0):7.2f} tok/s, "
              f"prompt lookup {lookup.get('decode_tok_s', 0):7.2f} tok/s; lattice ngram / "
              f"llama.cpp lookup: {peer.get('lattice_ngram_over_llama_cpp_lookup')}"
              + (f" ({plain['error']})" if "error" in plain else ""), flush=True)
    emit({"bench": "spec_decode", "model": args.model, "quant": args.quant,
          "draft": args.draft, "draft_quant": args.draft_quant, "tokens": args.tokens,
          "k": args.k, "rows": rows, "peer": peer, "load_average": os.getloadavg()},
         args.results, args.threads)
    return 0


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one verify of k drafts emits when each draft is kept with probability
    `rate` given the ones before it: 1 + rate + ... + rate^k."""
    return sum(rate ** j for j in range(k + 1))


def break_even(plain: float, verify: float, draft: float, k: int) -> float | None:
    """The acceptance rate at which speculation with k drafts equals plain decoding
    (bisection on the monotone expected-tokens curve); None when even rate 1 loses."""
    cost = verify + k * draft
    if (k + 1) / cost < 1 / plain:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if expected_tokens(mid, k) / cost >= 1 / plain:
            hi = mid
        else:
            lo = mid
    return hi


def bench_qwen3_5(args) -> int:
    """Step costs of Qwen3.5 self-drafting at the 0.8B shape (see the module doc)."""

    import numpy as np

    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.speculative import DraftRequest
    from lattice_spec_decode.self_draft import SelfDrafter, head_prefix
    from qwen3_5 import default_model, token_ids

    path = args.checkpoint or str(default_model())
    quant = args.quant or "q8_0"
    model = load(path, quant=QuantSpec(quant)).model
    vocab = model.config.vocab_size
    prompt = np.array([token_ids(vocab, 64, seed=1)], np.int64)
    nxt = token_ids(vocab, 8, seed=2)
    runs = max(3, args.runs)

    def timed(fn, setup=None) -> float:
        for _ in range(2):  # warm-up (pages the weights in, builds the fused step)
            setup and setup()
            fn()
        times = []
        for _ in range(runs):
            setup and setup()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def interleaved(fns: dict) -> dict:
        """{name: (fn, setup)} timed round-robin, one run of each per round, medians: on a
        loaded machine every candidate sees the same load, so their ratios hold."""
        for fn, setup in fns.values():
            for _ in range(2):
                setup and setup()
                fn()
        times = {name: [] for name in fns}
        for _ in range(runs):
            for name, (fn, setup) in fns.items():
                setup and setup()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        return {name: statistics.median(t) for name, t in times.items()}

    cache = model.make_cache(1, capacity=512)
    model.forward(prompt, cache)
    base = cache.snapshot()

    def restore():  # untimed: copying the 18 MB of states back is not part of a step
        cache.restore(base)

    def plain_step():
        model.forward(np.array([nxt[:1]], np.int64), cache, last_only=True)

    def verify_step(rows: int):
        def run():
            cache.record_next()
            hidden = model.hidden_states(np.array([nxt[:rows]], np.int64), cache)
            model.logits(hidden[0])
            cache.truncate(base.offset + 1)
        return run

    got = interleaved({0: (plain_step, restore),
                       **{k: (verify_step(k + 1), restore) for k in range(1, 5)}})
    dense_plain = got.pop(0)
    dense_verify = got

    # continuous batching (the serving path): one sequence in the paged cache; plain is
    # the fused C step of one row, a verify the fused step of k + 1 rows that keeps what a
    # rollback needs (lk_qwen35_step_paged_trail) and the rollback to one kept row (a
    # replay of it on the delta states)
    from lattice_engine.cache import SequenceBlocks
    from lattice_engine.models.paged_forward import PagedBatch
    pcache = model.make_paged_cache(num_blocks=16, block_size=16, max_sequences=1)
    seq = SequenceBlocks()
    pcache.reserve(seq, 80)
    seq.state_slot = pcache.recurrent.acquire()
    model.forward_paged(PagedBatch.build(pcache, [(seq, prompt[0].tolist(), 0, True)]), pcache)
    saved = [a[seq.state_slot].copy() for a in pcache.recurrent.arrays]

    def reset():
        for a, b in zip(pcache.recurrent.arrays, saved):
            a[seq.state_slot] = b

    def paged_plain():
        model.forward_paged(PagedBatch.build(pcache, [(seq, nxt[:1], 64, True)]), pcache)

    def paged_verify(rows: int):
        def run():
            model.forward_paged(PagedBatch.build(pcache, [(seq, nxt[:rows], 64, rows)]),
                                pcache)
            pcache.recurrent.rollback(seq.state_slot, 1)
        return run

    got = interleaved({0: (paged_plain, reset),
                       **{k: (paged_verify(k + 1), reset) for k in range(1, 5)}})
    plain = got.pop(0)
    verify = got
    rows = {"plain_step_ms": round(plain * 1e3, 3),
            "verify_step_ms": {k + 1: round(v * 1e3, 3) for k, v in verify.items()},
            "fused_verify": model._decode_step() is not None,
            "dense_plain_step_ms": round(dense_plain * 1e3, 3),
            "dense_verify_step_ms": {k + 1: round(v * 1e3, 3)
                                     for k, v in dense_verify.items()}}
    drafts = {}
    small = head_prefix(model, args.draft_vocab) if args.draft_vocab < vocab else None
    if len(model.mtp_weights):
        head = model.mtp_head()
        hcache = head.make_cache()
        hid = np.random.default_rng(0).standard_normal((1, model.config.hidden_size))
        head.hidden([nxt[0]], hid.astype(np.float32), [63], hcache)

        def mtp_token(rows=None):
            def run():
                hcache.drop_from(64)
                out = head.hidden([nxt[1]], hid.astype(np.float32), [64], hcache)
                int(np.argmax(head.logits(out, rows)[0]))
            return run
        drafts["mtp"] = timed(mtp_token())
        if small is not None:
            drafts[f"mtp/{args.draft_vocab}"] = timed(mtp_token(small))
    cache.restore(base)
    self_drafter = SelfDrafter(model)
    self_small = SelfDrafter(model, args.draft_vocab) if small is not None else None
    req = DraftRequest("bench", prompt[0].tolist() + nxt[:1], None, True,
                       np.random.default_rng(0), vocab)
    req.recurrent = [(c[0], d[0]) for c, d in zip(cache.conv, cache.delta)]
    drafts["self"] = timed(lambda: self_drafter.propose(req, 1))
    if self_small is not None:
        drafts[f"self/{args.draft_vocab}"] = timed(lambda: self_small.propose(req, 1))
    print(f"Qwen3.5 {Path(path).name}, {quant}, {args.threads} threads, medians of {runs} "
          f"(load average {os.getloadavg()[0]:.2f}):")
    print(f"  continuous batching (fused C step{'' if rows['fused_verify'] else ' unavailable'}):")
    print(f"  plain decode step        {plain * 1e3:8.2f} ms")
    for k, v in verify.items():
        print(f"  verify of k+1 = {k + 1} tokens  {v * 1e3:8.2f} ms  ({v / plain:.2f}x plain)")
    print("  one request (dense cache; the verify as one multi-row fused step):")
    print(f"  plain decode step        {dense_plain * 1e3:8.2f} ms")
    for k, v in dense_verify.items():
        print(f"  verify of k+1 = {k + 1} tokens  {v * 1e3:8.2f} ms  ({v / dense_plain:.2f}x "
              f"plain)")
    print("  drafting, against the continuous-batching costs:")
    table = {}
    for name, cost in drafts.items():
        rows[f"{name}_draft_token_ms"] = round(cost * 1e3, 3)
        print(f"  {name:10s} draft token    {cost * 1e3:8.2f} ms  ({cost / plain:.2f}x plain)")
        for k, v in verify.items():
            even = break_even(plain, v, cost, k)
            at60 = expected_tokens(0.6, k) / (v + k * cost) * plain
            table[f"{name}_k{k}"] = {"break_even_acceptance": None if even is None
                                     else round(even, 3), "speedup_at_0.6": round(at60, 3)}
            print(f"    k={k}: break-even acceptance "
                  f"{'never' if even is None else f'{even:.2f}'}, at 60%: {at60:.2f}x plain")
    rows["drafters"] = table
    emit({"bench": "spec_decode_qwen3_5", "checkpoint": Path(path).name, "quant": quant,
          "runs": runs, **rows, "load_average": os.getloadavg()}, args.results, args.threads)
    return 0


def peer_worker(args, gguf: str, prompts, lookup: bool) -> dict:
    """run_llama_cpp in a subprocess of --peer-python (a venv that has llama-cpp-python),
    so each engine runs alone and the peer's threads do not share a process with ours."""
    job = json.dumps({"gguf": gguf, "prompts": prompts, "tokens": args.tokens,
                      "threads": args.threads, "k": args.k, "lookup": lookup})
    out = subprocess.run([args.peer_python, str(Path(__file__).resolve()), "--peer-job", job],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gguf_path(model: str):
    """The GGUF file behind a catalog name or path, or None (an HF folder)."""
    path = Path(model)
    if not path.exists():
        try:
            from lattice_engine.io.catalog import pull
            path = Path(pull(model, quiet=True))
        except Exception:
            return None
    return str(path) if path.suffix == ".gguf" else None


if __name__ == "__main__":
    sys.exit(main())
