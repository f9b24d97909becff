"""Embedding throughput of lattice next to sentence-transformers (torch CPU), same run.

    python bench/embed.py [--lines 256] [--batch 32] [--threads 2] [--runs 3]

Both embed the same WikiText-2 lines with all-MiniLM-L6-v2 (the catalog folder, which
sentence-transformers reads too) in batches of --batch, on --threads threads (torch:
set_num_threads; lattice: the kernel pool), after one warm-up pass each. Texts / s is the
median over --runs. Prints one JSON row with both rates and the ratio lattice / peer.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from provenance import add_results_option, emit  # bench/, next to this file

WIKITEXT = Path(__file__).resolve().parent.parent / "data" / "wikitext-2" / "wiki.test.raw"


def lines(n: int) -> list[str]:
    out = [t.strip() for t in WIKITEXT.read_text(encoding="utf-8").splitlines()
           if t.strip() and not t.strip().startswith("=")]
    return out[:n]


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    add_results_option(ap)
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from lattice_engine.engine import Engine
    from lattice_engine.io.catalog import resolve
    from lattice_engine.loading import set_threads

    texts = lines(args.lines)
    folder = resolve("all-minilm-l6-v2")
    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    engine = Engine.load(str(folder))
    engine.embedder.batch_size = args.batch
    ids = engine.embedder.tokenize(texts, truncate=True)
    st = SentenceTransformer(str(folder), device="cpu")

    # both timed from text (tokenizing included), as a user calls them
    ours = timed(lambda: engine.embed(texts, truncate=True), args.runs)
    with torch.inference_mode():
        peer = timed(lambda: st.encode(texts, batch_size=args.batch, convert_to_numpy=True),
                     args.runs)
    a = engine.embedder.embed_ids(ids)
    b = st.encode(texts, batch_size=args.batch, convert_to_numpy=True)
    row = {"bench": "embed", "model": "all-minilm-l6-v2", "texts": len(texts),
           "tokens": sum(len(i) for i in ids), "batch": args.batch,
           "lattice_texts_per_s": round(len(texts) / ours, 2),
           "sentence_transformers_texts_per_s": round(len(texts) / peer, 2),
           "ratio": round(peer / ours, 3),
           "min_cosine": float(((a * b).sum(1) / np.linalg.norm(b, axis=1)).min())}
    emit(row, args.results, threads=args.threads)


if __name__ == "__main__":
    main()
