"""Peak resident memory of `lattice generate` and `lattice ppl` next to llama.cpp doing the
same on the same file, each in its own process, in one run.

    python bench/peak_rss.py --model ~/.cache/lattice/bench/qwen2.5-coder-0.5b/q8_0.gguf \
        --quant q8_0 [--llama-gguf FILE] [--ppl-tokens 1024] [--llama-python PYTHON]

- generate: a short prompt, 16 greedy tokens (lattice: the CLI; llama.cpp:
  llama-cpp-python's eval / sample, n_ctx 512, the file read rather than mapped unless
  --llama-mmap).
- ppl: WikiText-2's first --ppl-tokens tokens, window 512, stride 256 (lattice: `lattice
  ppl`; llama.cpp: one eval per window with every position's logits, as
  bench/quant_quality.py scores it).
Each figure is the child's own ru_maxrss (os.wait4), so nothing of this process counts.
--model may be an F32 GGUF (lattice converts it at load) while --llama-gguf is llama.cpp's
own quantization of it (bench/gguf_variants.py), e.g. q4_asym against Q4_1.
--llama-python runs llama.cpp under another interpreter (one where llama-cpp-python is
installed). Prints a table, then one JSON row with the ratios (lattice / llama.cpp).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from provenance import add_results_option, emit  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
PROMPT = "def quicksort(items):"
GEN_TOKENS = 16

LLAMA_GENERATE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_threads={threads},
                      n_threads_batch={threads}, use_mmap={mmap}, verbose=False)
ids = llm.tokenize({prompt!r}.encode(), add_bos=False, special=False)
llm.eval(ids)
for _ in range({tokens}):
    llm.eval([llm.sample(temp=0.0)])
print(llm.detokenize(llm._input_ids[len(ids):].tolist()).decode(errors="replace")[:40])
"""

LLAMA_PPL = """
import math, sys, numpy as np, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=512, n_batch=512, n_ubatch=512,
                      n_threads={threads}, n_threads_batch={threads}, logits_all=True,
                      use_mmap={mmap}, verbose=False)
text = open({wikitext!r}, encoding="utf-8").read()[:{tokens} * 8]
ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:{tokens}]
nll, scored, prev = 0.0, 0, 0
for begin in range(0, len(ids), 256):
    end = min(begin + 512, len(ids))
    first = max(prev, begin + 1)
    llm.reset()
    llm.eval(ids[begin:end])
    logits = np.asarray(llm.scores[first - begin - 1:end - begin - 1], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    nll -= float((logits[np.arange(end - first), ids[first:end]] - lse).sum())
    scored += end - first
    prev = end
    if end == len(ids):
        break
print(f"ppl {{math.exp(nll / scored):.4f}} over {{scored}} tokens")
"""


def run(cmd: list[str]) -> dict:
    """Run cmd; its own peak RSS (MB, reaped with wait4) and its last output line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        why = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": why, "peak_rss_mb_before_failing": round(usage.ru_maxrss / 1024, 1)}
    lines = out.strip().splitlines()
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "output": lines[-1][:120] if lines else ""}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the file lattice loads (.gguf or folder)")
    p.add_argument("--quant", default="q8_0")
    p.add_argument("--kv-cache", default="auto", choices=("auto", "f32", "f16", "q8_0"),
                   help="lattice's KV dtype (default: the engine's, auto)")
    p.add_argument("--llama-gguf", default=None,
                   help="the file llama.cpp loads (default: --model)")
    p.add_argument("--llama-python", default=sys.executable)
    p.add_argument("--llama-mmap", action="store_true",
                   help="let llama.cpp memory-map the file (its default); off by default, "
                        "where its peak RSS is lowest (Qwen2.5-0.5B Q8_0 loaded: 797 MB "
                        "read vs 1,297 MB mapped, as its CPU repacking copies mapped weights)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ppl-tokens", type=int, default=1024)
    p.add_argument("--skip", default="", help="comma-separated: generate,ppl,llama.cpp")
    add_results_option(p)
    args = p.parse_args()
    skip = set(args.skip.split(","))
    lattice = [sys.executable, "-m", "lattice_engine.cli"]
    common = ["--quant", args.quant, "--threads", str(args.threads), "--kv-cache", args.kv_cache]
    llama_gguf = args.llama_gguf or args.model
    rows = {}
    if "generate" not in skip:
        rows["generate"] = {"lattice": run(
            lattice + ["generate", "-m", args.model, *common, "--raw", "--temperature", "0",
                       "--max-tokens", str(GEN_TOKENS), PROMPT])}
        if "llama.cpp" not in skip:
            code = LLAMA_GENERATE.format(threads=args.threads, prompt=PROMPT, tokens=GEN_TOKENS,
                                         mmap=args.llama_mmap)
            rows["generate"]["llama.cpp"] = run([args.llama_python, "-c", code, llama_gguf])
    if "ppl" not in skip:
        rows["ppl"] = {"lattice": run(
            lattice + ["ppl", args.model, *common, "--file", str(WIKITEXT),
                       "--max-tokens", str(args.ppl_tokens)])}
        if "llama.cpp" not in skip:
            code = LLAMA_PPL.format(threads=args.threads, wikitext=str(WIKITEXT),
                                    tokens=args.ppl_tokens, mmap=args.llama_mmap)
            rows["ppl"]["llama.cpp"] = run([args.llama_python, "-c", code, llama_gguf])
    print(f"lattice {args.model} --quant {args.quant} (kv {args.kv_cache}); llama.cpp {llama_gguf}")
    print(f"{'run':10s} {'engine':10s} {'peak RSS MB':>12s}  output")
    summary = {"model": args.model, "quant": args.quant, "kv_cache": args.kv_cache,
               "llama_gguf": llama_gguf, "llama_mmap": args.llama_mmap, "ppl_tokens": args.ppl_tokens,
               "load_avg": os.getloadavg()[0], "runs": rows}
    for kind, engines in rows.items():
        for engine, r in engines.items():
            shown = r.get("error") or f"{r['peak_rss_mb']:12.0f}  {r['output']}"
            print(f"{kind:10s} {engine:10s} {shown}")
        ours, peer = engines.get("lattice", {}), engines.get("llama.cpp", {})
        if "peak_rss_mb" in ours and "peak_rss_mb" in peer:
            summary[f"{kind}_rss_ratio"] = round(ours["peak_rss_mb"] / peer["peak_rss_mb"], 3)
            print(f"{kind}: lattice / llama.cpp peak RSS {summary[f'{kind}_rss_ratio']:.2f}x")
    emit(summary, args.results, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
