"""Importing a GGUF of architecture `qwen35` (Qwen3.5) or `qwen35moe` (Qwen3.5-MoE), as
llama.cpp's converter writes them.

llama.cpp's converter (conversion/qwen.py: Qwen3NextModel, _LinearAttentionVReorderBase,
_QwenMtpMixin) changes the checkpoint on the way out, and this module undoes each change, so
the model sees the HF checkpoint it would have read from safetensors:

- RMSNorm weights are stored as 1 + w (llama.cpp multiplies by the weight; HF's Qwen3.5 norm
  multiplies by 1 + w), except the gated norm of the linear-attention layers: we subtract 1.
  The subtraction is exact in float32 and the model adds the 1 back, so it multiplies by the
  stored 1 + w, the float32 sum the safetensors load computes (w itself keeps only the bits
  that survived 1 + w).
- A_log is stored as ssm_a = -exp(A_log): we take log(-ssm_a) (float64, rounded once).
- dt_bias is stored as ssm_dt.bias; the conv1d kernel [C, 1, K] as [C, K].
- When the linear attention has fewer key heads than value heads, the value heads are
  stored "tiled" ([k0, k1, k0, k1, ...] by group) instead of HF's "grouped" order ([k0, k0,
  k1, k1]), in the rows of in_proj_qkv's V part, in_proj_z, in_proj_a, in_proj_b, the
  V channels of conv1d, A_log, dt_bias and the columns of out_proj: we permute them back.
  Rows are permuted as they are, quantized or not; out_proj's columns move in whole head
  chunks, so a quantized out_proj is permuted block by block when a head is a whole number
  of blocks, and dequantized otherwise.
- The multi-token-prediction head (`mtp.*` in HF) is stored as extra layers after the model's
  (qwen35.nextn_predict_layers of them): its decoder layer as blk.{n}.*, its fc / norms as
  blk.{n}.nextn.{eh_proj,enorm,hnorm,shared_head_norm}: we name them back to mtp.*.

- Qwen3.5-MoE's experts are stored stacked per layer, gate and up apart
  (ffn_{gate,up,down}_exps: [E, I, H], [E, I, H], [E, H, I]) or, with the converter's
  --fuse-gate-up-exps, as one [E, 2I, H] (gate rows, then up rows: HF's gate_up_proj). They
  are named as `models/moe.py` reads them and handed out as views of the memory map
  (`gguf_file.stacked_loader`); the router, the shared expert and its gate keep HF's names.

Tensor names follow Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM (the text model under
`model.`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError
from .checkpoint import PackedTensor
from .gguf_file import names_shown, stacked_loader, to_float
from .stored import StoredTensor

ARCH = "qwen35"
MOE_ARCH = "qwen35moe"
ARCHES = (ARCH, MOE_ARCH)

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# GGUF tensor (after blk.N.) -> HF name (after the layer prefix), for decoder layers
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    # Qwen3.5-MoE: the router, the stacked experts (no .weight: moe.py's stacked layout),
    # the shared expert and its sigmoid gate
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_up_exps.weight": "mlp.experts.gate_up_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
# the MTP head's own tensors (blk.{n}.nextn.*) -> HF names
_NEXTN_NAMES = {"nextn.eh_proj.weight": "mtp.fc.weight",
                "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
                "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
                "nextn.shared_head_norm.weight": "mtp.norm.weight"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# norms stored as 1 + w (every RMSNorm but the linear attention's gated one)
_PLUS_ONE = re.compile(r"(layernorm|_norm|\.norm|pre_fc_norm_\w+)\.weight$")


def hf_name(gguf_name: str, n_layers: int) -> str | None:
    """The HF name of a qwen35 GGUF tensor, or None for one this module does not know."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if not m:
        return None
    index, rest = int(m.group(1)), m.group(2)
    if index >= n_layers:  # the MTP head's layers
        if rest in _NEXTN_NAMES and index == n_layers:
            return _NEXTN_NAMES[rest]
        return f"mtp.layers.{index - n_layers}.{_LAYER_NAMES[rest]}" \
            if rest in _LAYER_NAMES else None
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}" if rest in _LAYER_NAMES else None


def _value(meta: dict[str, Any], key: str, path: Path, default: Any = None) -> Any:
    arch = meta.get("general.architecture", ARCH)
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise CheckpointError(f"GGUF file {path} lacks metadata key {arch}.{key}, which a "
                              f"Qwen3.5 model needs; re-convert it with llama.cpp's converter")
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise CheckpointError(f"GGUF file {path}: {arch}.{key} = {value!r} is not a number; "
                              f"the metadata is corrupt, re-convert the model")
    if not isinstance(value, list) and not value > 0:
        raise CheckpointError(f"GGUF file {path}: {arch}.{key} = {value!r} must be > 0; "
                              f"the metadata is corrupt, re-convert the model")
    return value


def _moe_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                path: Path) -> dict[str, Any]:
    """The MoE keys of a qwen35moe GGUF's HF config. Qwen3.5-MoE routes by a softmax and
    always renormalises its top-k (models/qwen3_5_moe.py); a file that says otherwise is
    another model."""
    gating = meta.get(f"{MOE_ARCH}.expert_gating_func")
    if gating not in (None, 1):  # llama.cpp: 1 softmax, 2 sigmoid, 3 softmax of the top-k
        raise CheckpointError(f"GGUF file {path}: {MOE_ARCH}.expert_gating_func = {gating!r}, "
                              f"but Qwen3.5-MoE routes by a softmax over all experts (1); "
                              f"this is not a Qwen3.5-MoE model")
    if meta.get(f"{MOE_ARCH}.expert_weights_norm") is False:
        raise CheckpointError(f"GGUF file {path}: {MOE_ARCH}.expert_weights_norm is false, but "
                              f"Qwen3.5-MoE always renormalises its top-k expert weights; "
                              f"this is not a Qwen3.5-MoE model")
    shared = meta.get(f"{MOE_ARCH}.expert_shared_feed_forward_length")
    if shared is None:  # not written: the shared expert's width from its tensor, if any
        shared = shapes.get("blk.0.ffn_gate_shexp.weight", (0,))[0]
    elif isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
        raise CheckpointError(f"GGUF file {path}: {MOE_ARCH}.expert_shared_feed_forward_length "
                              f"= {shared!r} must be an integer >= 0; the metadata is corrupt, "
                              f"re-convert the model")
    return {"num_experts": int(_value(meta, "expert_count", path)),
            "num_experts_per_tok": int(_value(meta, "expert_used_count", path)),
            "moe_intermediate_size": int(_value(meta, "expert_feed_forward_length", path)),
            "shared_expert_intermediate_size": int(shared)}


def build_config(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 path: Path) -> dict[str, Any]:
    """The HF config of a qwen35 GGUF (Qwen3_5ForCausalLM, model_type qwen3_5_text) or of a
    qwen35moe one (Qwen3_5MoeForCausalLM, qwen3_5_moe_text)."""
    arch = meta.get("general.architecture", ARCH)
    moe = arch == MOE_ARCH
    blocks = int(_value(meta, "block_count", path))
    n_mtp = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    n_layers = blocks - n_mtp
    if n_layers < 1:
        raise CheckpointError(f"GGUF file {path}: {arch}.block_count = {blocks} leaves no "
                              f"decoder layer besides {n_mtp} MTP layers; the file is corrupt")
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    interval = int(_value(meta, "full_attention_interval", path, 4))
    if isinstance(recurrent, list):
        if len(recurrent) < n_layers:
            raise CheckpointError(f"GGUF file {path}: {arch}.attention.recurrent_layers lists "
                                  f"{len(recurrent)} layers, the model has {n_layers}")
        layer_types = ["linear_attention" if r else "full_attention" for r in recurrent[:n_layers]]
    else:
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                       for i in range(n_layers)]
    head_dim = int(_value(meta, "attention.key_length", path))
    rope_dim = int(_value(meta, "rope.dimension_count", path))
    sections = meta.get(f"{arch}.rope.dimension_sections") or [11, 11, 10, 0]
    value_heads = int(_value(meta, "ssm.time_step_rank", path))
    embed = shapes.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"GGUF file {path} has no token_embd.weight tensor; it is not a "
                              f"complete Qwen3.5 model")
    config: dict[str, Any] = {
        "architectures": ["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "hidden_size": int(_value(meta, "embedding_length", path)),
        "num_hidden_layers": n_layers,
        "layer_types": layer_types,
        "full_attention_interval": interval,
        "num_attention_heads": int(_value(meta, "attention.head_count", path)),
        "num_key_value_heads": int(_value(meta, "attention.head_count_kv", path)),
        "head_dim": head_dim,
        # stored as float32: the shortest decimal that round-trips (1e-06, not 9.99e-07)
        "rms_norm_eps": float(str(np.float32(_value(meta, "attention.layer_norm_rms_epsilon",
                                                    path)))),
        "max_position_embeddings": int(_value(meta, "context_length", path)),
        "linear_conv_kernel_dim": int(_value(meta, "ssm.conv_kernel", path)),
        "linear_key_head_dim": int(_value(meta, "ssm.state_size", path)),
        "linear_num_key_heads": int(_value(meta, "ssm.group_count", path)),
        "linear_num_value_heads": value_heads,
        "linear_value_head_dim": int(_value(meta, "ssm.inner_size", path)) // value_heads,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": float(_value(meta, "rope.freq_base", path, 10000.0)),
            "partial_rotary_factor": rope_dim / head_dim,
            "mrope_section": [int(s) for s in sections[:3]],
            "mrope_interleaved": True,  # Qwen3.5 always interleaves (the converter's note)
        },
        "vocab_size": int(embed[0]),
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_act": "silu",
        "attention_bias": False,
    }
    if moe:
        config.update(_moe_config(meta, shapes, path))
    else:  # a MoE file has no dense MLP width
        config["intermediate_size"] = int(_value(meta, "feed_forward_length", path))
    if n_mtp:
        config["mtp_num_hidden_layers"] = n_mtp
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if isinstance(meta.get(meta_key), int) and not isinstance(meta[meta_key], bool):
            config[key] = int(meta[meta_key])
    return config


def grouped_order(n: int, num_k_heads: int, per_k: int, head_dim: int) -> np.ndarray:
    """Index that turns the converter's tiled value-head order back into HF's grouped one
    along an axis of n = num_k_heads * per_k * head_dim entries: `hf = gguf[idx]`."""
    if n != num_k_heads * per_k * head_dim:
        raise CheckpointError(f"{n} value channels cannot be {num_k_heads} key heads x {per_k} "
                              f"value heads x {head_dim}; the GGUF metadata does not match "
                              f"its tensors")
    # gguf position of (k, j, d) is (j, k, d): tiled = [per_k, num_k, head_dim]
    tiled = np.arange(n).reshape(per_k, num_k_heads, head_dim)
    return tiled.transpose(1, 0, 2).reshape(-1)


class _Fix:
    """How one tensor goes from the file to HF: a row order, a column order (in head
    chunks), a reshape, an elementwise map."""

    def __init__(self) -> None:
        self.rows: np.ndarray | None = None
        self.cols: np.ndarray | None = None
        self.col_chunk = 1
        self.shape: tuple[int, ...] | None = None
        self.fn: Callable[[np.ndarray], np.ndarray] | None = None


def _fixes(name: str, config: dict[str, Any], gguf_shape: tuple[int, ...]) -> _Fix:
    fix = _Fix()
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    reorder = nk != nv and ".linear_attn." in name
    per_k = nv // nk
    qk = 2 * nk * dk
    if name.endswith("linear_attn.in_proj_qkv.weight") and reorder:
        fix.rows = np.concatenate([np.arange(qk), qk + grouped_order(nv * dv, nk, per_k, dv)])
    elif name.endswith("linear_attn.in_proj_z.weight") and reorder:
        fix.rows = grouped_order(nv * dv, nk, per_k, dv)
    elif name.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")) \
            and reorder:
        fix.rows = grouped_order(nv, nk, per_k, 1)
    elif name.endswith("linear_attn.out_proj.weight") and reorder:
        fix.cols, fix.col_chunk = grouped_order(nv, nk, per_k, 1), dv
    elif name.endswith("linear_attn.conv1d.weight"):
        if reorder:
            fix.rows = np.concatenate([np.arange(qk), qk + grouped_order(nv * dv, nk, per_k, dv)])
        fix.shape = (gguf_shape[0], 1, gguf_shape[-1])
    elif name.endswith(("linear_attn.A_log", "linear_attn.dt_bias")):
        if reorder:
            fix.rows = grouped_order(nv, nk, per_k, 1)
        if name.endswith("A_log"):
            fix.fn = lambda a: np.log(-a.astype(np.float64)).astype(np.float32)
    elif name.endswith("mlp.shared_expert_gate.weight") and len(gguf_shape) == 1:
        fix.shape = (1, gguf_shape[0])  # HF's [1, H]; a file may store it 1-D
    elif _PLUS_ONE.search(name) and not name.endswith("linear_attn.norm.weight"):
        fix.fn = lambda w: (w.astype(np.float32) - np.float32(1.0)).astype(np.float32)
    return fix


def _row_decoder(t: Any, cols: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda raw: to_float(t, raw).reshape(raw.shape[0], cols)


def _float_loader(t: Any, fix: _Fix) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        w = to_float(t, t.data.view(np.ndarray)).reshape(t.shape)
        if fix.rows is not None:
            w = w[fix.rows]
        if fix.cols is not None:
            chunk = fix.col_chunk
            w = w.reshape(w.shape[0], -1, chunk)[:, fix.cols].reshape(w.shape[0], -1)
        if fix.fn is not None:
            w = fix.fn(w)
        return np.ascontiguousarray(w.reshape(fix.shape) if fix.shape else w)
    return load


def _packed_loader(path: Path, t: Any, fmt: str, fix: _Fix, hf_shape: tuple[int, ...],
                   block_bytes: int, block: int) -> Callable[[], Any]:
    from . import hugepages

    def load() -> Any:
        rows = hf_shape[0]
        data = hugepages.read_into(path, t.offset, hugepages.empty((rows, t.n_bytes // rows)))
        if fix.rows is not None:
            data = data[fix.rows]
        if fix.cols is not None:  # whole blocks move with their head (checked by the caller)
            per_chunk = fix.col_chunk // block
            data = data.reshape(rows, -1, per_chunk * block_bytes)[:, fix.cols]
            data = np.ascontiguousarray(data.reshape(rows, -1))
        return PackedTensor(format=fmt, shape=hf_shape, data=data)
    return load


def tensors(path: Path, gguf_tensors: list[Any], config: dict[str, Any],
            packed_formats: dict[int, str]) -> tuple[dict[str, Callable[[], Any]],
                                                    dict[str, tuple[int, ...]]]:
    """Lazy loaders and HF shapes of every tensor of a qwen35 GGUF, by HF name."""
    from gguf import GGML_QUANT_SIZES

    n_layers = config["num_hidden_layers"]
    unknown = sorted(t.name for t in gguf_tensors if hf_name(t.name, n_layers) is None)
    if unknown:
        raise CheckpointError(
            f"GGUF file {path} holds tensors lattice cannot place in a Qwen3.5 model: "
            f"{names_shown(unknown)}; this variant is "
            f"not supported, use the model's HF folder instead")
    loaders: dict[str, Callable[[], Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for t in gguf_tensors:
        name = hf_name(t.name, n_layers)
        fix = _fixes(name, config, t.shape)
        shape = fix.shape or tuple(t.shape)
        block, block_bytes = GGML_QUANT_SIZES[t.tensor_type]
        fmt = packed_formats.get(int(t.tensor_type))
        whole_blocks = fix.cols is None or fix.col_chunk % block == 0
        if len(t.shape) == 3:  # stacked experts (no fix applies): views of the map
            loaders[name], shapes[name] = stacked_loader(t, packed_formats, shape), shape
            continue
        if fmt is not None and len(t.shape) == 2 and fix.fn is None and whole_blocks:
            load = _packed_loader(path, t, fmt, fix, shape, block_bytes, block)
        else:
            load = _float_loader(t, fix)
        plain = fix.rows is None and fix.cols is None and fix.fn is None and fix.shape is None
        if plain and len(shape) == 2 and t.n_bytes:
            # a matrix converted at load (F16 -> q8_0, ...) is read a slice of rows at a time
            load = StoredTensor(load, path, t.offset, shape, t.n_bytes // shape[0],
                                _row_decoder(t, shape[1]), fmt or t.tensor_type.name.lower())
        loaders[name] = load
        shapes[name] = shape
    return loaders, shapes
