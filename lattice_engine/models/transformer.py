"""The standard pre-norm decoder (Llama family): RMSNorm -> GQA attention with RoPE ->
RMSNorm -> SwiGLU MLP, residual around each.

llama, qwen2 and qwen3 differ only in switches (QKV bias, per-head q/k RMSNorm), so they
share this file and keep only their config and checkpoint fix-ups in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..cache.dense import KVCache, key_transform
from ..errors import CheckpointError
from .base import (CausalLM, Linear, WeightLoader, check_tokens, config_from_dict,
                   name_linears, project, rope_inv_freq)
from ..kernels.steps import FUSED_ROWS
from .transformer_step import DecoderStep


@dataclass
class DecoderConfig:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_parameters: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    # {"down_proj": {"block": p, "mix": [[...]]}, ...}: rotate a linear's input online
    # ("down_proj": the MLP activations; "attn_in" / "mlp_in": the normed stream read by
    # q/k/v / gate/up; "o_proj": the attention output), written by weight transforms such
    # as QuaRot (see `online_rotation`)
    lattice_online_rotation: Optional[dict] = None
    # the quant role of an untied lm_head: "tied_embedding" when a weight transform untied
    # a tied one (QuaRot), so it keeps a tied head's precision (see `head_role`)
    lattice_lm_head_role: str = "lm_head"

    def __post_init__(self) -> None:
        head_role(self.lattice_lm_head_role)
        check_rotation_sites(self.lattice_online_rotation)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:  # transformers >= 5 keeps theta and scaling together
            params = dict(self.rope_parameters)
            self.rope_theta = params.get("rope_theta", self.rope_theta)
            if params.get("rope_type", "default") != "default":
                self.rope_scaling = params
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; the config is invalid")
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act={self.hidden_act!r} is not supported; "
                                  f"supported: silu")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "DecoderConfig":
        return config_from_dict(cls, params)


HEAD_ROLES = ("lm_head", "tied_embedding")


def head_role(role: str) -> str:
    """The checked `lattice_lm_head_role` of a config."""
    if role not in HEAD_ROLES:
        raise CheckpointError(f"lattice_lm_head_role = {role!r} is not one of "
                              f"{', '.join(HEAD_ROLES)}; fix or remove it in config.json")
    return role


ROTATION_SITES = ("down_proj", "attn_in", "mlp_in", "o_proj")


def check_rotation_sites(spec: Optional[dict], supported: tuple = ROTATION_SITES) -> None:
    """A config must not ask for an online rotation the model would silently skip."""
    unknown = sorted(set(spec or {}) - set(supported))
    if unknown:
        raise CheckpointError(f"lattice_online_rotation asks for {', '.join(unknown)}, which "
                              f"this model does not apply (supported: {', '.join(supported)});"
                              f" rebuild the checkpoint with a transform this model supports")


def online_rotation(spec: Optional[dict], where: str, width: int):
    """(mix [m, m] float32, block) for `ops.block_rotate` from a checkpoint config's
    `lattice_online_rotation[where]`, or None when the checkpoint asks for none."""
    entry = (spec or {}).get(where)
    if entry is None:
        return None
    try:
        block = int(entry["block"])
        mix = np.asarray(entry["mix"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"lattice_online_rotation.{where} must be {{'block': int, "
                              f"'mix': [[...]]}}, got {entry!r}") from exc
    m = mix.shape[0] if mix.ndim == 2 else 0
    if block < 1 or block & (block - 1) or mix.shape != (m, m) or m * block != width or \
            not np.allclose(mix @ mix.T, np.eye(m), atol=1e-4):
        raise CheckpointError(
            f"lattice_online_rotation.{where}: block {block} (a power of two) times an "
            f"orthogonal mix {mix.shape} must cover the {width} activations")
    return mix, block


class Attention:
    def __init__(self, cfg: DecoderConfig, w: WeightLoader, prefix: str, qkv_bias: bool,
                 qk_norm: bool):
        h, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.nq, self.nkv, self.d = nq, nkv, d
        self.eps = cfg.rms_norm_eps
        bias = (lambda name, n: w.vector(f"{prefix}.{name}.bias", (n,))) if qkv_bias else (
            lambda name, n: None)
        self.q_proj = Linear(w.matrix(f"{prefix}.q_proj.weight", (nq * d, h), "linear"),
                             bias("q_proj", nq * d))
        self.k_proj = Linear(w.matrix(f"{prefix}.k_proj.weight", (nkv * d, h), "linear"),
                             bias("k_proj", nkv * d))
        self.v_proj = Linear(w.matrix(f"{prefix}.v_proj.weight", (nkv * d, h), "linear"),
                             bias("v_proj", nkv * d))
        o_bias = (w.vector(f"{prefix}.o_proj.bias", (h,))
                  if cfg.attention_bias and w.has(f"{prefix}.o_proj.bias") else None)
        self.o_proj = Linear(w.matrix(f"{prefix}.o_proj.weight", (h, nq * d), "linear"), o_bias)
        self.q_norm = w.vector(f"{prefix}.q_norm.weight", (d,)) if qk_norm else None
        self.k_norm = w.vector(f"{prefix}.k_norm.weight", (d,)) if qk_norm else None
        self.o_rotation = online_rotation(cfg.lattice_online_rotation, "o_proj", nq * d)
        name_linears(self, prefix)

    def project_out(self, out, ops):
        """o_proj of the attention output [..., nq * d] (rotated online first if asked)."""
        if self.o_rotation is not None:
            out = ops.block_rotate(out, *self.o_rotation)
        return self.o_proj(out, ops)

    def __call__(self, x, layer, cache: KVCache, cos, sin, ops):
        b, t, _ = x.shape
        q = self.q_proj(x, ops).reshape(b, t, self.nq, self.d)
        k = self.k_proj(x, ops).reshape(b, t, self.nkv, self.d)
        v = self.v_proj(x, ops).reshape(b, t, self.nkv, self.d)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm, self.eps)
            k = ops.rms_norm(k, self.k_norm, self.eps)
        q = ops.rope(q, cos, sin)
        k = ops.rope(k, cos, sin)
        start = cache.offset
        keys, values, layout = cache.store(layer, k, v)
        out = ops.attention(q, keys, values, start, 1.0 / np.sqrt(self.d), kv=layout)
        return self.project_out(out.reshape(b, t, self.nq * self.d), ops)


class MLP:
    def __init__(self, cfg: DecoderConfig, w: WeightLoader, prefix: str):
        h, f = cfg.hidden_size, cfg.intermediate_size
        bias = (lambda n, size: w.vector(f"{prefix}.{n}.bias", (size,))) if cfg.mlp_bias else (
            lambda n, size: None)
        self.gate_proj = Linear(w.matrix(f"{prefix}.gate_proj.weight", (f, h), "linear"),
                                bias("gate_proj", f))
        self.up_proj = Linear(w.matrix(f"{prefix}.up_proj.weight", (f, h), "linear"),
                              bias("up_proj", f))
        self.down_proj = Linear(w.matrix(f"{prefix}.down_proj.weight", (h, f), "linear"),
                                bias("down_proj", h))
        self.down_rotation = online_rotation(cfg.lattice_online_rotation, "down_proj", f)
        name_linears(self, prefix)

    def __call__(self, x, ops):
        act = ops.silu_mul(*project(x, (self.gate_proj, self.up_proj), ops))
        if self.down_rotation is not None:
            act = ops.block_rotate(act, *self.down_rotation)
        return self.down_proj(act, ops)


class Block:
    def __init__(self, cfg: DecoderConfig, w: WeightLoader, index: int, qkv_bias: bool,
                 qk_norm: bool, mlp_factory=None):
        prefix = f"model.layers.{index}"
        h = cfg.hidden_size
        self.index = index
        self.eps = cfg.rms_norm_eps
        self.input_layernorm = w.vector(f"{prefix}.input_layernorm.weight", (h,))
        self.self_attn = Attention(cfg, w, f"{prefix}.self_attn", qkv_bias, qk_norm)
        self.post_attention_layernorm = w.vector(f"{prefix}.post_attention_layernorm.weight", (h,))
        # an architecture may put another MLP here (qwen3_moe: the sparse MoE layers)
        self.mlp = (mlp_factory or MLP)(cfg, w, f"{prefix}.mlp")
        spec = cfg.lattice_online_rotation
        self.attn_in_rotation = online_rotation(spec, "attn_in", h)
        self.mlp_in_rotation = online_rotation(spec, "mlp_in", h)

    def attn_input(self, x, ops):
        """The attention's input: the normed stream, rotated online if asked."""
        h = ops.rms_norm(x, self.input_layernorm, self.eps)
        return h if self.attn_in_rotation is None else ops.block_rotate(h, *self.attn_in_rotation)

    def mlp_input(self, x, ops):
        h = ops.rms_norm(x, self.post_attention_layernorm, self.eps)
        return h if self.mlp_in_rotation is None else ops.block_rotate(h, *self.mlp_in_rotation)

    @property
    def input_rotations(self) -> bool:
        """Online rotations of the linears' inputs (not of down_proj's) are present."""
        return (self.attn_in_rotation is not None or self.mlp_in_rotation is not None
                or self.self_attn.o_rotation is not None)

    def __call__(self, x, cache, cos, sin, ops):
        h = x + self.self_attn(self.attn_input(x, ops), self.index, cache, cos, sin, ops)
        return h + self.mlp(self.mlp_input(h, ops), ops)


class DecoderModel(CausalLM):
    """A causal LM over a `KVCache`. Subclasses set the config class and the switches.
    The fused decode step is DecoderStep (transformer_step.py)."""

    config_class = DecoderConfig
    qkv_bias = False
    qk_norm = False

    def __init__(self, cfg: DecoderConfig, w: WeightLoader, ops):
        self.config = cfg
        self.ops = ops
        h, v = cfg.hidden_size, cfg.vocab_size
        tied = cfg.tie_word_embeddings or not w.has("lm_head.weight")
        self.embed_tokens = w.matrix("model.embed_tokens.weight", (v, h),
                                     "tied_embedding" if tied else "embedding")
        self.layers = [Block(cfg, w, i, self.use_qkv_bias(cfg), self.qk_norm,
                             self.mlp_factory(cfg, i))
                       for i in range(cfg.num_hidden_layers)]
        self.norm = w.vector("model.norm.weight", (h,))
        # Tied: the lm_head reads the embedding table itself (f16 under q8_0, see methods).
        self.lm_head = (self.embed_tokens if tied else
                        w.matrix("lm_head.weight", (v, h), cfg.lattice_lm_head_role))
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def mlp_factory(self, cfg: DecoderConfig, index: int):
        """What builds layer `index`'s MLP from (cfg, loader, prefix); None: the dense MLP."""
        return None

    @classmethod
    def use_qkv_bias(cls, cfg: DecoderConfig) -> bool:
        return cls.qkv_bias or cfg.attention_bias

    @classmethod
    def sanitize(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Checkpoint config fix-ups before the config dataclass is built."""
        return config

    @classmethod
    def from_checkpoint(cls, checkpoint, loader: WeightLoader, ops) -> "DecoderModel":
        cfg = cls.config_class.from_dict(cls.sanitize(dict(checkpoint.config)))
        return cls(cfg, loader, ops)

    def make_cache(self, batch: int = 1, capacity: int = 256) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, capacity,
                       self.kv_cache, self.kv_key_transforms())

    def hidden_states(self, tokens: np.ndarray, cache: KVCache) -> np.ndarray:
        """Final-norm hidden states [B, T, D] for tokens [B, T]; advances the cache."""
        ops = self.ops
        tokens = check_tokens(tokens, self.config.vocab_size)
        t = tokens.shape[1]
        positions = np.arange(cache.offset, cache.offset + t)
        cos, sin = ops.rope_tables(positions, self.inv_freq)
        step = self._decode_step() if t == 1 and type(cache) is KVCache and \
            cache.dtype == self.kv_cache else None
        if step is not None:
            cache.reserve(cache.offset + 1)
            if not step.is_bound_to(cache.keys, cache.values):
                step.bind_cache(cache.keys, cache.values)
            hidden = step(tokens[:, 0], cache.offset, cos, sin)
            cache.advance(1)
            return hidden[:, None, :]
        if 1 < t <= FUSED_ROWS and tokens.shape[0] == 1 and type(cache) is KVCache and \
                cache.dtype == self.kv_cache and self._decode_step() is not None:
            # a few rows of one sequence (a speculative verify, a draft model catching up):
            # one fused call, one pass over the weights for all rows, instead of ~15
            # Python-level kernel calls per layer; each row's bits are a decode step's
            step = self._decode_step()
            cache.reserve(cache.offset + t)
            if not step.is_bound_to(cache.keys, cache.values):
                step.bind_cache(cache.keys, cache.values)
            hidden = step.rows(tokens[0], cache.offset, cos, sin)
            cache.advance(t)
            return hidden[None]
        x = ops.embed(self.embed_tokens, tokens)
        for layer in self.layers:
            x = layer(x, cache, cos, sin, ops)
        cache.advance(t)
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps)

    @staticmethod
    def _mlp_step_spec(m) -> Optional[dict]:
        """A layer's MLP entries of the DecoderStep spec; None when the step cannot run it."""
        spec = {"down_rotation": m.down_rotation}
        for name, lin in (("gate", m.gate_proj), ("up", m.up_proj), ("down", m.down_proj)):
            spec[name], spec[f"{name}_bias"] = lin.weight, lin.bias
            spec[f"{name}_adapters"] = lin.adapters
        return spec

    def _build_decode_step(self) -> Optional[DecoderStep]:
        layers = []
        for block in self.layers:
            a = block.self_attn
            spec = {"attn_norm": block.input_layernorm, "mlp_norm": block.post_attention_layernorm,
                    "q_norm": a.q_norm, "k_norm": a.k_norm}
            for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj)):
                spec[name], spec[f"{name}_bias"] = lin.weight, lin.bias
                spec[f"{name}_adapters"] = lin.adapters
            mlp = self._mlp_step_spec(block.mlp)
            if mlp is None:
                return None
            spec.update(mlp)
            spec["attn_in_rotation"] = block.attn_in_rotation
            spec["mlp_in_rotation"] = block.mlp_in_rotation
            spec["o_rotation"] = a.o_rotation
            layers.append(spec)
        if not DecoderStep.supports(self.embed_tokens, *DecoderStep.matrices_of(layers)):
            return None
        c = self.config
        return DecoderStep(
            hidden=c.hidden_size, n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, intermediate=c.intermediate_size, eps=c.rms_norm_eps,
            rope_half=len(self.inv_freq), embed=self.embed_tokens, final_norm=self.norm,
            layers=layers)

    def _key_transforms(self) -> list:
        """(k_shift, k_scale) per layer for q8_0 keys (`cache.dense.key_transform`): the
        key bias as RoPE carries it, and each channel's expected size, from the norm of its
        k_proj row times the input norm's weight (times |k_norm| when the heads are
        normed, which sets their size instead)."""
        c = self.config
        cos, sin = self.ops.rope_tables(np.arange(4096), self.inv_freq)
        out = []
        for block in self.layers:
            a = block.self_attn
            if a.k_norm is not None:
                size = np.tile(np.abs(np.asarray(a.k_norm, np.float32)), c.num_key_value_heads)
            else:
                w = a.k_proj.weight.to_float()
                if block.attn_in_rotation is None:
                    w = w * np.asarray(block.input_layernorm, np.float32)[None, :]
                size = np.linalg.norm(w, axis=1)
            out.append(key_transform(a.k_proj.bias, size, lambda x: self.ops.rope(x, cos, sin),
                                     c.num_key_value_heads, c.head_dim))
        return out

    def make_paged_cache(self, num_blocks: int, block_size: int = 16, variant: str = "",
                         max_sequences: int = 0):
        """A `PagedKVCache` for serving many sequences (see `forward_paged`). A model with
        recurrent layers also gives it `RecurrentStateSlots` for max_sequences sequences;
        this one has none, so max_sequences is unused."""
        from ..cache.paged import PagedKVCache
        c = self.config
        return PagedKVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                            num_blocks, block_size, variant, dtype=self.kv_cache,
                            key_transforms=self.kv_key_transforms())

    def forward_paged(self, batch, cache) -> np.ndarray:
        """Logits [len(batch.logit_rows), V] for a flat batch of sequences in a paged cache
        (`paged_forward.PagedBatch`); writes their new K/V into the cache."""
        from .paged_forward import forward_paged
        return forward_paged(self, batch, cache)
