"""Qwen3.5's multi-token-prediction (MTP) head: one more decoder layer that predicts the
token after next from the target's hidden state and the next token's embedding.

Structure, from vLLM's `vllm/model_executor/models/qwen3_5_mtp.py`,
`Qwen3_5MultiTokenPredictor.forward` (the same as `qwen3_next_mtp.py`'s
`Qwen3NextMultiTokenPredictor.forward`):

    e = pre_fc_norm_embedding(embed(x_{t+1}))          (1 + w) RMSNorms, like the model's
    h = pre_fc_norm_hidden(h_t)
    y = fc(concat(e, h))                                2H -> H, the embedding half first
    y = decoder layer (gated full attention + MLP, `mtp.layers.0`, its own KV cache)
    logits = lm_head(norm(y))                          `mtp.norm`, the target's lm_head

Which h_t: the hidden state vLLM's proposer hands the MTP model is the target model's
forward output, `Qwen3_5ForCausalLMBase.forward` -> `Qwen3_5Model` (= `Qwen3NextModel`)
`.forward`, which returns `self.norm(hidden_states, residual)`: the hidden state AFTER the
target's final norm, before the lm_head. `DraftRequest.hidden` carries exactly that. The
chained draft (k > 1) feeds the MTP's own output (after `mtp.norm`) back as h, at the next
position (vLLM's EAGLE proposer does the same with the MTP model's returned states).

Positions: the MTP row that pairs h_t with x_{t+1} sits at position t (vLLM passes the
target's positions); its keys carry that rotary position, so the head's KV cache holds
rows in order but need not hold every position (rotary attention only sees differences).

Under QuaRot (residual basis) the target's hidden states and the lm_head's input are
rotated; the rotated checkpoint folds the embedding half of fc and carries two H x H
conversions the head applies (`lattice_quarot.fold._mtp`).

Everything runs on the model's op set (the C kernels on the native backend): the matrices
come from the model's own loader, so they take the checkpoint's weight format (q8_0, q4).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..cache.dense import KVCache
from ..errors import CheckpointError
from .transformer import MLP

PREFIX = "mtp"


class MTPCache:
    """The head's KV rows (one attention layer) and the target position of each row."""

    def __init__(self, head: "MTPHead", capacity: int = 256):
        a = head.self_attn
        self.kv = KVCache(1, 1, a.nkv, a.d, capacity)
        self.positions = np.zeros(0, np.int64)

    @property
    def rows(self) -> int:
        return self.kv.offset

    def drop_from(self, position: int) -> None:
        """Forget rows at target positions >= position (drafts past what was kept)."""
        keep = int(np.searchsorted(self.positions[:self.rows], position, side="left"))
        self.kv.truncate(keep)
        self.positions = self.positions[:keep]


class MTPHead:
    """The MTP layer of a loaded Qwen3.5 `Model` (`Model.mtp_head()` builds it)."""

    def __init__(self, model, loader):
        from .qwen3_5 import GatedAttention
        cfg, w = model.config, loader
        if not w.has(f"{PREFIX}.fc.weight"):
            raise CheckpointError(f"checkpoint {w.checkpoint.source} has no MTP head "
                                  f"({PREFIX}.fc.weight): speculative method 'mtp' needs a "
                                  f"Qwen3.5 checkpoint that ships its mtp.* weights")
        layers = int(getattr(cfg, "mtp_num_hidden_layers", 1) or 1)
        if layers != 1:
            raise CheckpointError(f"mtp_num_hidden_layers = {layers}: only one MTP layer "
                                  f"is supported (every released Qwen3.5 has one)")
        rotated = "quarot" in (w.checkpoint.config or {})
        if rotated and not w.has(f"{PREFIX}.lattice_hidden_in.weight"):
            raise CheckpointError("this QuaRot-rotated checkpoint carries no conversion for "
                                  "its MTP head (mtp.lattice_hidden_in): update the quarot "
                                  "plugin, or disable [quarot] for speculative mtp")
        self.model, self.ops = model, model.ops
        h = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.inv_freq = model.inv_freq
        from .base import Linear
        self.fc = Linear(w.matrix(f"{PREFIX}.fc.weight", (h, 2 * h), "linear"))
        # QuaRot (residual basis, see lattice_quarot.fold._mtp): the target's hidden state
        # and the shared lm_head's input live in the rotated basis, the head's layer not
        self.hidden_in = self.head_in = None
        if w.has(f"{PREFIX}.lattice_hidden_in.weight"):
            self.hidden_in = Linear(w.matrix(f"{PREFIX}.lattice_hidden_in.weight", (h, h),
                                             "linear"))
            self.head_in = Linear(w.matrix(f"{PREFIX}.lattice_head_in.weight", (h, h),
                                           "linear"))
        self.pre_fc_norm_embedding = w.vector(f"{PREFIX}.pre_fc_norm_embedding.weight", (h,))
        self.pre_fc_norm_hidden = w.vector(f"{PREFIX}.pre_fc_norm_hidden.weight", (h,))
        self.norm = w.vector(f"{PREFIX}.norm.weight", (h,))
        p = f"{PREFIX}.layers.0"
        self.input_layernorm = w.vector(f"{p}.input_layernorm.weight", (h,))
        self.post_attention_layernorm = w.vector(f"{p}.post_attention_layernorm.weight", (h,))
        self.self_attn = GatedAttention(cfg, w, f"{p}.self_attn")
        # the model's online down_proj rotation (QuaRot) is folded into its own layers only;
        # the layer's MLP is the model's kind (Qwen3.5-MoE's MTP layer has its MoE MLP)
        factory = model.mlp_factory(cfg, cfg.num_hidden_layers) or MLP
        self.mlp = factory(dataclasses.replace(cfg, lattice_online_rotation=None), w, f"{p}.mlp")

    def make_cache(self, capacity: int = 256) -> MTPCache:
        return MTPCache(self, capacity)

    def hidden(self, tokens: np.ndarray, hidden: np.ndarray, positions: np.ndarray,
               cache: MTPCache, chained: bool = False) -> np.ndarray:
        """The head's output states [T, H] (after `mtp.norm`) for rows pairing target
        hidden states [T, H] (after the final norm) at target positions [T] with the next
        tokens [T]; appends the rows' keys and values to the cache. chained: `hidden` is
        the head's own output (a chained draft), not the target's."""
        ops, eps = self.ops, self.eps
        tokens = np.asarray(tokens, np.int64).reshape(1, -1)
        t = tokens.shape[1]
        positions = np.asarray(positions, np.int64).reshape(-1)
        hidden = np.asarray(hidden, np.float32).reshape(1, t, -1)
        if positions.shape[0] != t or hidden.shape[2] != self.pre_fc_norm_hidden.shape[0]:
            raise ValueError(f"MTP rows: {t} tokens, {positions.shape[0]} positions and "
                             f"hidden {hidden.shape} must agree")
        if t and cache.rows and positions[0] <= cache.positions[cache.rows - 1]:
            raise ValueError(f"MTP rows at position {int(positions[0])} do not follow the "
                             f"cache's last row ({int(cache.positions[cache.rows - 1])}): "
                             f"drop_from() first")
        e = ops.rms_norm(ops.embed(self.model.embed_tokens, tokens), self.pre_fc_norm_embedding,
                         eps, 1.0)
        if self.hidden_in is not None and not chained:
            hidden = self.hidden_in(hidden, ops)
        hn = ops.rms_norm(hidden, self.pre_fc_norm_hidden, eps, 1.0)
        x = self.fc(np.concatenate([e, hn], axis=-1), ops)
        cos, sin = ops.rope_tables(positions, self.inv_freq)
        attn = self.self_attn
        normed = ops.rms_norm(x, self.input_layernorm, eps, 1.0)
        q, k, v, gate = attn.project(normed, cos, sin, ops)
        start = cache.kv.offset
        keys, values = cache.kv.update(0, k, v)
        out = ops.attention(q, keys, values, start, 1.0 / np.sqrt(attn.d))
        cache.kv.advance(t)
        cache.positions = np.concatenate([cache.positions[:start], positions])
        h = x + attn.gate_out(out, gate, ops)
        y = h + self.mlp(ops.rms_norm(h, self.post_attention_layernorm, eps, 1.0), ops)
        return ops.rms_norm(y, self.norm, eps, 1.0)[0]

    def logits(self, states: np.ndarray, head=None) -> np.ndarray:
        """The shared lm_head over the head's output states [T, H] -> [T, V]; `head`: a
        prefix of its rows instead (a drafter's reduced vocabulary) -> [T, rows]."""
        if self.head_in is not None:
            states = self.head_in(states, self.ops)
        if head is not None:
            return self.ops.matmul(states, head)
        return self.model.logits(states)
