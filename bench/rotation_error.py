"""Where 4-bit rounding error goes with and without QuaRot's rotations, on real activations.

    python bench/rotation_error.py [--model qwen2.5-coder-0.5b] [--tokens 512] [--layers 24]

For each basis (none, QuaRot's residual rotation, the per-linear input rotation) it runs the
float32 model over one WikiText-2 window, records every linear's input a and weight W, and
prints per kind of linear (q/k/v, o_proj, gate/up, down_proj) and quantizer (q4_sym /
q4_asym, group 32):

    weight error  ||Q(W) - W|| / ||W||
    output error  ||a (Q(W) - W)^T|| / ||a W^T||   (what the next layer sees)

The rotated models compute the same function as the plain one, so their output errors are
directly comparable. Needs lattice-quant-q4 and lattice-quarot. The last line is JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from provenance import add_results_option, emit  # noqa: E402

KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o_proj",
         "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down_proj"}
METHODS = ("q4_sym", "q4_asym")


def capture(model, ids: np.ndarray, layers: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(kind, input rows [T, K], weight [N, K]) of every linear of the first `layers`."""
    from lattice_engine.models.base import Linear
    names = {}
    for i, block in enumerate(model.layers[:layers]):
        for attr in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[id(getattr(block.self_attn, attr))] = attr
        for attr in ("gate_proj", "up_proj", "down_proj"):
            names[id(getattr(block.mlp, attr))] = attr
    seen = []
    original = Linear.__call__

    def record(self, x, ops):
        if id(self) in names:
            seen.append((KINDS[names[id(self)]], np.asarray(x, np.float32).reshape(-1, x.shape[-1]),
                         self.weight.to_float()))
        return original(self, x, ops)

    Linear.__call__ = record
    try:
        model.hidden_states(ids[None], model.make_cache(capacity=ids.size))
    finally:
        Linear.__call__ = original
    return seen


def errors(records, group: int) -> dict:
    from lattice_quant_q4 import formats as q4
    sums: dict = {}
    for kind, a, w in records:
        ref = a @ w.T
        for method in METHODS:
            dw = q4.to_float(method, group, q4.quantize(method, group, w), w.shape[1]) - w
            out = a @ dw.T
            for key in ((kind, method), ("all", method)):
                acc = sums.setdefault(key, np.zeros(4))
                acc += [(dw * dw).sum(), (w * w).sum(), (out * out).sum(), (ref * ref).sum()]
    return {f"{k}|{m}": {"weight": float(np.sqrt(v[0] / v[1])),
                         "output": float(np.sqrt(v[2] / v[3]))} for (k, m), v in sums.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    add_results_option(ap)
    args = ap.parse_args()
    from gguf_variants import variant
    from lattice_engine.loading import load
    from lattice_quarot import QuarotSettings
    from quant_quality import token_ids

    ids = token_ids(args.model, args.tokens)
    bases = {"plain": None,
             "residual": QuarotSettings(enabled=True, seed=args.seed, basis="residual"),
             "inputs": QuarotSettings(enabled=True, seed=args.seed, basis="inputs")}
    result = {}
    for name, settings in bases.items():
        model = load(variant(args.model, "f32"), backend="numpy",
                     transforms={"quarot": settings} if settings else None).model
        result[name] = errors(capture(model, ids, args.layers), args.group_size)
        del model
    print(f"{args.model}, {args.tokens} WikiText-2 tokens, group {args.group_size}: "
          f"weight error / output error")
    print("| linears | quant | " + " | ".join(bases) + " |")
    print("|---|---|" + "---|" * len(bases))
    for key in sorted(result["plain"]):
        kind, method = key.split("|")
        cells = [f"{result[b][key]['weight']:.4f} / {result[b][key]['output']:.4f}"
                 for b in bases]
        print(f"| {kind} | {method} | " + " | ".join(cells) + " |")
    emit({"model": args.model, "tokens": args.tokens, "group": args.group_size,
          "bases": result}, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
