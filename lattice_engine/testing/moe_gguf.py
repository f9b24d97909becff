"""Writing a Qwen3-MoE checkpoint (HF layout: config dict + float32 tensors by HF name) as a
GGUF file of architecture `qwen3moe`, laid out as llama.cpp's converter lays it out: the
experts of a layer stacked into ffn_{gate,up,down}_exps [E, rows, cols], the router as
ffn_gate_inp, norms in f32, matrices in the asked ggml type. For the tests (GGUF loading)
and bench/moe.py (the same file for lattice and llama.cpp); needs the `gguf` package.

The tokenizer written is a stand-in (byte-level GPT-2 style: the byte symbols (all 256 when
the vocabulary has room), then filler symbols t0, t1, ... up to its size, one merge): the benches and tests
feed token ids, and llama.cpp needs some vocabulary to load the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np

_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight",
          "self_attn.k_norm.weight": "attn_k_norm.weight",
          "input_layernorm.weight": "attn_norm.weight",
          "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight"}


def _vocab(size: int) -> list[str]:
    from ..io.gguf_tokenizer import byte_alphabet
    tokens = [byte_alphabet()[b] for b in range(min(256, size - 1))]
    return tokens + [f"t{i}" for i in range(size - len(tokens))]


def write_qwen3_moe_gguf(path: Path, config: Mapping, tensor: Callable[[str], np.ndarray],
                         ggml_type: str = "F32", fuse_gate_up: bool = False) -> Path:
    """Write `path`. `tensor(hf_name)` returns a float32 array (called once per tensor, so a
    large random model can be generated lazily); ggml_type is F32, F16, Q8_0 or Q4_0 for
    the matrices (the router and 1-D tensors stay F32, as llama.cpp's quantizer keeps
    ffn_gate_inp in a float type; with Q4_0 the embedding and output matrices are Q8_0,
    as llama.cpp's quantizer keeps the output at a higher precision). `fuse_gate_up`
    writes each layer's gate and up experts as one ffn_gate_up_exps [E, 2I, H] (gate rows
    first), as the converter's --fuse-gate-up-exps does."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    c = dict(config)
    experts = c.get("num_experts") or c.get("num_local_experts")
    layers, hidden = c["num_hidden_layers"], c["hidden_size"]
    vocab = c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    sparse = [i not in (c.get("mlp_only_layers") or []) and
              (i + 1) % c.get("decoder_sparse_step", 1) == 0 for i in range(layers)]
    wr = gguf.GGUFWriter(str(path), "qwen3moe")
    wr.add_block_count(layers)
    wr.add_context_length(c.get("max_position_embeddings", 4096))
    wr.add_embedding_length(hidden)
    wr.add_feed_forward_length(c.get("intermediate_size") or c["moe_intermediate_size"])
    wr.add_head_count(c["num_attention_heads"])
    wr.add_head_count_kv(c.get("num_key_value_heads") or c["num_attention_heads"])
    wr.add_key_length(head_dim)
    wr.add_value_length(head_dim)
    wr.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    wr.add_rope_freq_base(float(theta))
    wr.add_expert_count(experts)
    wr.add_expert_used_count(c["num_experts_per_tok"])
    wr.add_expert_feed_forward_length(c["moe_intermediate_size"])
    wr.add_bool("qwen3moe.expert_weights_norm", bool(c.get("norm_topk_prob", False)))
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    tokens = _vocab(vocab)
    wr.add_token_list(tokens)
    wr.add_token_types([1] * vocab)
    wr.add_token_merges(["t 0"])  # "t0", the first filler symbol
    wr.add_bos_token_id(0)
    wr.add_eos_token_id(1)
    wr.add_add_bos_token(False)

    def put(name: str, w: np.ndarray) -> None:
        w = np.ascontiguousarray(w, dtype=np.float32)
        t = qtype
        if t == gguf.GGMLQuantizationType.Q4_0 and name in ("token_embd.weight", "output.weight"):
            t = gguf.GGMLQuantizationType.Q8_0
        if w.ndim >= 2 and t != gguf.GGMLQuantizationType.F32 and \
                not name.endswith("ffn_gate_inp.weight"):
            if t == gguf.GGMLQuantizationType.F16:
                wr.add_tensor(name, w.astype(np.float16))
            else:
                wr.add_tensor(name, gguf.quants.quantize(w, t), raw_dtype=t)
        else:
            wr.add_tensor(name, w)

    put("token_embd.weight", tensor("model.embed_tokens.weight"))
    for i in range(layers):
        p = f"model.layers.{i}."
        for hf, g in _LAYER.items():
            if hf.startswith("mlp.") and sparse[i] != (hf == "mlp.gate.weight"):
                continue
            put(f"blk.{i}.{g}", tensor(p + hf))
        if sparse[i]:
            def stacked(part: str) -> np.ndarray:
                return np.stack([tensor(f"{p}mlp.experts.{e}.{part}_proj.weight")
                                 for e in range(experts)])
            if fuse_gate_up:
                put(f"blk.{i}.ffn_gate_up_exps.weight",
                    np.concatenate([stacked("gate"), stacked("up")], axis=1))
            for part in ("down",) if fuse_gate_up else ("gate", "up", "down"):
                put(f"blk.{i}.ffn_{part}_exps.weight", stacked(part))
    put("output_norm.weight", tensor("model.norm.weight"))
    if not c.get("tie_word_embeddings", False):
        put("output.weight", tensor("lm_head.weight"))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return Path(path)
