"""Tiny random-weight mixture-of-experts checkpoints and transformers' float32 reference.

Run by hand when the fixtures need to change (needs torch and transformers >= 5.25):
    python scripts/make_moe_fixtures.py
Writes tests/fixtures/<name>/ (config.json, model.safetensors) and golden.safetensors with
  prompt_ids [2, T]         two prompts of equal length (a batch)
  prefill_logits [2, T, V]  logits of the whole prompt in one forward
  decode_ids [2, S]         greedy continuation, one token at a time with the cache (S = 32)
  decode_logits [2, S, V]   logits at each decode step
and golden.json (versions, model class, the smallest top-k routing margin of the run).

  qwen3_moe          Qwen3MoeForCausalLM: 8 experts, top-2, norm_topk_prob, layer 1 dense
                     (mlp_only_layers), per-expert tensors as save_pretrained writes them
  qwen3_moe_step2    Qwen3MoeForCausalLM: top-3 without renormalisation, decoder_sparse_step
                     2 (layers 1 and 3 sparse), tied embeddings
  qwen3_5_moe        Qwen3_5MoeForCausalLM (model_type qwen3_5_moe_text): 3 DeltaNet + 1
                     full-attention layer, every MLP sparse with a gated shared expert; the
                     experts rewritten in the fused layout released checkpoints carry
                     (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I])

Routing is discontinuous: a token whose k-th and (k+1)-th router logits are nearly equal could pick another expert under a different float32 summation order. The router
weights are scaled up so that choices are clear, and the script refuses a seed whose
smallest margin (recorded in golden.json) is below MIN_MARGIN.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_qwen3_5_fixtures import randomize as randomize_qwen3_5  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT_LEN, DECODE_STEPS, VOCAB = 20, 32, 256
MIN_MARGIN = 2e-3

QWEN3_MOE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                 tie_word_embeddings=False)
QWEN3_MOE_STEP2 = dict(QWEN3_MOE, num_hidden_layers=4, num_experts_per_tok=3,
                       norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                       tie_word_embeddings=True)
QWEN3_5_MOE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   rms_norm_eps=1e-6, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                   linear_value_head_dim=16, linear_num_key_heads=2,
                   linear_num_value_heads=4, max_position_embeddings=512,
                   layer_types=["linear_attention", "linear_attention", "full_attention",
                                "linear_attention"],
                   num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                   shared_expert_intermediate_size=48, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.25})


def randomize_qwen3(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def sharpen_routers(model: torch.nn.Module, seed: int) -> None:
    """Router weights large enough that the top-k choice is clear (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


class MarginProbe:
    """Records the smallest gap between the k-th and (k+1)-th router logit (softmax is
    monotone, so the logits' order decides the choice)."""

    def __init__(self, model: torch.nn.Module):
        self.margin = float("inf")
        for name, mod in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(mod, "top_k"):
                mod.register_forward_hook(self.hook)

    def hook(self, mod, inputs, output):
        ordered = output[0].float().sort(-1, descending=True).values
        gap = (ordered[:, mod.top_k - 1] - ordered[:, mod.top_k]).min().item()
        self.margin = min(self.margin, gap)


def reference_run(model, prompt: torch.Tensor, steps: int) -> dict[str, np.ndarray]:
    out = model(prompt, use_cache=True)
    cache = out.past_key_values
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    ids, logits = [], []
    for _ in range(steps):
        ids.append(next_ids)
        step = model(next_ids, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logits.append(step.logits)
        next_ids = step.logits[:, -1].argmax(-1, keepdim=True)
    return dict(prompt_ids=prompt.numpy().astype(np.int64),
                prefill_logits=out.logits.float().numpy(),
                decode_ids=torch.cat(ids, 1).numpy().astype(np.int64),
                decode_logits=torch.cat(logits, 1).float().numpy())


def fuse_experts(path: Path, num_experts: int) -> None:
    """Rewrite per-expert tensors as experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]."""
    weights = load_file(str(path))
    pat = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    groups: dict[str, dict] = {}
    for name in list(weights):
        m = pat.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = weights.pop(name)
    for prefix, parts in groups.items():
        weights[f"{prefix}.gate_up_proj"] = np.stack(
            [np.concatenate([parts[(e, "gate")], parts[(e, "up")]]) for e in range(num_experts)])
        weights[f"{prefix}.down_proj"] = np.stack([parts[(e, "down")]
                                                  for e in range(num_experts)])
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path),
              metadata={"format": "pt"})


def main() -> None:
    import transformers

    torch.set_grad_enabled(False)
    made = {
        "qwen3_moe": (lambda: transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(**QWEN3_MOE)), randomize_qwen3, False),
        "qwen3_moe_step2": (lambda: transformers.Qwen3MoeForCausalLM(
            transformers.Qwen3MoeConfig(**QWEN3_MOE_STEP2)), randomize_qwen3, False),
        "qwen3_5_moe": (lambda: transformers.Qwen3_5MoeForCausalLM(
            transformers.Qwen3_5MoeTextConfig(**QWEN3_5_MOE)), randomize_qwen3_5, True),
    }
    for index, (name, (build, randomize, fused)) in enumerate(made.items()):
        for attempt in range(20):
            seed = 1000 * index + attempt
            model = build().float().eval()
            randomize(model, seed)
            sharpen_routers(model, seed + 500)
            probe = MarginProbe(model)
            gen = torch.Generator().manual_seed(300 + seed)
            prompt = torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=gen)
            golden = reference_run(model, prompt, DECODE_STEPS)
            if probe.margin >= MIN_MARGIN:
                break
            print(f"{name}: seed {seed} has a routing margin {probe.margin:.2e}; next seed")
        else:
            raise SystemExit(f"{name}: no seed with a routing margin >= {MIN_MARGIN}")
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        if fused:
            fuse_experts(folder / "model.safetensors", model.config.num_experts)
        save_file({k: np.ascontiguousarray(v) for k, v in golden.items()},
                  str(folder / "golden.safetensors"))
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "model_class": type(model).__name__, "seed": seed,
                "min_routing_margin": probe.margin,
                "expert_layout": "fused" if fused else "per expert"}
        (folder / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: wrote {folder} (routing margin {probe.margin:.2e})")


if __name__ == "__main__":
    main()
