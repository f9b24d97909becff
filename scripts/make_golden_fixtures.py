"""Write tiny random-weight checkpoints and transformers' float32 logits for them.

Run by hand when the fixtures need to change (needs torch and transformers):
    python scripts/make_golden_fixtures.py
Writes tests/fixtures/<name>/ (config.json, model.safetensors) and golden.safetensors with
  prompt_ids [2, T]         two prompts of equal length (a batch)
  prefill_logits [2, T, V]  logits of the whole prompt in one forward
  decode_ids [2, S]         greedy continuation, one token at a time with the KV cache
  decode_logits [2, S, V]   logits at each decode step
The test suite compares against these without torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
PROMPT_LEN, DECODE_STEPS, VOCAB = 12, 8, 256

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5)

FIXTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(COMMON, tie_word_embeddings=True, rope_theta=10000.0)),
    "llama_rope_scaled": ("LlamaConfig", "LlamaForCausalLM",
                          dict(COMMON, tie_word_embeddings=False, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(COMMON, tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(COMMON, head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter (biases and norms too) non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))


def main() -> None:
    import transformers

    torch.set_grad_enabled(False)
    for seed, (name, (config_cls, model_cls, params)) in enumerate(FIXTURES.items()):
        config = getattr(transformers, config_cls)(**params)
        model = getattr(transformers, model_cls)(config).float().eval()
        randomize(model, seed)
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        gen = torch.Generator().manual_seed(100 + seed)
        prompt = torch.randint(0, VOCAB, (2, PROMPT_LEN), generator=gen)
        out = model(prompt, use_cache=True)
        prefill = out.logits
        cache = out.past_key_values
        next_ids = prefill[:, -1].argmax(-1, keepdim=True)
        decode_ids, decode_logits = [], []
        for _ in range(DECODE_STEPS):
            decode_ids.append(next_ids)
            step = model(next_ids, past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            decode_logits.append(step.logits)
            next_ids = step.logits[:, -1].argmax(-1, keepdim=True)
        save_file({
            "prompt_ids": prompt.numpy().astype(np.int64),
            "prefill_logits": prefill.numpy().astype(np.float32),
            "decode_ids": torch.cat(decode_ids, 1).numpy().astype(np.int64),
            "decode_logits": torch.cat(decode_logits, 1).numpy().astype(np.float32),
        }, str(folder / "golden.safetensors"))
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "model_class": model_cls}
        (folder / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{name}: wrote {folder}")


if __name__ == "__main__":
    main()
