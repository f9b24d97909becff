"""Lattice against transformers' float32 logits on the 0.8B-shape random Qwen3.5 checkpoint
written by scripts/make_qwen3_5_checkpoint.py.

    python scripts/check_qwen3_5_parity.py [--model DIR] [--backend native|numpy] [--quant f32]

Prefills the reference's 64-token prompt, then feeds the reference's 32 greedy tokens one at
a time; prints max |logit diff| for the prefill and the decode steps, and the greedy
argmax agreement. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_qwen3_5_checkpoint import default_out  # noqa: E402


def main() -> int:
    from safetensors.numpy import load_file

    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_out())
    parser.add_argument("--backend", default="native", choices=("native", "numpy"))
    parser.add_argument("--quant", default="f32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    ref = load_file(str(args.model / "reference.safetensors"))
    t0 = time.time()
    model = load(args.model, quant=QuantSpec(args.quant), backend=args.backend).model
    print(f"loaded {args.model} ({args.quant}, {args.backend}) in {time.time() - t0:.1f} s; "
          f"mtp tensors: {len(model.mtp_weights)}, vision tensors: {len(model.vision_weights)}")
    cache = model.make_cache(batch=1)
    prefill = model.forward(ref["prompt_ids"], cache)
    steps = ref["decode_ids"]
    decode = np.concatenate([model.forward(steps[:, i:i + 1], cache)
                             for i in range(steps.shape[1])], axis=1)
    ours = np.concatenate([prefill[:, -1:], decode[:, :-1]], axis=1).argmax(-1)
    result = {
        "prompt_tokens": int(ref["prompt_ids"].shape[1]), "decode_steps": int(steps.shape[1]),
        "prefill_max_abs_diff": float(np.abs(prefill - ref["prefill_logits"]).max()),
        "decode_max_abs_diff": float(np.abs(decode - ref["decode_logits"]).max()),
        "logit_scale": float(np.abs(ref["prefill_logits"]).max()),
        "greedy_agreement": float((ours == steps).mean()),
        "prefill_argmax_agreement": float(
            (prefill.argmax(-1) == ref["prefill_logits"].argmax(-1)).mean()),
        "quant": args.quant, "backend": args.backend,
    }
    for k, v in result.items():
        print(f"{k:26s} {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
