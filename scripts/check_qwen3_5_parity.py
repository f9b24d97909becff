"""Lattice against transformers' float32 logits on the 0.8B-shape random Qwen3.5 checkpoint
written by scripts/make_qwen3_5_checkpoint.py.

    python scripts/check_qwen3_5_parity.py [--model DIR] [--backend native|numpy] [--quant f32]
                                           [--gguf FILE]

Prefills the reference's 64-token prompt, then feeds the reference's 32 greedy tokens one at
a time; prints max |logit diff| for the prefill and the decode steps, and the greedy
argmax agreement. Last line: one JSON object.

    python scripts/check_qwen3_5_parity.py --fixtures

does the same for the tiny golden fixtures of the test suite (tests/fixtures/qwen3_5_*, two
sequences, prefill + 32 decode steps, both backends), with the delta-rule states after the
prefill against transformers' cache, and the chunked delta rule against the token-by-token
recurrence on random inputs: the figures tests/test_qwen3_5.py asserts bounds on.
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


FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def fixtures_report() -> dict:
    from safetensors.numpy import load_file

    from lattice_engine import kernels, ops
    from lattice_engine.loading import get_ops, load

    backends = ["native", "numpy"] if kernels.available() else ["numpy"]
    out = {}
    for name in ("qwen3_5_text", "qwen3_5_vl"):
        ref = load_file(str(FIXTURES / name / "golden.safetensors"))
        for backend in backends:
            model = load(FIXTURES / name, backend=backend).model
            cache = model.make_cache(batch=ref["prompt_ids"].shape[0])
            prefill = model.forward(ref["prompt_ids"], cache)
            states = max(float(np.abs(cache.delta[i] - ref[f"delta_state_{i}"]).max())
                         for i in range(model.num_linear))
            steps = ref["decode_ids"]
            decode = np.concatenate([model.forward(steps[:, i:i + 1], cache)
                                     for i in range(steps.shape[1])], axis=1)
            out[f"{name}/{backend}"] = {
                "prefill_max_abs_diff": float(np.abs(prefill - ref["prefill_logits"]).max()),
                "decode_max_abs_diff": float(np.abs(decode - ref["decode_logits"]).max()),
                "delta_state_max_abs_diff": states,
                "decode_steps": int(steps.shape[1]),
                "argmax_agreement": float((decode.argmax(-1) ==
                                           ref["decode_logits"].argmax(-1)).mean())}
    rng = np.random.default_rng(0)
    b, t, hk, hv, dk, dv = 2, 150, 2, 4, 16, 24
    q, k = (rng.standard_normal((b, t, hk, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, t, hv, dv)).astype(np.float32)
    g = -rng.uniform(0.01, 0.5, (b, t, hv)).astype(np.float32)
    beta = rng.uniform(0, 1, (b, t, hv)).astype(np.float32)
    state = (0.3 * rng.standard_normal((b, hv, dk, dv))).astype(np.float32)
    s_rec = state.copy()
    rec = ops.gated_delta_rule(q, k, v, g, beta, s_rec, chunk=0)
    for backend in backends:
        s_chunk = state.copy()
        got = get_ops(backend).gated_delta_rule(q, k, v, g, beta, s_chunk, chunk=64)
        out[f"chunked_vs_recurrent/{backend}"] = {
            "state_max_abs_diff": float(np.abs(s_chunk - s_rec).max()),
            "output_max_abs_diff": float(np.abs(got - rec).max())}
    return out


def main() -> int:
    from safetensors.numpy import load_file

    from lattice_engine.loading import load, set_threads
    from lattice_engine.quant.methods import QuantSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_out())
    parser.add_argument("--backend", default="native", choices=("native", "numpy"))
    parser.add_argument("--quant", default="f32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", type=Path, default=None,
                        help="load the model from this GGUF of --model's checkpoint (e.g. made "
                             "by scripts/make_qwen3_5_gguf.py) instead of the safetensors")
    parser.add_argument("--fixtures", action="store_true",
                        help="the tiny golden fixtures of the test suite instead")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.fixtures:
        result = fixtures_report()
        for k, v in result.items():
            print(f"{k:34s} " + "  ".join(f"{n} {x:.3g}" for n, x in v.items()))
        print(json.dumps(result))
        return 0
    ref = load_file(str(args.model / "reference.safetensors"))
    t0 = time.time()
    source = args.gguf or args.model
    model = load(source, quant=QuantSpec(args.quant), backend=args.backend).model
    print(f"loaded {source} ({args.quant}, {args.backend}) in {time.time() - t0:.1f} s; "
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
