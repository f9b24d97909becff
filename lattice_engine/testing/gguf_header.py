"""The hyperparameter keys llama.cpp's converter writes for a llama-family model, on a
`gguf.GGUFWriter`: what every test and bench that writes a tiny GGUF model starts with."""

from __future__ import annotations


def add_transformer_header(wr, *, layers: int, hidden: int, ffn: int, heads: int,
                           kv_heads: int, eps: float, theta: float = 10000.0,
                           context: int = 256) -> None:
    """Block count, context length, widths, head counts, RMS-norm epsilon and RoPE base."""
    wr.add_block_count(layers)
    wr.add_context_length(context)
    wr.add_embedding_length(hidden)
    wr.add_feed_forward_length(ffn)
    wr.add_head_count(heads)
    wr.add_head_count_kv(kv_heads)
    wr.add_layer_norm_rms_eps(eps)
    wr.add_rope_freq_base(float(theta))
