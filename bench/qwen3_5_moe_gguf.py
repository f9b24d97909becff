"""llama.cpp's GGUF files (Q8_0, Q4_0) of a random-weight Qwen3.5-MoE at Qwen3.5-35B-A3B's
shapes with few layers, for bench/moe.py --arch qwen3_5_moe.

    python bench/qwen3_5_moe_gguf.py --llama-cpp /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp
                                     [--layers 2] [--vocab 32768]

The shapes are transformers' Qwen3_5MoeTextConfig defaults, which are Qwen3.5-35B-A3B's:
hidden 2048, 256 experts, top-8, moe_intermediate 512, a shared expert of 512, Gated
DeltaNet layers of 16 key / 32 value heads of 128, gated full attention of 16 / 2 heads of
256. With --layers 2 the model is one DeltaNet layer and one full-attention layer
(Qwen3.5 interleaves them 3 : 1). Weights are N(0, 0.02) (norms 0.1 * N(0, 1), the
DeltaNet's own A_log / dt_bias initialisation), built by transformers'
Qwen3_5MoeForCausalLM and stored bf16 in $LATTICE_HOME/bench/qwen3_5_moe-<layers>L-v<vocab>/
(model.safetensors, config.json); llama.cpp's converter writes bf16.gguf from it
(scripts/make_qwen3_5_gguf.py: a byte-level toy tokenizer, which the converter pads to the
vocabulary: speed does not depend on the tokenizer), and llama.cpp's own quantizer
(`llama_model_quantize`, its default choices) makes q8_0.gguf and q4_0.gguf from that.
Needs torch and transformers (the reference's model classes) besides llama-cpp-python.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))
from make_qwen3_5_gguf import convert  # noqa: E402  (the converter run, shared with the fixtures)
from make_qwen3_5_checkpoint import randomize, save_checkpoint  # noqa: E402
from qwen3_5_gguf import quantize  # noqa: E402  (llama.cpp's quantizer)

FILES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def model_dir(layers: int, vocab: int) -> Path:
    home = Path(os.environ.get("LATTICE_HOME") or "~/.cache/lattice").expanduser()
    return home / "bench" / f"qwen3_5_moe-{layers}L-v{vocab}"


def config(layers: int, vocab: int) -> dict:
    """The HF config: Qwen3_5MoeTextConfig's defaults (Qwen3.5-35B-A3B) with `layers`
    layers, every fourth a full-attention one and the last always one (so a 2-layer model
    has both kinds) and `vocab` tokens."""
    from transformers import Qwen3_5MoeTextConfig
    kinds = ["full_attention" if (i + 1) % 4 == 0 or i == layers - 1 else "linear_attention"
             for i in range(layers)]
    c = Qwen3_5MoeTextConfig(num_hidden_layers=layers, vocab_size=vocab, layer_types=kinds,
                             tie_word_embeddings=False, max_position_embeddings=4096)
    raw = c.to_dict()
    raw["architectures"] = ["Qwen3_5MoeForCausalLM"]
    return raw


def write_checkpoint(out: Path, layers: int, vocab: int) -> None:
    import torch
    import transformers

    raw = config(layers, vocab)
    cfg = transformers.Qwen3_5MoeTextConfig(**{k: v for k, v in raw.items()
                                                if k not in ("architectures",
                                                             "transformers_version")})
    t0 = time.time()
    model = transformers.Qwen3_5MoeForCausalLM(cfg).eval()
    randomize(model, 0)  # the dense bench checkpoint's weight distribution
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(state, raw, out)
    print(f"wrote {out} ({sum(v.numel() for v in state.values()) / 1e6:.0f}M params, bf16) "
          f"in {time.time() - t0:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", type=Path, required=True,
                        help="llama.cpp source tree holding convert_hf_to_gguf.py")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args()
    out = model_dir(args.layers, args.vocab)
    if not (out / "model.safetensors").exists():
        write_checkpoint(out, args.layers, args.vocab)
    bf16 = out / "bf16.gguf"
    if not bf16.exists():
        convert(args.llama_cpp, out, bf16, "bf16")
    made = [bf16]
    for name, ftype in FILES.items():
        target = out / f"{name}.gguf"
        if not target.exists():
            quantize(bf16, target, ftype)
        made.append(target)
    print(*made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
