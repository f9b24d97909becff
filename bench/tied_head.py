"""What the tied lm_head's format costs: perplexity and speed of each choice, in one run.

    python bench/tied_head.py [--model smollm2-135m] [--max-tokens 32768] [--no-speed]
                              [--method q8_0 --method q4_asym ...]

With a random-weight fixture that has no tokenizer (e.g. tests/fixtures/qwen3_5_text), only
the logit differences are measured, on 256 random tokens.

A tied model's embedding table is also its lm_head. Under q8_0 the core keeps that table
f16 (QuantMethod.tied_embedding) because the seed found a q8 lm_head sharpens the logits;
this bench measures the cost of each choice instead of assuming it: float32 (the reference),
the table f16 (the q8_0 default), and the table q8_0 (override
`model.embed_tokens.weight=q8_0`), every other matrix q8_0 in those two; then the table f16
and q8_0 with every other matrix float32, which isolates the table's own error. For each: the
WikiText-2 perplexity (window 512, stride 256, the recipe of `lattice ppl`), its difference
to float32's, the max |logit diff| to float32 on the first window, and, unless --no-speed,
decode tok/s (128 tokens after a 32-token prompt, best of 3). Rows go to stdout as JSON with
provenance (bench/provenance.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import provenance  # noqa: E402

ROOT = HERE.parent
WIKITEXT = ROOT / "data" / "wikitext-2" / "wiki.test.raw"

TABLE = "model.embed_tokens.weight"


def choices(methods: list[str]) -> list[tuple[str, str, dict]]:
    """(label, method, overrides) for each row; the table's format is always named, so rows
    mean the same whatever a method's default is."""
    rows = [("f32", "f32", {})]
    for method in methods:
        rows += [(f"{method} + tied {fmt}", method, {TABLE: fmt}) for fmt in ("f16", "q8_0")]
    # the table's own error, every other matrix float32
    rows += [(f"f32 + tied {fmt}", "f32", {TABLE: fmt}) for fmt in ("f16", "q8_0")]
    return rows


def decode_speed(model, prompt: np.ndarray, steps: int = 128, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        cache = model.make_cache(batch=1, capacity=prompt.size + steps + 1)
        logits = model.forward(prompt[None, :], cache)
        token = int(logits[0, -1].argmax())
        start = time.perf_counter()
        for _ in range(steps):
            logits = model.forward(np.array([[token]]), cache)
            token = int(logits[0, -1].argmax())
        best = max(best, steps / (time.perf_counter() - start))
    return best


def main() -> int:
    from lattice_engine.eval.perplexity import leading_tokens, perplexity
    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-speed", action="store_true", help="perplexity and logits only")
    ap.add_argument("--method", action="append",
                    help="quant methods whose table choices are compared (default q8_0; "
                         "q4_sym / q4_asym with lattice-quant-q4)")
    args = ap.parse_args()
    set_threads(args.threads)

    reference_logits, reference_ppl = None, None
    for label, method, overrides in choices(args.method or ["q8_0"]):
        loaded = load(args.model, quant=QuantSpec(method, overrides))
        model = loaded.model
        if not model.config.tie_word_embeddings:
            sys.exit(f"{args.model} does not tie its lm_head to its embedding table")
        if loaded.tokenizer is not None:
            ids = leading_tokens(lambda t: loaded.tokenizer.encode(t, add_special_tokens=False),
                                 WIKITEXT.read_text(encoding="utf-8"), args.max_tokens)
        else:  # a random-weight fixture has no tokenizer: random tokens, logits only
            rng = np.random.default_rng(0)
            ids = rng.integers(0, model.config.vocab_size, min(args.max_tokens, 256)).tolist()
        first = np.asarray(ids[:512])[None, :]
        logits = model.forward(first, model.make_cache(batch=1, capacity=first.shape[1]))
        row = {"bench": "tied_head", "model": str(args.model), "choice": label,
               "head_format": model.lm_head.format.name, "tokens": len(ids),
               "threads": args.threads}
        if reference_logits is None:
            reference_logits = logits
        row["max_abs_logit_diff_vs_f32"] = float(np.abs(logits - reference_logits).max())
        row["logit_scale"] = float(np.abs(reference_logits).max())
        if loaded.tokenizer is not None:
            result = perplexity(model, ids, window=512, stride=256)
            reference_ppl = result["ppl"] if reference_ppl is None else reference_ppl
            row.update(ppl=round(result["ppl"], 4),
                       ppl_vs_f32=round(result["ppl"] - reference_ppl, 4))
        if not args.no_speed:
            row["decode_tok_s"] = round(decode_speed(model, first[0, :32]), 2)
        row.update(provenance())
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
