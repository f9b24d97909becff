"""A random-weight Qwen3.5 checkpoint at the exact 0.8B shape, and transformers' float32
reference logits for it (real weights cannot be fetched here).

    python scripts/make_qwen3_5_checkpoint.py [--out DIR] [--dtype bf16|f32]

Builds `Qwen3_5ForConditionalGeneration` from the released 0.8B config, committed as
data/configs/qwen3_5-0.8b.config.json (so the file has the released layout: text under
model.language_model.*, the vision tower under model.visual.*), adds an `mtp.*` head of the
released shape, and writes
  DIR/config.json, DIR/model.safetensors      (default DIR: $LATTICE_HOME/bench/qwen3_5-0.8b-random)
  DIR/reference.safetensors                   transformers float32 on the same weights:
      prompt_ids [1, 64], prefill_logits [1, 64, V], decode_ids [1, 32], decode_logits [1, 32, V]
Weights: N(0, 0.02) matrices, (1 + w) norms with w ~ N(0, 0.1), the reference's own A_log
and dt_bias initialisation. Stored bf16 by default; both engines widen bf16 to float32
exactly, so the comparison is float32 against float32 on identical weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# read relative to the repo, so the script runs from any clone
CONFIG = ROOT / "data" / "configs" / "qwen3_5-0.8b.config.json"
PROMPT_TOKENS, DECODE_STEPS = 64, 32


def default_out() -> Path:
    home = Path(os.environ.get("LATTICE_HOME") or "~/.cache/lattice").expanduser()
    return home / "bench" / "qwen3_5-0.8b-random"


def randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("linear_attn.norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name and "visual" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(("A_log", "dt_bias")):
                continue  # the reference's initialisation
            elif p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)


def mtp_tensors(text: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One MTP layer (full attention + MLP) and its fc / norms, shaped like the released
    checkpoints; transformers ignores them, lattice keeps them addressable."""
    h, f = text["hidden_size"], text["intermediate_size"]
    d, nq, nkv = text["head_dim"], text["num_attention_heads"], text["num_key_value_heads"]
    shapes = {
        "mtp.fc.weight": (h, 2 * h), "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,), "mtp.norm.weight": (h,),
        "mtp.layers.0.input_layernorm.weight": (h,),
        "mtp.layers.0.post_attention_layernorm.weight": (h,),
        "mtp.layers.0.self_attn.q_proj.weight": (2 * nq * d, h),
        "mtp.layers.0.self_attn.k_proj.weight": (nkv * d, h),
        "mtp.layers.0.self_attn.v_proj.weight": (nkv * d, h),
        "mtp.layers.0.self_attn.o_proj.weight": (h, nq * d),
        "mtp.layers.0.self_attn.q_norm.weight": (d,), "mtp.layers.0.self_attn.k_norm.weight": (d,),
        "mtp.layers.0.mlp.gate_proj.weight": (f, h), "mtp.layers.0.mlp.up_proj.weight": (f, h),
        "mtp.layers.0.mlp.down_proj.weight": (h, f),
    }
    return {k: 0.02 * torch.randn(s, generator=gen) for k, s in shapes.items()}


def write_checkpoint(raw: dict, out: Path, dtype_name: str) -> None:
    import transformers

    config = transformers.Qwen3_5Config(**{k: v for k, v in raw.items()
                                           if k not in ("architectures", "transformers_version")})
    t0 = time.time()
    model = transformers.Qwen3_5ForConditionalGeneration(config).float().eval()
    randomize(model, 0)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    # parameters only: buffers such as the rotary inv_freq must stay float32
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    gen = torch.Generator().manual_seed(1)
    state.update({k: v.to(dtype) for k, v in mtp_tensors(raw["text_config"], gen).items()})
    save_checkpoint(state, raw, out)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()) / 1e6:.0f}M params, "
          f"{dtype_name}) in {time.time() - t0:.0f} s", flush=True)


def save_checkpoint(state: dict[str, torch.Tensor], raw: dict, out: Path) -> None:
    """model.safetensors and config.json into `out`, each written whole then renamed (a
    half-written file never looks finished)."""
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json.tmp").write_text(json.dumps(raw, indent=2) + "\n")
    os.replace(out / "config.json.tmp", out / "config.json")


def main() -> int:
    import transformers
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out())
    parser.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-only", action="store_true",
                        help="keep the checkpoint in --out, recompute the reference logits")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    raw = json.loads(CONFIG.read_text())
    if not args.reference_only:
        write_checkpoint(raw, out, args.dtype)
    # the reference reads the checkpoint back, exactly as a user's transformers would
    t0 = time.time()
    model = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32).eval()
    # transformers float32 reference: one 64-token prefill, then 32 greedy decode steps
    vocab = raw["text_config"]["vocab_size"]
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2))
    first = model(prompt, use_cache=True)
    cache = first.past_key_values
    nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    ids, logits = [], []
    for _ in range(DECODE_STEPS):
        ids.append(nxt)
        step = model(nxt, past_key_values=cache, use_cache=True)
        cache = step.past_key_values
        logits.append(step.logits)
        nxt = step.logits[:, -1].argmax(-1, keepdim=True)
    ref = {"prompt_ids": prompt.to(torch.int64), "prefill_logits": first.logits.float(),
           "decode_ids": torch.cat(ids, 1).to(torch.int64),
           "decode_logits": torch.cat(logits, 1).float()}
    save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "reference.safetensors.tmp"))
    os.replace(out / "reference.safetensors.tmp", out / "reference.safetensors")
    print(f"reference logits in {time.time() - t0:.0f} s -> {out / 'reference.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
