"""4-bit quantization quality and speed: lattice's q4_sym / q4_asym against llama.cpp's
Q4_0 / Q4_1, all made from the same float32 weights (bench/gguf_variants.py's f32.gguf).

    python bench/quant_quality.py recon  [--models smollm2-135m qwen2.5-coder-0.5b]
    python bench/quant_quality.py ppl    --model qwen2.5-coder-0.5b --engine lattice \
        --quant q4_asym --group-size 32                  (one row, appended to --results)
    python bench/quant_quality.py ppl    --model qwen2.5-coder-0.5b --engine llama.cpp --quant q4_1
    python bench/quant_quality.py ppl    --quant q4_sym --quarot online     (lattice-quarot)
    python bench/quant_quality.py ppl    --quant q8_0 --kv-cache f16 \
        --results bench/results/kv_cache_32k.jsonl       (the KV cache's cost)
    python bench/quant_quality.py ppl    --quant q4_sym --source .../q4_0.gguf \
        --override model.embed_tokens.weight=q4_sym_g32   (lattice on llama.cpp's own blocks)
    python bench/quant_quality.py speed  --model qwen2.5-coder-0.5b [--threads 2 --runs 3]
    python bench/quant_quality.py rotation-speed [--modes online inputs]  (QuaRot's online cost)
    python bench/quant_quality.py table  [--results FILE]

recon: relative RMS error ||W_q - W|| / ||W|| of every method and group size over all
linear weights of each model, and on a heavy-tailed synthetic matrix (Student-t, 3 degrees
of freedom). ppl: the recipe of README.md's "How it is measured" (WikiText-2 test, first
32,768 tokens, window 512, stride 256; windows from lattice_engine/eval/perplexity.py) with
the token ids lattice's tokenizer gives; llama.cpp scores those same ids
(llama-cpp-python, logits of every position, one eval per window). speed: decode and
prefill as bench/decode.py measures them, lattice q4_asym g32 against llama.cpp Q4_1 and
q4_sym g32 (or q4_0, ggml's rule) against Q4_0, every engine in its own process, in one run.
Needs the plugin (pip install ./plugins/quant_q4) and llama-cpp-python. Run the ppl rows
one at a time under `nice`: each is minutes of 2-core time.

Rows carry their provenance (bench/provenance.py) and go to --results, by default the
committed files: ppl rows to results/quant_quality_32k.jsonl (named by --max-tokens, as
perplexities over different lengths do not compare), speed and rotation-speed rows to
results/quant_speed.jsonl; `table` reads the 32k file.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIKITEXT = ROOT / "data" / "wikitext-2" / "wiki.test.raw"
RESULTS = HERE / "results"
SPEED_RESULTS = RESULTS / "quant_speed.jsonl"
METHODS = ("q4_sym", "q4_asym")
GROUPS = (32, 64, 128)
LLAMA_PEER = {"q4_sym": "q4_0", "q4_asym": "q4_1", "q4_0": "q4_0"}  # q4_0: ggml's own rule

sys.path.insert(0, str(HERE))

from provenance import append_jsonl, provenance  # noqa: E402


def ppl_results(max_tokens: int) -> Path:
    """The default file of ppl rows over `max_tokens` tokens: quant_quality_32k.jsonl for
    the 32,768 of the committed table."""
    size = f"{max_tokens // 1024}k" if max_tokens % 1024 == 0 else f"{max_tokens}t"
    return RESULTS / f"quant_quality_{size}.jsonl"


def append_result(path: Path, row: dict, threads: int) -> dict:
    """`row` with its provenance, appended to `path` (atomically); returns it."""
    row = {**row, "provenance": provenance(threads)}
    append_jsonl(path, row)
    return row


# ---- reconstruction ---------------------------------------------------------------------

def relative_rms(fmt, w: np.ndarray) -> tuple[float, float]:
    """(sum of squared error, sum of squares) of w through fmt, row slices at a time."""
    err = ref = 0.0
    step = max(1, (1 << 21) // w.shape[1])
    for i in range(0, w.shape[0], step):
        part = np.ascontiguousarray(w[i:i + step], dtype=np.float32)
        back = fmt.to_float(fmt.quantize(part), part.shape[1])
        err += float(np.sum((back.astype(np.float64) - part) ** 2))
        ref += float(np.sum(part.astype(np.float64) ** 2))
    return err, ref


def cmd_recon(args) -> int:
    from gguf_variants import variant
    from lattice_engine.io.gguf_reader import load_gguf
    from lattice_engine.plugins import get_plugin_manager

    formats = get_plugin_manager().registry.items["weight_formats"]
    names = ["q8_0"] + [f"{m}_g{g}" for m in METHODS for g in GROUPS] + ["q4_0"]
    rows = {}
    for model in args.models:
        ckpt = load_gguf(variant(model, "f32"))
        sums = {n: [0.0, 0.0, 0, 0] for n in names}  # err, ref, weights covered, total
        for name, load in ckpt.tensors.items():
            shape = ckpt.shapes[name]
            # the matrices q4 applies to: the linear layers
            if len(shape) != 2 or not name.startswith("model.layers."):
                continue
            w = load()
            for n in names:
                sums[n][3] += w.size
                if shape[1] % formats[n].block_size:
                    continue  # the method keeps such rows in q8_0; not counted here
                e, r = relative_rms(formats[n], w)
                sums[n][0] += e
                sums[n][1] += r
                sums[n][2] += w.size
        rows[model] = {n: math.sqrt(e / r) for n, (e, r, _, _) in sums.items()}
        partial = {n: c / t for n, (_, _, c, t) in sums.items() if c < t}
        if partial:
            print(f"{model}: only part of the linear weights fit the group: "
                  + ", ".join(f"{n} {f:.0%}" for n, f in partial.items()))
    rng = np.random.default_rng(0)
    t3 = rng.standard_t(3, size=(2048, 2048)).astype(np.float32)
    rows["student-t(3) 2048x2048"] = {n: math.sqrt(np.divide(*relative_rms(formats[n], t3)))
                                      for n in names}
    print("relative RMS error ||W_q - W|| / ||W|| (linear weights)")
    print("| weights | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for model, r in rows.items():
        print(f"| {model} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |")
    print(json.dumps({"recon": rows, "provenance": provenance()}))
    return 0


# ---- perplexity -------------------------------------------------------------------------

def token_ids(model: str, max_tokens: int) -> np.ndarray:
    """WikiText-2 ids by lattice's tokenizer of the float32 GGUF (shared by both engines)."""
    from gguf_variants import variant
    from lattice_engine.io.gguf_reader import load_gguf
    from lattice_engine.tokenizer import TextTokenizer

    ckpt = load_gguf(variant(model, "f32"))
    tok = TextTokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.generation_config,
                        ckpt.config)
    ids = tok.encode(WIKITEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return np.asarray(ids[:max_tokens], dtype=np.int64)


CHECKPOINTS = (4096, 8192, 16384)  # partial results: the same windows as a shorter run


class Scorer:
    """Sliding-window NLL sums with partial perplexities at CHECKPOINTS: the windows up to
    a checkpoint are exactly those of a run over that many tokens."""

    def __init__(self, ids: np.ndarray, window: int, stride: int):
        from lattice_engine.eval.perplexity import windows
        self.ids, self.spans = ids, list(windows(ids.size, window, stride))
        self.nll, self.scored, self.partial = 0.0, 0, {}
        self.start = time.perf_counter()

    def add(self, i: int, w, logits: np.ndarray) -> None:
        from lattice_engine.sampling import log_softmax
        targets = self.ids[w.score_from:w.end]
        self.nll -= float(log_softmax(logits)[np.arange(targets.size), targets].sum())
        self.scored += targets.size
        if w.end in CHECKPOINTS:
            self.partial[w.end] = math.exp(self.nll / self.scored)
            print(f"partial ppl over the first {w.end} tokens: {self.partial[w.end]:.4f}",
                  file=sys.stderr, flush=True)
        report_progress(i + 1, len(self.spans))

    def result(self) -> dict:
        return {"ppl": math.exp(self.nll / self.scored), "nll": self.nll / self.scored,
                "tokens": int(self.ids.size), "scored": self.scored,
                "windows": len(self.spans), "window": self.spans[0].end - self.spans[0].begin,
                "partial_ppl": self.partial,
                "seconds": round(time.perf_counter() - self.start, 3)}


def report_progress(done: int, total: int) -> None:
    if done % 16 == 0 or done == total:
        print(f"{time.strftime('%H:%M:%S')} window {done}/{total}", file=sys.stderr, flush=True)


QUAROT_MODES = ("off", "residual", "online", "inputs", "inputs-no-down")


def quarot_transforms(mode: str) -> dict | None:
    """`--quarot MODE` -> the load() transforms of the lattice-quarot plugin: residual basis
    without / with the online down_proj rotation, or the inputs basis with / without it."""
    if mode == "off":
        return None
    from lattice_quarot import QuarotSettings
    basis = "inputs" if mode.startswith("inputs") else "residual"
    online = mode in ("online", "inputs")
    return {"quarot": QuarotSettings(enabled=True, seed=0, online_down_proj=online,
                                     basis=basis)}


def ppl_lattice(model: str, quant: str, group_size, ids, window, stride, threads,
                overrides=None, source=None, quarot="off", kv_cache="f32") -> dict:
    """lattice_engine.eval.perplexity's recipe, with partial results. `source` replaces the
    float32 GGUF (e.g. llama.cpp's own Q4_0 file, whose blocks load as they are)."""
    from gguf_variants import variant
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    set_threads(threads)
    m = load(source or variant(model, "f32"), quant=QuantSpec(quant, overrides or {}, group_size),
             transforms=quarot_transforms(quarot), kv_cache=kv_cache).model
    scorer = Scorer(ids, window, stride)
    for i, w in enumerate(scorer.spans):
        hidden = m.hidden_states(ids[None, w.begin:w.end], m.make_cache(capacity=w.end - w.begin))
        first = w.score_from - w.begin - 1
        scorer.add(i, w, m.logits(hidden[:, first:w.end - w.begin - 1])[0])
    return scorer.result()


def ppl_llama_cpp(model: str, quant: str, ids, window, stride, threads) -> dict:
    import llama_cpp
    from gguf_variants import variant

    llm = llama_cpp.Llama(model_path=str(variant(model, quant)), n_ctx=window, n_batch=window,
                          n_ubatch=window, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)
    scorer = Scorer(ids, window, stride)
    for i, w in enumerate(scorer.spans):
        llm.reset()
        llm.eval([int(t) for t in ids[w.begin:w.end]])
        first = w.score_from - w.begin - 1
        scorer.add(i, w, np.asarray(llm.scores[first:w.end - w.begin - 1], dtype=np.float32))
    return scorer.result()


def cmd_ppl(args) -> int:
    ids = token_ids(args.model, args.max_tokens)
    if args.engine == "lattice":
        overrides = dict(o.split("=", 1) for o in args.override)
        result = ppl_lattice(args.model, args.quant, args.group_size, ids, args.window,
                             args.stride, args.threads, overrides, args.source, args.quarot,
                             args.kv_cache)
    else:
        result = ppl_llama_cpp(args.model, args.quant, ids, args.window, args.stride,
                               args.threads)
    row = {"kind": "ppl", "model": args.model, "engine": args.engine, "quant": args.quant,
           "group_size": args.group_size, "overrides": args.override,
           "source": args.source, "quarot": args.quarot, "kv_cache": args.kv_cache, **result}
    row = append_result(Path(args.results or ppl_results(args.max_tokens)), row, args.threads)
    print(json.dumps(row))
    return 0


# ---- speed ------------------------------------------------------------------------------

def run_worker(engine: str, path: str, quant: str, threads: int, runs: int,
               quarot: str = "off") -> dict:
    """bench/decode.py's worker for `engine` in its own process (peak RSS is its own)."""
    import os
    import subprocess
    cmd = [sys.executable, __file__, "worker", engine, path, quant, str(threads), str(runs),
           "--quarot", quarot]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cmd_worker(args) -> int:
    import decode
    if args.engine == "lattice":  # q4 methods at their default group size (32)
        result = decode.worker_lattice(args.path, args.quant, args.threads, args.runs,
                                       quarot_transforms(args.quarot))
    else:
        result = decode.worker_llama_cpp(args.path, args.threads, args.runs)
    print(json.dumps(result))
    return 0


def cmd_speed(args) -> int:
    """Decode / prefill of each pair in one run (bench/decode.py's workers and method)."""
    from gguf_variants import variant

    rows = []
    f32 = str(variant(args.model, "f32"))
    for method in args.methods:
        peer = LLAMA_PEER[method]
        ours = run_worker("lattice", f32, method, args.threads, args.runs)
        theirs = run_worker("llama.cpp", str(variant(args.model, peer)), peer, args.threads,
                            args.runs)
        row = {"kind": "speed", "model": args.model, "threads": args.threads,
               "lattice": f"{method} g32", "peer": f"llama.cpp {peer.upper()}",
               "ours": ours, "theirs": theirs}
        if "error" not in ours and "error" not in theirs:
            row["decode_ratio"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
            row["prefill_ratio"] = ours["prefill_tok_s"] / theirs["prefill_tok_s"]
        rows.append(append_result(Path(args.results or SPEED_RESULTS), row, args.threads))
    print(f"| lattice | llama.cpp | decode tok/s (lattice / llama.cpp) | ratio | "
          f"prefill tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        o, t = r["ours"], r["theirs"]
        if "decode_ratio" not in r:
            print(f"| {r['lattice']} | {r['peer']} | error: {o.get('error') or t.get('error')} |")
            continue
        print(f"| {r['lattice']} | {r['peer']} | {o['decode_tok_s']:.1f} / "
              f"{t['decode_tok_s']:.1f} | {r['decode_ratio']:.2f} | {o['prefill_tok_s']:.0f} / "
              f"{t['prefill_tok_s']:.0f} | {r['prefill_ratio']:.2f} |")
    print(json.dumps(rows))
    return 0


def cmd_rotation_speed(args) -> int:
    """What QuaRot's online rotations cost: lattice q4 g32 decode with them against the same
    format without, every run in its own process, in one run."""
    from gguf_variants import variant

    f32 = str(variant(args.model, "f32"))
    rows = []
    for method in args.methods:
        plain = run_worker("lattice", f32, method, args.threads, args.runs)
        for mode in args.modes:
            rotated = run_worker("lattice", f32, method, args.threads, args.runs, mode)
            row = {"kind": "rotation_speed", "model": args.model, "threads": args.threads,
                   "method": f"{method} g32", "quarot": mode, "plain": plain,
                   "rotated": rotated}
            if "error" not in plain and "error" not in rotated:
                row["decode_cost"] = 1 - rotated["decode_tok_s"] / plain["decode_tok_s"]
                row["prefill_cost"] = 1 - rotated["prefill_tok_s"] / plain["prefill_tok_s"]
                print(f"{method} g32, quarot {mode}: decode {plain['decode_tok_s']:.2f} -> "
                      f"{rotated['decode_tok_s']:.2f} tok/s ({row['decode_cost']:+.1%} cost), "
                      f"prefill {plain['prefill_tok_s']:.0f} -> "
                      f"{rotated['prefill_tok_s']:.0f} ({row['prefill_cost']:+.1%})")
            else:
                print(f"{method} {mode}: error {plain.get('error') or rotated.get('error')}")
            rows.append(append_result(Path(args.results or SPEED_RESULTS), row, args.threads))
    print(json.dumps(rows))
    return 0


def cmd_table(args) -> int:
    path = Path(args.results or ppl_results(32768))
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    print("| model | engine | quant | group | quarot | overrides / source | ppl | tokens scored "
          "| seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("kind") == "ppl":
            extra = " ".join(r.get("overrides") or []) + (f" {r['source']}" if r.get("source")
                                                            else "")
            print(f"| {r['model']} | {r['engine']} | {r['quant']} | {r.get('group_size') or ''} "
                  f"| {r.get('quarot', 'off')} | {extra.strip()} | {r['ppl']:.4f} | "
                  f"{r['scored']} | {r['seconds']:.0f} |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    recon = sub.add_parser("recon")
    recon.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ppl = sub.add_parser("ppl")
    ppl.add_argument("--model", default="qwen2.5-coder-0.5b")
    ppl.add_argument("--engine", choices=("lattice", "llama.cpp"), default="lattice")
    ppl.add_argument("--quant", required=True,
                     help="lattice: a quant method; llama.cpp: f32, q8_0, q4_0, q4_1")
    ppl.add_argument("--group-size", type=int, default=None)
    ppl.add_argument("--override", action="append", default=[], metavar="GLOB=FORMAT",
                     help="lattice: per-tensor format, e.g. to store the embedding like "
                          "llama.cpp's file: model.embed_tokens.weight=q4_asym_g32")
    ppl.add_argument("--source", default=None,
                     help="lattice: load this checkpoint instead of the float32 GGUF, e.g. "
                          "llama.cpp's Q4_0 file, to check the kernels on identical blocks")
    ppl.add_argument("--quarot", choices=QUAROT_MODES, default="off",
                     help="lattice: rotate with the lattice-quarot plugin before quantizing "
                          "(residual basis alone or with the online down_proj rotation; "
                          "inputs basis with or without it)")
    ppl.add_argument("--kv-cache", choices=("f32", "f16", "q8_0"), default="f32",
                     help="how lattice's cache stores keys and values ([model] kv_cache)")
    ppl.add_argument("--max-tokens", type=int, default=32768)
    ppl.add_argument("--window", type=int, default=512)
    ppl.add_argument("--stride", type=int, default=256)
    ppl.add_argument("--threads", type=int, default=2)
    speed = sub.add_parser("speed")
    speed.add_argument("--model", default="qwen2.5-coder-0.5b")
    speed.add_argument("--threads", type=int, default=2)
    speed.add_argument("--runs", type=int, default=3)
    speed.add_argument("--methods", nargs="+", choices=sorted(LLAMA_PEER), default=list(METHODS),
                       help="lattice methods, each against its llama.cpp peer (q4_0: ggml's "
                            "rule against Q4_0)")
    rot = sub.add_parser("rotation-speed")
    rot.add_argument("--model", default="qwen2.5-coder-0.5b")
    rot.add_argument("--threads", type=int, default=2)
    rot.add_argument("--runs", type=int, default=3)
    rot.add_argument("--methods", nargs="+", default=list(METHODS))
    rot.add_argument("--modes", nargs="+", choices=QUAROT_MODES[1:],
                     default=["online", "inputs"])
    worker = sub.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("engine")
    worker.add_argument("path")
    worker.add_argument("quant")
    worker.add_argument("threads", type=int)
    worker.add_argument("runs", type=int)
    worker.add_argument("--quarot", choices=QUAROT_MODES, default="off")
    for p in (ppl, speed, rot, sub.add_parser("table")):
        p.add_argument("--results", default=None, metavar="FILE",
                       help="JSONL file of the rows (default: see the module doc)")
    args = parser.parse_args()
    return {"recon": cmd_recon, "ppl": cmd_ppl, "speed": cmd_speed, "table": cmd_table,
            "rotation-speed": cmd_rotation_speed, "worker": cmd_worker}[
        args.command](args)


if __name__ == "__main__":
    sys.exit(main())
