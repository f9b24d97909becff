"""Tiny checkpoints for tests: a byte-level tokenizer, tokenizer files, and a random-weight
llama-family checkpoint written like an HF folder, so a plugin's suite can load, generate
and serve without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_tokenizer():
    """A 256-token byte-level BPE (no merges): every byte is one token, like the fixtures'
    vocab of 256, so text round-trips exactly and any token id decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    # order by byte value so token id == byte value
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable mapping of bytes, the alphabet ByteLevel uses
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def write_tokenizer_files(folder: Path, eos_token_id: int = 0,
                          chat_template: Optional[str] = CHATML) -> Path:
    """Give a model folder the byte-level tokenizer (token id == byte value), a chat
    template (ChatML by default) and its end-of-sequence id."""
    folder = Path(folder)
    byte_level_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"chat_template": chat_template} if chat_template else {}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}))
    return folder


def tiny_llama_weights(seed: int = 0, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                       ffn: int = 96, layers: int = 2, vocab: int = 256,
                       tied: bool = False) -> dict[str, np.ndarray]:
    """Random float32 weights of a llama checkpoint in HF names (scale 0.2: logits of a
    useful spread, not saturated)."""
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads

    def f(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {"model.embed_tokens.weight": f(vocab, hidden), "model.norm.weight": 1 + f(hidden)}
    if not tied:
        w["lm_head.weight"] = f(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": f(heads * head_dim, hidden),
                  p + "self_attn.k_proj.weight": f(kv_heads * head_dim, hidden),
                  p + "self_attn.v_proj.weight": f(kv_heads * head_dim, hidden),
                  p + "self_attn.o_proj.weight": f(hidden, heads * head_dim),
                  p + "mlp.gate_proj.weight": f(ffn, hidden),
                  p + "mlp.up_proj.weight": f(ffn, hidden),
                  p + "mlp.down_proj.weight": f(hidden, ffn),
                  p + "input_layernorm.weight": 1 + f(hidden),
                  p + "post_attention_layernorm.weight": 1 + f(hidden)})
    return w


def tiny_llama_config(hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 96,
                      layers: int = 2, vocab: int = 256, tied: bool = False) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": hidden // heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "vocab_size": vocab, "tie_word_embeddings": tied,
            "max_position_embeddings": 256, "hidden_act": "silu"}


def write_tiny_llama(folder: Path, seed: int = 0, tokenizer: bool = True, **dims) -> Path:
    """A random-weight llama HF folder (config.json, model.safetensors and, by default, the
    byte-level tokenizer files): small enough to load in milliseconds."""
    from safetensors.numpy import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_llama_weights(seed, **dims), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(tiny_llama_config(**dims)))
    if tokenizer:
        write_tokenizer_files(folder)
    return folder
