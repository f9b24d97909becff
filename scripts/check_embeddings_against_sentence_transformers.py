"""all-MiniLM-L6-v2 from the catalog against sentence-transformers on 200 WikiText-2 lines.

    python scripts/check_embeddings_against_sentence_transformers.py [--lines 200] [--backend native]

Needs torch and sentence-transformers (`pip install sentence-transformers` after torch).
Both read the same folder (`lattice pull all-minilm-l6-v2`); lines longer than the model's
256 tokens are truncated by both, as sentence-transformers does. Prints the worst cosine
and max |diff| and exits non-zero if any line's cosine is below --min-cosine (0.99999).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = ROOT / "data" / "wikitext-2" / "wiki.test.raw"


def wikitext_lines(n: int) -> list[str]:
    """The first n non-empty lines that are not section headings (' = Title = ')."""
    out = []
    for line in WIKITEXT.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("="):
            out.append(text)
        if len(out) == n:
            break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=200)
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "numpy"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--min-cosine", type=float, default=0.99999)
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    from lattice_engine.engine import Engine
    from lattice_engine.io.catalog import resolve

    folder = resolve("all-minilm-l6-v2")
    lines = wikitext_lines(args.lines)
    engine = Engine.load(str(folder), backend=args.backend)
    ours = engine.embed(lines, truncate=True)
    st = SentenceTransformer(str(folder), device="cpu")
    ref = st.encode(lines, batch_size=args.batch, convert_to_numpy=True)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    lengths = [len(ids) for ids in engine.embedder.tokenize(lines, truncate=True)]
    row = {"lines": len(lines), "min_cosine": float(cos.min()),
           "mean_cosine": float(cos.mean()), "max_abs_diff": float(np.abs(ours - ref).max()),
           "below": int((cos < args.min_cosine).sum()), "min_cosine_required": args.min_cosine,
           "tokens_max": max(lengths), "truncated": sum(n == 256 for n in lengths),
           "backend": args.backend}
    print(json.dumps(row))
    return 0 if row["below"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
