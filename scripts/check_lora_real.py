"""LoRA on real models against PEFT + transformers (float32), and our saved adapter in PEFT.

    python scripts/check_lora_real.py [smollm2-135m qwen2.5-coder-0.5b] [--positions 64]

For each model (catalog name, HF folder or GGUF; a GGUF is dequantized to float32 by
transformers and by us from the same file): PEFT makes a rank-16 LoRA on every linear
layer, trained a few Adam steps on text so A and B are both non-trivial, and saves it; we
load it on our float32 model and compare logits over a prompt with PeftModel's (max |diff|,
argmax agreement); then we save the adapter with `save_peft_safetensors`, PEFT loads that
folder into a fresh model, and its logits are compared with ours again. Prints one line per
model and a JSON object last. Needs torch, transformers, peft (the reference extra + peft).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    import peft
    import torch

    from compare_logits import load_reference  # bench/
    from lattice_engine.adapters import AdapterSlots
    from lattice_engine.loading import load, resolve_source
    from lattice_engine.quant.methods import QuantSpec
    from lattice_lora import load_peft, save_peft_safetensors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    parser.add_argument("--positions", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    text = (ROOT / "data" / "wikitext-2" / "wiki.test.raw")
    text = text.read_text(encoding="utf-8")[:20000] if text.exists() else \
        "The quick brown fox jumps over the lazy dog. " * 200
    results = []
    for name in args.models:
        torch.manual_seed(0)
        path = resolve_source(name)
        # one model in memory at a time (a 0.5B model is 2 GB in float32): PEFT's run, then
        # ours, then PEFT loading what we saved
        tokenizer = load(path, quant=QuantSpec("f32"), backend="numpy").tokenizer
        ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), np.int64)
        prompt = ids[:args.positions]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            base = load_reference(path)
            torch.set_grad_enabled(True)
            cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"])
            pm = peft.get_peft_model(base, cfg)
            pm.train()
            opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
            for step in range(args.steps):
                chunk = torch.from_numpy(ids[None, 200 + 64 * step: 264 + 64 * step])
                loss = pm(input_ids=chunk, labels=chunk).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            pm.eval()
            torch.set_grad_enabled(False)
            pm.save_pretrained(tmp / "peft", safe_serialization=True)
            want = pm(input_ids=torch.from_numpy(prompt[None])).logits[0].float().numpy()
            del pm, base, opt
            gc.collect()

            ours = load(path, quant=QuantSpec("f32"), backend=args.backend)
            weights = load_peft(tmp / "peft", ours.model)
            slots = AdapterSlots.of(ours.model)
            slot = slots.add(weights)
            with slots.selecting(uniform=slot):
                got = ours.model.forward(prompt[None], ours.model.make_cache())[0]
            plain = ours.model.forward(prompt[None], ours.model.make_cache())[0]
            save_peft_safetensors(weights, tmp / "ours")
            modules = len(weights.modules)
            del ours, weights, slots
            gc.collect()

            fresh = load_reference(path)
            again = peft.PeftModel.from_pretrained(fresh, str(tmp / "ours")).eval()
            theirs2 = again(input_ids=torch.from_numpy(prompt[None])).logits[0].float().numpy()
            del again, fresh
            gc.collect()
        row = {"model": name, "positions": int(prompt.size), "modules": modules,
               "max_abs_diff": float(np.abs(got - want).max()),
               "argmax_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
               "adapter_effect": float(np.abs(plain - want).max()),
               "saved_then_peft_max_abs_diff": float(np.abs(theirs2 - got).max())}
        results.append(row)
        print(f"{name}: {row['modules']} modules, {row['positions']} positions: max |ours - "
              f"peft| {row['max_abs_diff']:.3g} (the adapter moves logits by "
              f"{row['adapter_effect']:.3g}), argmax agreement {row['argmax_agreement']:.4f}; "
              f"our saved adapter in PEFT: max |diff| "
              f"{row['saved_then_peft_max_abs_diff']:.3g}", flush=True)
    print(json.dumps({"lora_real": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
