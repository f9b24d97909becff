"""Compare lattice against transformers (float32, torch CPU) on the same weights and ids.

    python bench/compare_logits.py MODEL [--quant q8_0] [--prompt-tokens 256]
    python bench/compare_logits.py MODEL --ppl --file data/wikitext-2/wiki.test.raw \
        --max-tokens 32768 [--window 512 --stride 256]

MODEL is an HF folder, a .gguf file or a catalog name. For a GGUF, transformers
dequantizes the same file to float32 (`gguf_file=`), so both engines see identical
weights. Logit mode prints max |diff|, argmax agreement and mean KL(ref || lattice) per
position; ppl mode runs the sliding-window recipe on both engines with the same token ids.
The last line is one JSON object. Needs torch and transformers (`pip install torch==2.13.0
transformers`); not part of the test suite.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from lattice_engine.eval.perplexity import perplexity, windows
from lattice_engine.loading import load, resolve_source
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.sampling import log_softmax
from provenance import add_results_option, emit  # bench/, next to this file


def load_reference(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch
    return model(torch.from_numpy(ids[None])).logits[0].float().numpy()


def reference_ppl(model, ids: np.ndarray, window: int, stride: int) -> dict:
    import torch
    nll, scored, start = 0.0, 0, time.perf_counter()
    for w in windows(ids.size, window, stride):
        first = w.score_from - w.begin - 1
        logits = model(torch.from_numpy(ids[None, w.begin:w.end])).logits[0]
        logits = logits[first:w.end - w.begin - 1].double()
        targets = torch.from_numpy(ids[w.score_from:w.end])
        nll -= torch.log_softmax(logits, -1)[torch.arange(targets.numel()), targets].sum().item()
        scored += targets.numel()
    return {"ppl": math.exp(nll / scored), "scored": scored,
            "seconds": round(time.perf_counter() - start, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--quant", default="f32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--ppl", action="store_true")
    parser.add_argument("--file", default="data/wikitext-2/wiki.test.raw")
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    add_results_option(parser)
    args = parser.parse_args()

    path = resolve_source(args.model)
    ours = load(path, quant=QuantSpec(args.quant), backend=args.backend)
    ref = load_reference(path)
    text = Path(args.file).read_text(encoding="utf-8")
    ids = np.asarray(ours.tokenizer.encode(text, add_special_tokens=False), dtype=np.int64)

    if args.ppl:
        ids = ids[: args.max_tokens]
        mine = perplexity(ours.model, ids, window=args.window, stride=args.stride)
        theirs = reference_ppl(ref, ids, args.window, args.stride)
        result = {"model": str(path), "quant": args.quant, "tokens": int(ids.size),
                  "window": args.window, "stride": args.stride, "lattice_ppl": mine["ppl"],
                  "transformers_ppl": theirs["ppl"], "ppl_diff": mine["ppl"] - theirs["ppl"],
                  "lattice_seconds": mine["seconds"], "transformers_seconds": theirs["seconds"]}
        print(f"lattice {args.quant}: ppl {mine['ppl']:.4f}   transformers f32: "
              f"{theirs['ppl']:.4f}   diff {result['ppl_diff']:+.4f} over {mine['scored']} tokens")
    else:
        ids = ids[: args.prompt_tokens]
        mine = ours.model.forward(ids[None], ours.model.make_cache())[0]
        theirs = reference_logits(ref, ids)
        lp_ref, lp_ours = log_softmax(theirs), log_softmax(mine)
        kl = float(np.mean(np.sum(np.exp(lp_ref) * (lp_ref - lp_ours), axis=-1)))
        result = {"model": str(path), "quant": args.quant, "positions": int(ids.size),
                  "max_abs_diff": float(np.abs(mine - theirs).max()),
                  "argmax_agreement": float(np.mean(mine.argmax(-1) == theirs.argmax(-1))),
                  "mean_kl": kl}
        print(f"{ids.size} positions: max |diff| {result['max_abs_diff']:.3g}, argmax agreement "
              f"{result['argmax_agreement']:.4f}, mean KL {kl:.3g}")
    emit(result, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
