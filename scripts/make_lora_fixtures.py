"""Tiny PEFT LoRA adapters on the tiny fixtures, and PEFT + transformers' float32 reference.

Run by hand when the fixtures need to change (needs torch, transformers and peft):
    python scripts/make_lora_fixtures.py [NAME ...]     (default: every adapter below)
For each adapter NAME on a base fixture tests/fixtures/<base>/ it trains a LoRA adapter a
few Adam steps on random text (so A and B are both non-trivial), saves it with PEFT's
`save_pretrained` to tests/fixtures/lora/<NAME>/ (adapter_config.json,
adapter_model.safetensors), and
writes reference.safetensors there with
  prompt_ids [2, T]          two prompts of equal length (a batch)
  logits [2, T, V]           PeftModel's logits for them (adapter unmerged, float32)
  train_ids [1, L]           one example for the training checks (L = 20; 80 for
                             qwen3_5_text_all, beyond the delta rule's 64-token chunk)
  train_loss []              mean next-token cross-entropy of train_ids with the adapter
  grad.<module>.lora_A / .lora_B   d loss / d factor (torch autograd), PEFT's shapes
  adamw<k>.<module>.lora_A / .lora_B   the factors after k = 1..3 steps of
                             torch.optim.AdamW (lr 1e-2, betas (0.9, 0.999), eps 1e-8,
                             weight_decay 0.01) with gradient-norm clipping at 0.05
  adamw_grad<k>.<module>.lora_A / .lora_B   the gradient of step k (before clipping)
  adamw_loss [3]             the loss before each of those steps
Each adapter exercises different PEFT settings (rank_pattern, alpha_pattern, use_rslora,
the Gated DeltaNet projections of Qwen3.5; qwen3_5_text_all: every linear layer of the
Qwen3.5 fixture, for adapt_step's gradient check).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
OUT = FIXTURES / "lora"
PROMPT_LEN, TRAIN_LEN = 12, 20

ADAPTERS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"]),
    "qwen2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj",
                                                                      "down_proj"]),
    "qwen3": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
                  rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                  alpha_pattern={"k_proj": 3}),
    "qwen3_5_text": dict(r=4, lora_alpha=8,
                         target_modules=["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                                         "out_proj", "q_proj", "v_proj", "o_proj",
                                         "down_proj"]),
    # every linear of Qwen3.5 (PEFT's "all-linear": the lm_head excepted), base qwen3_5_text
    "qwen3_5_text_all": dict(r=4, lora_alpha=8, target_modules="all-linear"),
}
BASE = {"qwen3_5_text_all": "qwen3_5_text"}   # adapter name -> base fixture, if not its own
TRAIN_LENS = {"qwen3_5_text_all": 80}
CLIP, LR, STEPS = 0.05, 1e-2, 3


def lora_params(model) -> dict[str, torch.nn.Parameter]:
    """module name -> parameter for every LoRA factor, keys "<module>.lora_A"."""
    out = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            module = name.split("base_model.model.", 1)[1].replace(".default.weight", "")
            out[module] = p
    return out


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:])


def main(names: list[str]) -> None:
    import peft
    import transformers

    unknown = sorted(set(names) - set(ADAPTERS))
    if unknown:
        raise SystemExit(f"unknown adapter(s) {unknown}; known: {sorted(ADAPTERS)}")
    for seed, (name, settings) in enumerate(ADAPTERS.items()):
        if names and name not in names:
            continue
        base = BASE.get(name, name)
        torch.manual_seed(100 + seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            FIXTURES / base, dtype=torch.float32)
        vocab = model.config.vocab_size
        cfg = peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **settings)
        pm = peft.get_peft_model(model, cfg)
        pm.train()
        # a few steps on random text: B leaves zero, A moves away from its init
        opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.05)
        for _ in range(4):
            ids = torch.randint(0, vocab, (2, 16))
            out = pm(input_ids=ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        pm.eval()
        dest = OUT / name
        dest.mkdir(parents=True, exist_ok=True)
        pm.save_pretrained(dest, safe_serialization=True)
        (dest / "README.md").unlink(missing_ok=True)  # PEFT's model-card template
        config_path = dest / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = f"tests/fixtures/{base}"  # not this machine's path
        if isinstance(config.get("target_modules"), list):   # PEFT writes a set's order
            config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

        ref: dict[str, np.ndarray] = {}
        prompt = torch.randint(0, vocab, (2, PROMPT_LEN))
        with torch.no_grad():
            ref["prompt_ids"] = prompt.numpy().astype(np.int64)
            ref["logits"] = pm(input_ids=prompt).logits.float().numpy()

        train = torch.randint(0, vocab, (1, TRAIN_LENS.get(name, TRAIN_LEN)))
        ref["train_ids"] = train.numpy().astype(np.int64)
        params = lora_params(pm)
        pm.zero_grad()
        loss = loss_of(pm, train)
        loss.backward()
        ref["train_loss"] = np.float32(loss.item()).reshape(())
        for key, p in params.items():
            ref[f"grad.{key}"] = p.grad.numpy().copy()

        opt = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.01)
        losses = []
        for k in range(1, STEPS + 1):
            opt.zero_grad()
            loss = loss_of(pm, train)
            losses.append(loss.item())
            loss.backward()
            for key, p in params.items():
                ref[f"adamw_grad{k}.{key}"] = p.grad.numpy().copy()
            torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP)
            opt.step()
            for key, p in params.items():
                ref[f"adamw{k}.{key}"] = p.detach().numpy().copy()
        ref["adamw_loss"] = np.array(losses, np.float32)
        save_file({k: np.ascontiguousarray(v) for k, v in ref.items()},
                  str(dest / "reference.safetensors"))
        print(f"{name}: {len(params) // 2} modules, logits {ref['logits'].shape}, "
              f"loss {ref['train_loss']:.4f} -> {dest}")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
