"""Tiny random-weight Qwen3.5 checkpoints and transformers' float32 reference for them.

Run by hand when the fixtures need to change (needs torch and transformers >= 5):
    python scripts/make_qwen3_5_fixtures.py
Writes tests/fixtures/<name>/ (config.json, model.safetensors) and golden.safetensors with
  prompt_ids [2, T]            two prompts of equal length (a batch)
  prefill_logits [2, T, V]     logits of the whole prompt in one forward (chunked delta rule)
  decode_ids [2, S]            greedy continuation, one token at a time with the cache
  decode_logits [2, S, V]      logits at each decode step (recurrent delta rule)
  delta_state_<i> [2, Hv, Dk, Dv]  the delta-rule state of linear layer i after the prefill

Two layouts, both with 3 linear + 1 full layer, partial rotary and GQA:
  qwen3_5_text  Qwen3_5ForCausalLM, tied embeddings, 2 key heads / 4 value heads, and a
                prompt longer than one 64-token chunk
  qwen3_5_vl    Qwen3_5ForConditionalGeneration with a one-block vision tower, untied
                lm_head, and an `mtp.*` head added the way released checkpoints carry it
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
DECODE_STEPS, VOCAB = 32, 256

TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
            linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=512,
            layer_types=["linear_attention", "linear_attention", "full_attention",
                         "linear_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True})
VISION = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=2,
              out_hidden_size=64, temporal_patch_size=1, num_position_embeddings=16)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values everywhere, with decays in a range where the state remembers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):  # gated norm: scales by w
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:  # Qwen3.5 RMSNorm: scales by (1 + w)
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("A_log"):  # exp(A_log) in [0.05, 1]
                p.copy_(torch.empty(p.shape).uniform_(0.05, 1.0, generator=gen).log())
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "conv1d" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def mtp_tensors(hidden: int, inter: int, seed: int) -> dict[str, np.ndarray]:
    """An MTP head shaped like the released checkpoints' (one full-attention layer, fc over
    [embedding; hidden]); transformers ignores `mtp.*`, lattice keeps it addressable."""
    rng = np.random.default_rng(seed)
    c = TEXT
    d, nq, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    shapes = {
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.pre_fc_norm_embedding.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,),
        "mtp.norm.weight": (hidden,),
        "mtp.layers.0.input_layernorm.weight": (hidden,),
        "mtp.layers.0.post_attention_layernorm.weight": (hidden,),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * nq * d, hidden),
        "mtp.layers.0.self_attn.k_proj.weight": (nkv * d, hidden),
        "mtp.layers.0.self_attn.v_proj.weight": (nkv * d, hidden),
        "mtp.layers.0.self_attn.o_proj.weight": (hidden, nq * d),
        "mtp.layers.0.self_attn.q_norm.weight": (d,),
        "mtp.layers.0.self_attn.k_norm.weight": (d,),
        "mtp.layers.0.mlp.gate_proj.weight": (inter, hidden),
        "mtp.layers.0.mlp.up_proj.weight": (inter, hidden),
        "mtp.layers.0.mlp.down_proj.weight": (hidden, inter),
    }
    return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def reference_run(model, prompt: torch.Tensor, steps: int, text_config) -> dict[str, np.ndarray]:
    out = model(prompt, use_cache=True)
    cache = out.past_key_values
    linear = [i for i, t in enumerate(text_config.layer_types) if t == "linear_attention"]
    states = {f"delta_state_{n}": cache.get_recurrent_state(i).float().numpy().copy()
              for n, i in enumerate(linear)}
    next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    ids, logits = [], []
    for _ in range(steps):
        ids.append(next_ids)
        step = model(next_ids, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logits.append(step.logits)
        next_ids = step.logits[:, -1].argmax(-1, keepdim=True)
    return dict(states, prompt_ids=prompt.numpy().astype(np.int64),
                prefill_logits=out.logits.float().numpy(),
                decode_ids=torch.cat(ids, 1).numpy().astype(np.int64),
                decode_logits=torch.cat(logits, 1).float().numpy())


def main() -> None:
    import transformers

    torch.set_grad_enabled(False)
    made = {
        "qwen3_5_text": (lambda: transformers.Qwen3_5ForCausalLM(
            transformers.Qwen3_5TextConfig(**TEXT, tie_word_embeddings=True)), 70),
        "qwen3_5_vl": (lambda: transformers.Qwen3_5ForConditionalGeneration(
            transformers.Qwen3_5Config(text_config=dict(TEXT, tie_word_embeddings=False),
                                       vision_config=VISION, tie_word_embeddings=False)), 20),
    }
    for seed, (name, (build, prompt_len)) in enumerate(made.items()):
        model = build().float().eval()
        randomize(model, 10 + seed)
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        text_config = model.config.get_text_config()
        if name == "qwen3_5_vl":  # add the MTP head the way released checkpoints carry it
            weights = load_file(str(folder / "model.safetensors"))
            weights.update(mtp_tensors(TEXT["hidden_size"], TEXT["intermediate_size"], seed))
            save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        gen = torch.Generator().manual_seed(200 + seed)
        prompt = torch.randint(0, VOCAB, (2, prompt_len), generator=gen)
        golden = reference_run(model, prompt, DECODE_STEPS, text_config)
        save_file({k: np.ascontiguousarray(v) for k, v in golden.items()},
                  str(folder / "golden.safetensors"))
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "model_class": type(model).__name__}
        (folder / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: wrote {folder}")


if __name__ == "__main__":
    main()
