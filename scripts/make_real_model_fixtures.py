"""tests/fixtures/real_models.json: transformers' float32 WikiText-2 perplexity of the real
catalog models, the reference tests/test_smollm2.py holds lattice to.

    python scripts/make_real_model_fixtures.py [--models smollm2-135m] [--tokens 4096]
    python scripts/make_real_model_fixtures.py --check      (recompute, compare, write nothing)

For each model: pull the catalog file (sha256-checked), tokenize data/wikitext-2/wiki.test.raw
once without BOS with lattice's tokenizer (the ids the test scores), and score the first
--tokens of them with transformers in float32 on the GGUF dequantized by transformers
(bench/compare_logits.py's reference, window 512, stride 256). Writes the file atomically;
models not named keep their entries. Needs torch, transformers and accelerate (transformers
loads GGUF files only with it): `pip install torch==2.13.0 transformers accelerate`; about
two minutes of 2-core time per model.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "real_models.json"
WIKITEXT = ROOT / "data" / "wikitext-2" / "wiki.test.raw"
# the reference perplexity lives in bench/compare_logits.py; appended, not prepended, so that
# no bench script can shadow a package of the same name that transformers imports (a
# bench/kernels.py did shadow HF's `kernels` package: it is bench/kernel_speed.py now)
sys.path.append(str(ROOT / "bench"))


def reference_entry(name: str, tokens: int, window: int, stride: int) -> dict:
    from compare_logits import load_reference, reference_ppl
    from lattice_engine.io.catalog import CATALOG, pull
    from lattice_engine.loading import load

    path = pull(name, quiet=True)
    tokenizer = load(path).tokenizer  # the test's own tokenizer: same ids
    ids = np.asarray(tokenizer.encode(WIKITEXT.read_text(encoding="utf-8"),
                                      add_special_tokens=False), dtype=np.int64)
    if ids.size < tokens:
        raise SystemExit(f"--tokens {tokens} is more than the {ids.size} tokens "
                         f"{WIKITEXT.name} has for {name}; give at most {ids.size}")
    t0 = time.perf_counter()
    ref = reference_ppl(load_reference(path), ids[:tokens], window, stride)
    print(f"{name}: transformers f32 ppl {ref['ppl']:.6f} over {ref['scored']} scored tokens "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"sha256": CATALOG[name].sha256,
            "wikitext2_ppl": {
                "how": (f"python scripts/make_real_model_fixtures.py --models {name} --tokens "
                        f"{tokens} (transformers {metadata.version('transformers')}, torch "
                        f"{metadata.version('torch')}, float32 on the GGUF dequantized by "
                        f"transformers)"),
                "file_tokens": int(ids.size), "tokens": tokens, "window": window,
                "stride": stride, "transformers_f32": ref["ppl"]}}


def write_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed figures instead of writing them")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="--check: largest |ppl difference| accepted (default 1e-4)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)

    current = json.loads(FIXTURE.read_text(encoding="utf-8")) if FIXTURE.exists() else {}
    fresh = {name: reference_entry(name, args.tokens, args.window, args.stride)
             for name in args.models}
    if not args.check:
        write_atomically(FIXTURE, {**current, **fresh})
        print(f"wrote {FIXTURE.relative_to(ROOT)}")
        return 0
    worst = 0
    for name, entry in fresh.items():
        new = entry["wikitext2_ppl"]
        old = current.get(name, {}).get("wikitext2_ppl")
        keys = ("file_tokens", "tokens", "window", "stride")
        if old is None or any(old[k] != new[k] for k in keys):
            print(f"{name}: the committed entry is missing or measured differently "
                  f"({ {k: (old or {}).get(k) for k in keys} } vs { {k: new[k] for k in keys} })")
            worst = max(worst, 1)
            continue
        diff = new["transformers_f32"] - old["transformers_f32"]
        ok = abs(diff) <= args.tolerance
        print(f"{name}: committed {old['transformers_f32']:.6f}, now "
              f"{new['transformers_f32']:.6f} ({diff:+.2e}; {'ok' if ok else 'DIFFERS'}, "
              f"tolerance {args.tolerance:g})")
        worst = max(worst, 0 if ok else 1)
    return worst


if __name__ == "__main__":
    sys.exit(main())
