"""Rotated vs unrotated float32 logits of a real model on WikiText-2 text.

    python plugins/quarot/check_equivalence.py qwen2.5-coder-0.5b [--tokens 256] [--seed 0]

Prints max |logit diff| and argmax agreement for the residual and inputs bases, with and
without the online down_proj rotation; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_quarot import QuarotSettings
from lattice_quarot import plugin as quarot_plugin

WIKITEXT = Path(__file__).resolve().parents[2] / "data" / "wikitext-2" / "wiki.test.raw"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="numpy")
    args = ap.parse_args()
    pm = PluginManager(load_entry_points=False)
    pm.register(quarot_plugin, "quarot")

    def run(settings):
        loaded = load(args.model, backend=args.backend, plugin_manager=pm,
                      transforms={"quarot": settings} if settings else None)
        ids = loaded.tokenizer.encode(WIKITEXT.read_text(encoding="utf-8")[:20000],
                                      add_special_tokens=False)[:args.tokens]
        model = loaded.model
        return model.forward(np.asarray([ids]), model.make_cache(capacity=len(ids)))[0]

    reference = run(None)
    result = {"model": args.model, "tokens": args.tokens, "seed": args.seed}
    for basis in ("residual", "inputs"):
        for online in (False, True):
            got = run(QuarotSettings(enabled=True, seed=args.seed, online_down_proj=online,
                                     basis=basis))
            diff = float(np.abs(got - reference).max())
            agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
            key = f"{basis}{'+online_down_proj' if online else ''}"
            result[key] = {"max_abs_diff": diff, "argmax_agreement": agree}
            print(f"{key:26} max |logit diff| {diff:.2e}, argmax agreement {agree:.2%}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
