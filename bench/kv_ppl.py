"""Perplexity cost of each KV-cache dtype, window by window on the same tokens.

    python bench/kv_ppl.py --model qwen2.5-coder-0.5b --quant q8_0 --tokens 32768 \
        [--results bench/results/kv_ppl.jsonl]

`lattice ppl --kv-cache X` once per dtype gives the same figures, but only at the end of
each whole run; here every window (eval/perplexity.py's recipe: WikiText-2 without BOS,
window 512, stride 256, each window scoring the tokens the previous one did not) is scored
with f32, f16 and q8_0 K/V in turn, and the running perplexities and their differences
are printed after each, so an interrupted run still compares the dtypes on the same
prefix of the text. Not a timing: load does not matter.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parent / "data" / "wikitext-2" / "wiki.test.raw"
DTYPES = ("f32", "f16", "q8_0")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    add_results_option(parser)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from lattice_engine.eval.perplexity import (LOGIT_ROWS, leading_tokens, target_logprobs,
                                                windows)
    from lattice_engine.loading import load, set_kv_cache
    from lattice_engine.quant.methods import QuantSpec

    loaded = load(args.model, quant=QuantSpec(args.quant))
    model = loaded.model
    text = WIKITEXT.read_text(encoding="utf-8")
    ids = np.asarray(leading_tokens(
        lambda t: loaded.tokenizer.encode(t, add_special_tokens=False), text, args.tokens))
    nll = dict.fromkeys(DTYPES, 0.0)
    scored = 0
    spans = list(windows(ids.size, args.window, args.stride))
    start = time.time()
    ppl = {}
    for i, w in enumerate(spans):
        for dtype in DTYPES:
            set_kv_cache(model, dtype)
            cache = model.make_cache(batch=1, capacity=w.end - w.begin)
            hidden = model.hidden_states(ids[None, w.begin:w.end], cache)
            for a in range(w.score_from, w.end, LOGIT_ROWS):
                b = min(a + LOGIT_ROWS, w.end)
                logits = model.logits(hidden[:, a - w.begin - 1:b - w.begin - 1])[0]
                nll[dtype] -= float(target_logprobs(logits, ids[a:b]).sum())
        scored += w.end - w.score_from
        ppl = {d: math.exp(nll[d] / scored) for d in DTYPES}
        print(f"window {i + 1}/{len(spans)} tokens {w.end} scored {scored} "
              + " ".join(f"{d} {ppl[d]:.4f}" for d in DTYPES)
              + "".join(f" d_{d} {ppl[d] - ppl['f32']:+.4f}" for d in DTYPES[1:])
              + f" ({time.time() - start:.0f} s)", flush=True)
    emit({"bench": "kv_ppl", "model": args.model, "quant": args.quant,
          "tokens": int(ids.size), "window": args.window, "stride": args.stride,
          "scored": scored, "ppl": {d: round(p, 4) for d, p in ppl.items()},
          "vs_f32": {d: round(ppl[d] - ppl["f32"], 4) for d in DTYPES[1:]}}, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
