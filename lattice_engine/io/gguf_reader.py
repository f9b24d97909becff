"""Importing a GGUF file as a `Checkpoint` in HF layout.

This module owns: opening a GGUF (parsed by `gguf_file`, memory-mapped), turning its metadata into an HF `config.json` dict, renaming tensors to HF names, undoing
llama.cpp's q/k row permutation for llama, and handing each tensor out lazily, either
dequantized to float32 or, for the ggml types the caller can use as they are, as a
`PackedTensor` of the file's own bytes; the loaders of 2-D tensors can also read their
rows slice by slice (`io/stored.py`) for conversion to another format. The tokenizer is rebuilt by `gguf_tokenizer`.

Supported architectures: `SUPPORTED_ARCHITECTURES`. A truncated or corrupt file raises
`CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CheckpointError
from . import gguf_file, gguf_qwen35, hugepages
from .checkpoint import Checkpoint, PackedTensor
from .gguf_tokenizer import build_tokenizer, tokenizer_configs
from .stored import StoredTensor

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe") + gguf_qwen35.ARCHES
_HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
_MODEL_TYPE = {"qwen3moe": "qwen3_moe"}  # the HF model_type where it differs from the arch

_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                # mixture of experts: the router and the experts stacked [E, rows, cols]
                # (models/moe.py reads these names)
                "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj",
                "ffn_up_exps": "mlp.experts.up_proj", "ffn_down_exps": "mlp.experts.down_proj",
                # --fuse-gate-up-exps: gate rows then up rows per expert, as HF's fused layout
                "ffn_gate_up_exps": "mlp.experts.gate_up_proj"}
_STACKED = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_up_exps")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_MAGIC = b"GGUF"


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if this module does not know it."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m and m.group(2) in _STACKED:  # 3-D: named like transformers' fused experts
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved-rope q/k rows back into HF's.

    llama.cpp's converter stores, per head, row (i, half) where HF has row (half, i)
    (i < head_dim/2). `hf = gguf[idx]` with the returned `idx`.
    """
    if n_rows % (2 * n_heads):
        raise CheckpointError(
            f"a q/k projection with {n_rows} rows cannot be split into {n_heads} heads of "
            f"even size; the head counts in the GGUF metadata do not match its tensors")
    half = n_rows // n_heads // 2
    return np.arange(n_rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)


def _f32_value(v: Any) -> Any:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99e-06)."""
    return float(str(np.float32(v))) if isinstance(v, float) else v


def _open(path: Path) -> tuple[dict[str, Any], list[Any]]:
    """Metadata and tensor directory of `path`; every parse failure is a CheckpointError."""
    from .gguf_file import read_gguf
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path or run "
                              f"`lattice pull` for a catalog model")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file: it starts with {head!r}, a GGUF "
                              f"starts with {_GGUF_MAGIC!r}; pass a .gguf file or an HF folder")
    return read_gguf(path)


def _arch_value(meta: dict[str, Any], arch: str, key: str, path: Path, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise CheckpointError(f"GGUF file {path} lacks metadata key {arch}.{key}, which a "
                              f"{arch} model needs; re-convert it with llama.cpp's converter")
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"GGUF file {path}: {arch}.{key} varies per layer ({value}); "
                                  f"lattice needs one value for every layer")
        value = value[0]
    return value


def _arch_number(meta: dict[str, Any], arch: str, key: str, path: Path, default: Any = None,
                 integer: bool = True) -> Any:
    """A count or size (an integer >= 1) or a finite positive float from the metadata; a
    string, 0 or a negative value is a CheckpointError naming the key, not a traceback."""
    value = _arch_value(meta, arch, key, path, default)
    if integer:
        ok, form = isinstance(value, int) and not isinstance(value, bool) and value >= 1, \
            "a positive integer"
    else:
        ok, form = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            np.isfinite(value) and value > 0, "a finite number > 0"
    if not ok:
        raise CheckpointError(f"GGUF file {path}: {arch}.{key} = {value!r} must be {form}; "
                              f"the metadata is corrupt, re-convert the model")
    return value


def build_config(meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]],
                 path: Path) -> dict[str, Any]:
    """The HF config.json dict of a GGUF model (shapes are HF shapes by GGUF name)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF file {path} has architecture {arch!r}; supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}; use the model's HF folder instead")
    hidden = _arch_number(meta, arch, "embedding_length", path)
    heads = _arch_number(meta, arch, "attention.head_count", path)
    kv_heads = _arch_number(meta, arch, "attention.head_count_kv", path, heads)
    head_dim = _arch_number(meta, arch, "attention.key_length", path, max(hidden // heads, 1))
    embed = tensor_shapes.get("token_embd.weight")
    if embed is None:
        raise CheckpointError(f"GGUF file {path} has no token_embd.weight tensor; it is not "
                              f"a complete {arch} model")
    config: dict[str, Any] = {
        "architectures": [_HF_CLASS[arch]],
        "model_type": _MODEL_TYPE.get(arch, arch),
        "hidden_size": hidden,
        "intermediate_size": _arch_number(
            meta, arch, "feed_forward_length", path,
            meta.get(f"{arch}.expert_feed_forward_length") if arch == "qwen3moe" else None),
        "num_hidden_layers": _arch_number(meta, arch, "block_count", path),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_arch_number(meta, arch, "attention.layer_norm_rms_epsilon",
                                           path, integer=False)),
        "rope_theta": float(_arch_number(meta, arch, "rope.freq_base", path, 10000.0,
                                         integer=False)),
        "max_position_embeddings": _arch_number(meta, arch, "context_length", path),
        "vocab_size": int(embed[0]),
        "tie_word_embeddings": "output.weight" not in tensor_shapes,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensor_shapes,
        "mlp_bias": False,
    }
    if arch == "qwen3moe":
        config.update(moe_config(meta, arch, tensor_shapes, config["num_hidden_layers"], path))
    for key, meta_key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        if isinstance(meta.get(meta_key), int) and not isinstance(meta[meta_key], bool):
            config[key] = int(meta[meta_key])
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        scaling: dict[str, Any] = {"rope_type": kind}
        for key, hf_key in (("factor", "factor"),
                            ("original_context_length", "original_max_position_embeddings"),
                            ("attn_factor", "attention_factor"),
                            ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if f"{arch}.rope.scaling.{key}" in meta:
                scaling[hf_key] = meta[f"{arch}.rope.scaling.{key}"]
        config["rope_scaling"] = scaling
    return config


def moe_config(meta: dict[str, Any], arch: str, tensor_shapes: dict[str, tuple[int, ...]],
               layers: int, path: Path) -> dict[str, Any]:
    """The MoE keys of an HF config from GGUF metadata. GGUF has no decoder_sparse_step /
    mlp_only_layers: a layer is sparse when it has a router (ffn_gate_inp); llama.cpp
    renormalises the top-k weights unless expert_weights_norm says otherwise."""
    norm = meta.get(f"{arch}.expert_weights_norm", True)
    return {
        "num_experts": _arch_number(meta, arch, "expert_count", path),
        "num_experts_per_tok": _arch_number(meta, arch, "expert_used_count", path),
        "moe_intermediate_size": _arch_number(meta, arch, "expert_feed_forward_length", path),
        "norm_topk_prob": bool(norm),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(layers)
                            if f"blk.{i}.ffn_gate_inp.weight" not in tensor_shapes],
    }


def _loader(path: Path, t: Any, packed_formats: dict[int, str], rows_order: np.ndarray | None,
            hf_shape: tuple[int, ...]) -> Callable[[], Any]:
    ggml_type = int(t.tensor_type)

    def to_float(raw: np.ndarray) -> np.ndarray:
        return gguf_file.to_float(t, raw)

    if len(hf_shape) == 3 and rows_order is None:  # stacked experts: views of the map
        return gguf_file.stacked_loader(t, packed_formats, hf_shape)

    def load() -> Any:
        if len(hf_shape) == 2 and ggml_type in packed_formats:
            # read (not map) into huge-page memory: see io/hugepages.py
            data = hugepages.read_into(path, t.offset,
                                       hugepages.empty((hf_shape[0], t.n_bytes // hf_shape[0])))
            if rows_order is not None:
                data = data[rows_order]
            return PackedTensor(format=packed_formats[ggml_type], shape=hf_shape, data=data)
        w = to_float(t.data.view(np.ndarray)).reshape(hf_shape)
        return w[rows_order] if rows_order is not None else w

    if len(hf_shape) != 2 or rows_order is not None or not t.n_bytes:
        return load
    stored = packed_formats.get(ggml_type, t.tensor_type.name.lower())
    return StoredTensor(load, path, t.offset, hf_shape, t.n_bytes // hf_shape[0],
                        lambda raw: to_float(raw).reshape(raw.shape[0], hf_shape[1]), stored)


def load_gguf(path: str | Path, packed_formats: dict[int, str] | None = None) -> Checkpoint:
    """Open a GGUF file as a Checkpoint with HF config, HF tensor names and a tokenizer.

    Args:
        path: the .gguf file.
        packed_formats: ggml type id -> lattice weight-format name. 2-D tensors of those
            types are handed out as `PackedTensor`s of the file's bytes ([rows, row_bytes],
            a view of the memory map unless llama's q/k rows had to be reordered); every
            other tensor is dequantized to float32. 1-D tensors are always float32.
    """
    path = Path(path)
    packed_formats = dict(packed_formats or {})
    meta, gguf_tensors = _open(path)
    gguf_shapes = {t.name: t.shape for t in gguf_tensors}
    if meta.get("general.architecture") in gguf_qwen35.ARCHES:
        config = gguf_qwen35.build_config(meta, gguf_shapes, path)
        tensors, shapes = gguf_qwen35.tensors(path, gguf_tensors, config, packed_formats)
        types = {gguf_qwen35.hf_name(t.name, config["num_hidden_layers"]): int(t.tensor_type)
                 for t in gguf_tensors}
        return _checkpoint(path, meta, config, tensors, shapes, types)
    config = build_config(meta, gguf_shapes, path)

    unknown = sorted(n for n in gguf_shapes if hf_tensor_name(n) is None)
    if unknown:
        raise CheckpointError(
            f"GGUF file {path} holds tensors lattice cannot place in a {config['model_type']} "
            f"model: {gguf_file.names_shown(unknown)}; this "
            f"variant is not supported, use the model's HF folder instead")
    permute = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors: dict[str, Callable[[], Any]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    types: dict[str, int] = {}
    for t in gguf_tensors:
        name, shape = hf_tensor_name(t.name), gguf_shapes[t.name]
        rows_order = None
        m = _LAYER_RE.match(t.name)
        if m and m.group(2) in permute and shape[0] != permute[m.group(2)] * config["head_dim"]:
            raise CheckpointError(
                f"GGUF file {path}: tensor {t.name!r} has {shape[0]} rows, but the metadata "
                f"says {permute[m.group(2)]} heads of {config['head_dim']}; the file is "
                f"inconsistent, re-convert it")
        if config["model_type"] == "llama" and m and m.group(2) in permute:
            rows_order = unpermute_rows(shape[0], permute[m.group(2)])
        tensors[name] = _loader(path, t, packed_formats, rows_order, shape)
        shapes[name] = shape
        types[name] = int(t.tensor_type)

    return _checkpoint(path, meta, config, tensors, shapes, types)


def _checkpoint(path: Path, meta: dict[str, Any], config: dict[str, Any],
                tensors: dict[str, Callable[[], Any]],
                shapes: dict[str, tuple[int, ...]], types: dict[str, int]) -> Checkpoint:
    source = str(path)
    tokenizer = build_tokenizer(meta, source) if "tokenizer.ggml.tokens" in meta else None
    tokenizer_config, generation_config = tokenizer_configs(meta, source)
    return Checkpoint(config=config, tensors=tensors, shapes=shapes, tokenizer=tokenizer,
                      tokenizer_config=tokenizer_config, generation_config=generation_config,
                      source=source, stored_types=types)
