"""Qwen3.5: a hybrid of Gated-DeltaNet (linear attention) layers and gated full-attention
layers (`layer_types`), with (1 + w) RMSNorms, partial rotary and tied embeddings.

Loads both checkpoint layouts transformers writes: `Qwen3_5ForCausalLM` (model_type
"qwen3_5_text", text weights under `model.*`) and `Qwen3_5ForConditionalGeneration`
(model_type "qwen3_5", config under `text_config`, text weights under
`model.language_model.*`, the vision tower under `model.visual.*`). The vision tower is not
run here; it stays addressable through `Model.vision_weights` for the vision plugin. The
multi-token-prediction head (`mtp.*`, `Model.mtp_weights`) is built on first use by
`Model.mtp_head()` (qwen3_5_mtp.py) for the speculative-decoding plugin's `mtp` drafter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import CheckpointError
from .base import (CausalLM, Linear, WeightLoader, check_tokens, config_from_dict,
                   name_linears, rope_inv_freq)
from ..cache.hybrid import HybridCache
from ..cache.recurrent import Replay
from ..multimodal import ForwardInputs, check_forward_inputs, mrope_axes, mrope_tables
from ..kernels.steps import FUSED_ROWS
from .qwen3_5_step import Qwen35Step
from .transformer import MLP, check_rotation_sites, head_role

LINEAR, FULL = "linear_attention", "full_attention"


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_parameters: Optional[dict] = None
    partial_rotary_factor: float = 0.25
    layer_types: Optional[list] = None
    full_attention_interval: int = 4
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attn_output_gate: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    mlp_bias: bool = False  # MLP from transformer.py reads it; Qwen3.5 has none
    lattice_online_rotation: Optional[dict] = None  # MLP reads it too (QuaRot's online rotation)
    lattice_lm_head_role: str = "lm_head"  # see transformer.DecoderConfig
    rope_theta: float = field(init=False, default=10000.0)
    mrope_section: Optional[list] = field(init=False, default=None)
    mrope_interleaved: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        check_rotation_sites(self.lattice_online_rotation, ("down_proj",))
        params = dict(self.rope_parameters or {})
        self.rope_theta = float(params.get("rope_theta", 10000.0))
        self.partial_rotary_factor = float(params.get("partial_rotary_factor",
                                                      self.partial_rotary_factor))
        self.mrope_section = params.get("mrope_section")
        self.mrope_interleaved = bool(params.get("mrope_interleaved", False))
        if params.get("rope_type", "default") != "default":
            raise CheckpointError(f"rope_type {params['rope_type']!r} is not supported for "
                                  f"qwen3_5; supported: default")
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % self.full_attention_interval == 0 else LINEAR
                                for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {LINEAR, FULL}:
            raise CheckpointError(
                f"layer_types must list {self.num_hidden_layers} entries of {LINEAR!r} or "
                f"{FULL!r}; got {self.layer_types}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; the config is invalid")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise CheckpointError(
                f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.linear_num_key_heads}; the config is invalid")
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act={self.hidden_act!r} is not supported; "
                                  f"supported: silu")
        if not self.attn_output_gate:
            raise CheckpointError("attn_output_gate=false is not supported for qwen3_5 (every "
                                  "released checkpoint gates its attention output)")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "ModelArgs":
        return config_from_dict(cls, params)


class GatedAttention:
    """Full attention whose q_proj also yields a per-head output gate (sigmoid)."""

    def __init__(self, cfg: ModelArgs, w: WeightLoader, prefix: str):
        h, d = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.nq, self.nkv, self.d = nq, nkv, d
        self.eps = cfg.rms_norm_eps
        bias = (lambda n, size: w.vector(f"{prefix}.{n}.bias", (size,))) if cfg.attention_bias \
            else (lambda n, size: None)
        # rows of q_proj: per head, d query features then d gate features
        self.q_proj = Linear(w.matrix(f"{prefix}.q_proj.weight", (2 * nq * d, h), "linear"),
                             bias("q_proj", 2 * nq * d))
        self.k_proj = Linear(w.matrix(f"{prefix}.k_proj.weight", (nkv * d, h), "linear"),
                             bias("k_proj", nkv * d))
        self.v_proj = Linear(w.matrix(f"{prefix}.v_proj.weight", (nkv * d, h), "linear"),
                             bias("v_proj", nkv * d))
        self.o_proj = Linear(w.matrix(f"{prefix}.o_proj.weight", (h, nq * d), "linear"),
                             bias("o_proj", h))
        self.q_norm = w.vector(f"{prefix}.q_norm.weight", (d,))
        self.k_norm = w.vector(f"{prefix}.k_norm.weight", (d,))
        name_linears(self, prefix)

    def __call__(self, x, slot: int, cache: HybridCache, cos, sin, ops):
        q, k, v, gate = self.project(x, cos, sin, ops)
        start = cache.offset
        keys, values, layout = cache.kv.store(slot, k, v)
        out = ops.attention(q, keys, values, start, 1.0 / np.sqrt(self.d), kv=layout)
        return self.gate_out(out, gate, ops)

    def project(self, x, cos, sin, ops):
        """x [B, T, hidden] -> rotated and normed q [B, T, nq, d], k, v [B, T, nkv, d], and
        the gate pre-activations [B, T, nq, d]."""
        b, t, _ = x.shape
        qg = self.q_proj(x, ops).reshape(b, t, self.nq, 2 * self.d)
        q = ops.rms_norm(qg[..., :self.d], self.q_norm, self.eps, 1.0)
        k = ops.rms_norm(self.k_proj(x, ops).reshape(b, t, self.nkv, self.d), self.k_norm,
                         self.eps, 1.0)
        v = self.v_proj(x, ops).reshape(b, t, self.nkv, self.d)
        return ops.rope(q, cos, sin), ops.rope(k, cos, sin), v, qg[..., self.d:]

    def gate_out(self, attn, gate, ops):
        """o_proj(attention output [B, T, nq, d] * sigmoid(gate))."""
        b, t = gate.shape[:2]
        out = attn.reshape(gate.shape) * ops.sigmoid(gate)
        return self.o_proj(out.reshape(b, t, self.nq * self.d), ops)


class GatedDeltaNet:
    """Linear attention: fused qkv -> causal conv (rolling state) -> SiLU -> gated delta
    rule (fp32 state per value head) -> per-head gated RMSNorm with SiLU(z) -> out_proj."""

    chunk = 64  # prefill chunk of the delta rule (transformers' and FLA's default)

    def __init__(self, cfg: ModelArgs, w: WeightLoader, prefix: str):
        h = cfg.hidden_size
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.nk * self.dk, self.nv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        self.eps = cfg.rms_norm_eps
        self.in_proj_qkv = Linear(w.matrix(f"{prefix}.in_proj_qkv.weight", (self.conv_dim, h),
                                           "linear"))
        self.in_proj_z = Linear(w.matrix(f"{prefix}.in_proj_z.weight", (self.value_dim, h),
                                         "linear"))
        self.in_proj_b = Linear(w.matrix(f"{prefix}.in_proj_b.weight", (self.nv, h), "linear"))
        self.in_proj_a = Linear(w.matrix(f"{prefix}.in_proj_a.weight", (self.nv, h), "linear"))
        conv = w.vector(f"{prefix}.conv1d.weight", (self.conv_dim, 1, self.kernel))
        self.conv_weight_t = np.ascontiguousarray(conv.reshape(self.conv_dim, self.kernel).T)
        # decay rate per value head: g = -exp(A_log) * softplus(a + dt_bias)
        self.neg_a = -np.exp(w.vector(f"{prefix}.A_log", (self.nv,)))
        self.dt_bias = w.vector(f"{prefix}.dt_bias", (self.nv,))
        self.norm = w.vector(f"{prefix}.norm.weight", (self.dv,))
        self.out_proj = Linear(w.matrix(f"{prefix}.out_proj.weight", (h, self.value_dim),
                                        "linear"))
        name_linears(self, prefix)

    def __call__(self, x, slot: int, cache: HybridCache, ops):
        mixed, beta, g, z = self.project(x, ops)
        if getattr(cache, "recording", False):
            core = self.recur_recorded(mixed, beta, g, cache, slot, ops)
        else:
            core = self.recur(mixed, beta, g, cache.conv[slot], cache.delta[slot], ops,
                              self.chunk if x.shape[1] > 1 else 0)
        return self.gate_out(core, z, ops)

    def recur_recorded(self, mixed, beta, g, cache: HybridCache, slot: int, ops):
        """The recurrence of a speculative verify: one call over its tokens in the
        token-by-token form (each token's bits are a decode step's), keeping what
        `truncate` needs to return to any of them in the cache's trail."""
        conv_trail, delta_rows = cache.trail_views(slot)
        return self.recur_trail(mixed, beta, g, cache.conv[slot], cache.delta[slot], ops,
                                conv_trail, delta_rows)

    @property
    def replay_width(self) -> int:
        """Floats of one token's delta-rule inputs in a verify's trail: the conv's output
        row (q, k, v), then g and beta [nv] each (the layout the fused step writes)."""
        return self.conv_dim + 2 * self.nv

    def recur_trail(self, mixed, beta, g, conv_state, delta_state, ops, conv_trail,
                    delta_rows):
        """`recur` over T tokens token by token (chunk 0) for a verify: the conv window
        after each token t goes to conv_trail[t] [T, B, K-1, conv_dim] (the last K-1 inputs
        of [old window, x[:t+1]], read off before the conv overwrites x), each token's
        delta-rule inputs to delta_rows[t] [T, B, replay_width], and the delta state is
        left as it was (`replay` advances it over the kept tokens)."""
        b, t, _ = mixed.shape
        ext = np.concatenate([conv_state, mixed], axis=1)  # B, K-1+T, C (pre-conv inputs)
        w = self.kernel - 1
        for i in range(t):
            conv_trail[i] = ext[:, i + 1:i + 1 + w]
        mixed = ops.causal_conv1d(mixed, self.conv_weight_t, conv_state, out=mixed)
        c = self.conv_dim
        delta_rows[..., :c] = mixed.transpose(1, 0, 2)
        delta_rows[..., c:c + self.nv] = g.transpose(1, 0, 2)
        delta_rows[..., c + self.nv:] = beta.transpose(1, 0, 2)
        q = mixed[..., :self.key_dim].reshape(b, t, self.nk, self.dk)
        k = mixed[..., self.key_dim:2 * self.key_dim].reshape(b, t, self.nk, self.dk)
        v = mixed[..., 2 * self.key_dim:].reshape(b, t, self.nv, self.dv)
        return ops.gated_delta_rule(q, k, v, g, beta, delta_state, chunk=0, ahead=True)

    def replay(self, delta_state: np.ndarray, rows: np.ndarray, ops) -> None:
        """Advance delta_state ([B, nv, dk, dv], or one slot's [nv, dk, dv]) in place over
        a verify's kept tokens, rows [n, B, replay_width] (or [n, replay_width]): the
        token-by-token recurrence on the inputs the verify used, so the state ends bit for
        bit where decoding those tokens leaves it."""
        if delta_state.ndim == 3:
            delta_state, rows = delta_state[None], rows[:, None]
        x = np.ascontiguousarray(rows.transpose(1, 0, 2))  # [B, n, width]
        b, n, _ = x.shape
        kd, c = self.key_dim, self.conv_dim
        ops.gated_delta_rule(x[..., :kd].reshape(b, n, self.nk, self.dk),
                             x[..., kd:2 * kd].reshape(b, n, self.nk, self.dk),
                             x[..., 2 * kd:c].reshape(b, n, self.nv, self.dv),
                             x[..., c:c + self.nv], x[..., c + self.nv:], delta_state, chunk=0)

    def project(self, x, ops):
        """The input projections of x [B, T, hidden]: mixed qkv [B, T, conv_dim] (before the
        conv), beta and the decay g [B, T, nv], and z [B, T, nv, dv]."""
        b, t, _ = x.shape
        mixed = self.in_proj_qkv(x, ops)
        beta = ops.sigmoid(self.in_proj_b(x, ops))
        g = self.neg_a * ops.softplus(self.in_proj_a(x, ops) + self.dt_bias)
        z = self.in_proj_z(x, ops).reshape(b, t, self.nv, self.dv)
        return mixed, beta, g, z

    def recur(self, mixed, beta, g, conv_state, delta_state, ops, chunk: int):
        """Conv, SiLU and the delta rule for one run of tokens, updating the states in
        place (conv [B, K-1, conv_dim], delta [B, nv, dk, dv]); mixed is overwritten.
        Returns the core output [B, T, nv, dv]. chunk = 0: token by token."""
        b, t, _ = mixed.shape
        mixed = ops.causal_conv1d(mixed, self.conv_weight_t, conv_state, out=mixed)
        q = mixed[..., :self.key_dim].reshape(b, t, self.nk, self.dk)
        k = mixed[..., self.key_dim:2 * self.key_dim].reshape(b, t, self.nk, self.dk)
        v = mixed[..., 2 * self.key_dim:].reshape(b, t, self.nv, self.dv)
        return ops.gated_delta_rule(q, k, v, g, beta, delta_state, chunk=chunk)

    def gate_out(self, core, z, ops):
        """out_proj(gated RMSNorm(core, SiLU(z)))."""
        b, t = z.shape[:2]
        core = ops.gated_rms_norm(core, z, self.norm, self.eps)
        return self.out_proj(core.reshape(b, t, self.value_dim), ops)


class Block:
    def __init__(self, cfg: ModelArgs, w: WeightLoader, prefix: str, index: int, slot: int,
                 mlp_factory=None):
        h = cfg.hidden_size
        self.kind = cfg.layer_types[index]
        self.slot = slot  # index among layers of its kind: its KV or recurrent-state slot
        self.eps = cfg.rms_norm_eps
        p = f"{prefix}.layers.{index}"
        self.input_layernorm = w.vector(f"{p}.input_layernorm.weight", (h,))
        if self.kind == LINEAR:
            self.linear_attn = GatedDeltaNet(cfg, w, f"{p}.linear_attn")
        else:
            self.self_attn = GatedAttention(cfg, w, f"{p}.self_attn")
        self.post_attention_layernorm = w.vector(f"{p}.post_attention_layernorm.weight", (h,))
        # an architecture may put another MLP here (qwen3_5_moe: the sparse MoE)
        self.mlp = (mlp_factory or MLP)(cfg, w, f"{p}.mlp")

    def __call__(self, x, cache, cos, sin, ops):
        normed = ops.rms_norm(x, self.input_layernorm, self.eps, 1.0)
        if self.kind == LINEAR:
            h = x + self.linear_attn(normed, self.slot, cache, ops)
        else:
            h = x + self.self_attn(normed, self.slot, cache, cos, sin, ops)
        return h + self.mlp(ops.rms_norm(h, self.post_attention_layernorm, self.eps, 1.0), ops)


class CheckpointTensors:
    """A lazy, read-only view of the checkpoint tensors under some name prefixes (the
    vision tower, the MTP head): names and shapes without loading, arrays on demand."""

    def __init__(self, checkpoint, prefixes: tuple[str, ...]):
        self._checkpoint = checkpoint
        self.prefixes = prefixes
        self.names = sorted(n for n in checkpoint.tensors if n.startswith(prefixes))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._checkpoint.shapes[self._known(name)])

    def __getitem__(self, name: str) -> np.ndarray:
        return self._checkpoint.tensors[self._known(name)]()

    def _known(self, name: str) -> str:
        if name not in self.names:
            raise CheckpointError(f"checkpoint {self._checkpoint.source} has no tensor {name!r} "
                                  f"under {', '.join(self.prefixes)} ({len(self.names)} there)")
        return name


class Model(CausalLM):
    """The Qwen3.5 text model over a `HybridCache` (KV for full-attention layers, conv and
    delta-rule states for linear ones). The fused decode step is Qwen35Step (qwen3_5_step.py)."""

    config_class = ModelArgs

    def __init__(self, cfg: ModelArgs, w: WeightLoader, ops, prefix: str = "model",
                 tied: Optional[bool] = None):
        self.config = cfg
        self.ops = ops
        h, v = cfg.hidden_size, cfg.vocab_size
        tied = cfg.tie_word_embeddings if tied is None else tied
        self.embed_tokens = w.matrix(f"{prefix}.embed_tokens.weight", (v, h),
                                     "tied_embedding" if tied else "embedding")
        counts = {LINEAR: 0, FULL: 0}
        self.layers = []
        for i, kind in enumerate(cfg.layer_types):
            self.layers.append(Block(cfg, w, prefix, i, counts[kind], self.mlp_factory(cfg, i)))
            counts[kind] += 1
        self.num_linear, self.num_full = counts[LINEAR], counts[FULL]
        self.norm = w.vector(f"{prefix}.norm.weight", (h,))
        # Tied: the lm_head reads the embedding table itself (f16 under q8_0: see methods)
        self.lm_head = self.embed_tokens if tied else w.matrix(
            "lm_head.weight", (v, h), head_role(cfg.lattice_lm_head_role))
        self.inv_freq = rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, None)
        self.mtp_weights = CheckpointTensors(w.checkpoint, ("mtp.",))
        self._loader = w  # builds the MTP head on first use (`mtp_head`)
        self._mtp = None
        self.vision_weights = CheckpointTensors(w.checkpoint, ("model.visual.", "visual."))

    def mtp_head(self):
        """The multi-token-prediction head (`qwen3_5_mtp.MTPHead`), built from the
        checkpoint's mtp.* weights in the model's weight format on first use; a
        CheckpointError when the checkpoint has none."""
        if self._mtp is None:
            from .qwen3_5_mtp import MTPHead
            self._mtp = MTPHead(self, self._loader)
        return self._mtp

    def mlp_factory(self, cfg: ModelArgs, index: int):
        """What builds layer `index`'s MLP from (cfg, loader, prefix); None: the dense MLP."""
        return None

    @classmethod
    def from_checkpoint(cls, checkpoint, loader: WeightLoader, ops) -> "Model":
        config = dict(checkpoint.config)
        if "text_config" in config:  # Qwen3_5ForConditionalGeneration
            if not isinstance(config["text_config"] or {}, dict):
                from .base import ConfigFieldError
                raise ConfigFieldError(f"text_config = {config['text_config']!r} must be an "
                                       f"object")
            text = dict(config["text_config"] or {})
            # the composite model ties by its own top-level flag (transformers' default: no)
            tied = bool(config.get("tie_word_embeddings", False))
            return cls(cls.config_class.from_dict(text), loader, ops,
                       prefix="model.language_model", tied=tied)
        return cls(cls.config_class.from_dict(config), loader, ops)

    def make_cache(self, batch: int = 1, capacity: int = 256) -> HybridCache:
        c = self.config
        conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + \
            c.linear_num_value_heads * c.linear_value_head_dim
        return HybridCache(
            batch, num_full=self.num_full, num_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, num_linear=self.num_linear, conv_dim=conv_dim,
            conv_kernel=c.linear_conv_kernel_dim, value_heads=c.linear_num_value_heads,
            key_head_dim=c.linear_key_head_dim, value_head_dim=c.linear_value_head_dim,
            capacity=capacity, kv_dtype=self.kv_cache,
            key_transforms=self.kv_key_transforms(), delta_replay=self.delta_replays())

    def delta_replays(self) -> list[Replay]:
        """Per linear layer, in order, how its delta state follows a verify's kept tokens
        (`RecurrentStateSlots`, `HybridCache`: verifies leave these states as they were and
        the kept tokens are replayed on them)."""
        layers = [b.linear_attn for b in self.layers if b.kind == LINEAR]
        return [Replay((a.replay_width,), lambda state, rows, a=a: a.replay(state, rows, self.ops))
                for a in layers]

    def rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [N, half] for index positions [N] or multimodal positions [3, N]
        (M-RoPE by the config's mrope_section; equal axes give 1-D rope's bits)."""
        if positions.ndim == 1:
            return self.ops.rope_tables(positions, self.inv_freq)
        return mrope_tables(positions, self.inv_freq, self.mrope_axes)

    @property
    def mrope_axes(self) -> np.ndarray:
        c = self.config
        if c.mrope_section is None:  # no image layout: every frequency follows axis t
            return np.zeros(len(self.inv_freq), np.int64)
        return mrope_axes(len(self.inv_freq), c.mrope_section, c.mrope_interleaved)

    def hidden_states(self, tokens: np.ndarray, cache: HybridCache,
                      inputs: Optional[ForwardInputs] = None) -> np.ndarray:
        """Final-norm hidden states [B, T, D] for tokens [B, T]; advances the cache.
        `inputs` (batch 1) carries M-RoPE positions and embeddings replacing placeholder
        rows (an image's)."""
        ops = self.ops
        tokens = check_tokens(tokens, self.config.vocab_size, cache.batch)
        t = tokens.shape[1]
        if inputs is not None and inputs.positions is not None:
            check_forward_inputs(inputs, tokens.shape, self.config.hidden_size)
            cos, sin = self.rope_tables(np.asarray(inputs.positions))
        else:
            cos, sin = ops.rope_tables(np.arange(cache.offset, cache.offset + t), self.inv_freq)
        replaces = inputs is not None and inputs.replaces
        step = self._decode_step() if t == 1 and type(cache) is HybridCache and \
            cache.kv.dtype == self.kv_cache and not replaces and not cache.recording else None
        if step is not None:
            cache.drop_trail()
            cache.kv.reserve(cache.offset + 1)
            arrays = (cache.kv.keys, cache.kv.values, cache.conv, cache.delta)
            if not step.is_bound_to(*arrays):
                step.bind_cache(*arrays)
            hidden = step(tokens[:, 0], cache.offset, cos, sin)
            cache.advance(1)
            return hidden[:, None, :]
        recording = getattr(cache, "recording", False)
        step = self._decode_step() if recording and 1 < t <= FUSED_ROWS and cache.batch == 1 \
            and type(cache) is HybridCache and cache.kv.dtype == self.kv_cache and \
            not replaces else None
        if step is not None:
            # a speculative verify: its rows in one fused call (one pass over the weights),
            # the recurrence token by token with the state after each row in the trail
            cache.start_trail(t)
            cache.kv.reserve(cache.offset + t)
            arrays = (cache.kv.keys, cache.kv.values, cache.conv, cache.delta)
            if not step.is_bound_to(*arrays):
                step.bind_cache(*arrays)
            hidden = step.rows(tokens[0], cache.offset, cos, sin,
                               [cache.trail_views(j) for j in range(len(cache.conv))])
            cache.advance(t)
            cache.end_trail()
            return hidden[None]
        if recording:
            cache.start_trail(t)
        elif hasattr(cache, "drop_trail"):
            cache.drop_trail()
        x = ops.embed(self.embed_tokens, tokens)
        if replaces:
            x = np.array(x, dtype=np.float32)  # the embedding may be a read-only view
            x[0, inputs.rows] = inputs.embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, cos, sin, ops)
            if replaces and i < len(inputs.deepstack):
                x[0, inputs.rows] += inputs.deepstack[i]
        cache.advance(t)
        if recording:
            cache.end_trail()
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps, 1.0)

    def make_paged_cache(self, num_blocks: int, block_size: int = 16, variant: str = "",
                         max_sequences: int = 0):
        """A `PagedKVCache` with recurrent-state slots, for serving (see `forward_paged`)."""
        from .qwen3_5_paged import make_paged_cache
        return make_paged_cache(self, num_blocks, block_size, variant, max_sequences)

    def forward_paged(self, batch, cache) -> np.ndarray:
        """Logits [len(batch.logit_rows), V] for a flat batch of sequences in a paged cache
        (`paged_forward.PagedBatch`)."""
        from .qwen3_5_paged import forward_paged
        return forward_paged(self, batch, cache)

    @staticmethod
    def _mlp_step_spec(m) -> Optional[dict]:
        """A layer's MLP entries of the Qwen35Step spec; None when the step cannot run it."""
        if m.gate_proj.bias is not None or m.up_proj.bias is not None or \
                m.down_proj.bias is not None:
            return None  # Qwen3.5 has no MLP bias; the C step does not take one
        return {"gate": m.gate_proj.weight, "up": m.up_proj.weight, "down": m.down_proj.weight,
                "down_rotation": m.down_rotation, "gate_adapters": m.gate_proj.adapters,
                "up_adapters": m.up_proj.adapters, "down_adapters": m.down_proj.adapters}

    def _build_decode_step(self) -> Optional[Qwen35Step]:
        layers = []
        for block in self.layers:
            mlp = self._mlp_step_spec(block.mlp)
            if mlp is None:
                return None
            spec = dict(mlp, kind=block.kind, attn_norm=block.input_layernorm,
                        mlp_norm=block.post_attention_layernorm)
            if block.kind == LINEAR:
                a = block.linear_attn
                spec.update(in_qkv=a.in_proj_qkv.weight, in_z=a.in_proj_z.weight,
                            in_b=a.in_proj_b.weight, in_a=a.in_proj_a.weight,
                            out=a.out_proj.weight, conv_w=a.conv_weight_t, neg_a=a.neg_a,
                            dt_bias=a.dt_bias, head_norm=a.norm)
                for name, lin in (("in_qkv", a.in_proj_qkv), ("in_z", a.in_proj_z),
                                  ("in_b", a.in_proj_b), ("in_a", a.in_proj_a),
                                  ("out", a.out_proj)):
                    spec[f"{name}_adapters"] = lin.adapters
            else:
                a = block.self_attn
                for name, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj),
                                  ("o", a.o_proj)):
                    spec[name], spec[f"{name}_bias"] = lin.weight, lin.bias
                    spec[f"{name}_adapters"] = lin.adapters
                spec.update(q_norm=a.q_norm, k_norm=a.k_norm)
            layers.append(spec)
        if not Qwen35Step.supports(self.embed_tokens, *Qwen35Step.matrices_of(layers)):
            return None
        c = self.config
        return Qwen35Step(
            hidden=c.hidden_size, intermediate=c.intermediate_size,
            n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads,
            head_dim=c.head_dim, rope_half=len(self.inv_freq),
            lin_k_heads=c.linear_num_key_heads, lin_v_heads=c.linear_num_value_heads,
            lin_k_dim=c.linear_key_head_dim, lin_v_dim=c.linear_value_head_dim,
            conv_kernel=c.linear_conv_kernel_dim, eps=c.rms_norm_eps,
            embed=self.embed_tokens, final_norm=self.norm, layers=layers)
