"""Fixtures for the plugin's tests: a tiny random-weight model folder and GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lattice_engine.testing.checkpoints import tiny_llama_config, tiny_llama_weights, write_tiny_llama

# the native marker, LATTICE_REQUIRE_NATIVE and a fresh plugin manager around every test,
# shared with the core's suite
pytest_plugins = ["lattice_engine.testing.pytest_plugin"]

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB, HEAD_DIM = 64, 4, 2, 96, 2, 256, 16
DIMS = dict(hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, ffn=FFN, layers=LAYERS, vocab=VOCAB)
CONFIG = tiny_llama_config(**DIMS)


def tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    return tiny_llama_weights(seed, **DIMS)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    return write_tiny_llama(tmp_path / "tiny", tokenizer=False, **DIMS)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
          "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")
    return f"blk.{parts[2]}.{_LAYER['.'.join(parts[3:-1])]}.weight"


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter row order for q/k (HF -> GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_tiny_gguf(path: Path, qtype) -> dict[str, np.ndarray]:
    """A tiny llama GGUF whose matrices are stored as `qtype` (gguf-py's quantizer);
    returns the HF-layout float weights it was made from."""
    import gguf
    w = tiny_weights()
    from lattice_engine.testing.gguf_header import add_transformer_header
    wr = gguf.GGUFWriter(str(path), "llama")
    add_transformer_header(wr, layers=LAYERS, hidden=HIDDEN, ffn=FFN, heads=HEADS,
                           kv_heads=KV_HEADS, eps=1e-5)
    for name, t in w.items():
        if ".q_proj." in name or ".k_proj." in name:
            t = gguf_permute(t, HEADS if ".q_proj." in name else KV_HEADS)
        if t.ndim == 2:
            wr.add_tensor(gguf_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            wr.add_tensor(gguf_name(name), t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return w

