"""Speculative decoding at temperature 0 equals plain decoding on the 0.8B-shape random
Qwen3.5 checkpoint (scripts/make_qwen3_5_checkpoint.py, which carries an mtp.* head), for
every Qwen3.5 drafter, one request at a time and under continuous batching.

    python scripts/check_qwen3_5_spec.py [--model DIR] [--quant q8_0]
                                         [--methods mtp,self,ngram] [--tokens 64]

The checkpoint has no tokenizer: the prompts are token ids (two random, one repetitive) and
a byte-level tokenizer is put next to a link to the weights in a temporary folder. Per
drafter: the dense path (three requests one at a time) and the batching runner (the three
together, the middle one plain), each compared token for token with plain decoding; the
verify counters show the verifies really ran. Exit status 1 if any output differs. Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    from lattice_engine.testing.checkpoints import write_tokenizer_files

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from qwen3_5 import default_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(default_model()))
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument("--methods", default="mtp,self,ngram")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        src = Path(args.model)
        for f in src.iterdir():
            if f.suffix == ".safetensors" and f.name != "reference.safetensors":
                (folder / f.name).symlink_to(f.resolve())
            elif f.name in ("config.json", "model.safetensors.index.json"):
                shutil.copy(f, folder / f.name)
        write_tokenizer_files(folder, -1)
        eng = Engine.load(str(folder), quant=args.quant)
        vocab = min(eng.model.config.vocab_size, 150000)
        prompts = [np.random.default_rng(s).integers(0, vocab, 24).tolist() for s in range(2)]
        prompts.append(prompts[0][:8] * 3)
        plain = [eng.generate(p, max_tokens=args.tokens, speculative=False).tokens
                 for p in prompts]
        result, ok = {}, True

        def spec_of(method):
            spec = {"method": method, "num_draft_tokens": 3, "adaptive": False}
            if method == "ngram":
                spec["options"] = {"prompt_lookup_min": 1, "prompt_lookup_max": 3}
            return spec

        for method in args.methods.split(","):
            start = time.time()
            got = [eng.generate(p, max_tokens=args.tokens, speculative=spec_of(method)).tokens
                   for p in prompts]
            stats = eng.speculation_for(spec_of(method)).stats
            result[method] = {"dense_equal": got == plain, "verifies": stats.verifies,
                              "seconds": round(time.time() - start, 1)}
            ok &= got == plain
            print(method, result[method], flush=True)
        eng.start_batching(BatchingOptions(kv_cache_tokens=4096, block_size=16,
                                           step_tokens=64))
        for method in args.methods.split(","):
            before = eng.speculation_for(spec_of(method)).stats.verifies
            ids = [eng.add_request(p, max_tokens=args.tokens,
                                   speculative=spec_of(method) if i != 1 else False)
                   for i, p in enumerate(prompts)]
            tokens = {i: [] for i in ids}
            while eng.has_unfinished():
                for out in eng.step():
                    if out.finish_reason == "error":
                        raise RuntimeError(out.error)
                    tokens[out.request_id] += out.token_ids
            equal = [tokens[i] for i in ids] == plain
            result[method].update(batched_equal=equal, batched_verifies=eng.speculation_for(
                spec_of(method)).stats.verifies - before)
            ok &= equal
            print(method, result[method], flush=True)
    print(json.dumps({"check": "qwen3_5_spec", "model": src.name, "quant": args.quant,
                      "tokens": args.tokens, "ok": ok, "methods": result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
