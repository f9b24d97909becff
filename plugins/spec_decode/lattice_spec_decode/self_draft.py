"""Drafters that are parts of a Qwen3.5 target itself, no second checkpoint:

- `mtp`: the checkpoint's multi-token-prediction head (`Model.mtp_head()`, see
  lattice_engine/models/qwen3_5_mtp.py for its structure and which hidden state feeds it).
  It reads the target's final-norm hidden states of the rows the last forward kept
  (`DraftRequest.hidden`, `wants_hidden`), appends one head row per kept position to its
  own KV rows (`MTPCache`, in `DraftRequest.state`; rows of drafts the target rejected
  are dropped first), and chains: draft i + 1 pairs the head's own output state of draft
  i with token i at the next position.
- `self` (Gated-DeltaNet self-speculation): the target with its full-attention layers
  skipped. Each draft token runs only the linear-attention blocks (DeltaNet + MLP), the
  final norm and the lm_head, on a copy of the target's own recurrent state of the
  sequence (`DraftRequest.recurrent`), so it needs no KV cache and no catch-up: the
  state it starts from is exactly the target's. The copy is thrown away after drafting.

Both draft greedily (q one-hot): the rejection sampler keeps sampled requests exact too.

Option `draft_vocab` (both): draft only among the first N token ids, reading only those
rows of the lm_head (a multiple of 16, at most the vocabulary). On a small model the lm_head
is a large part of a step (Qwen3.5-0.8B: 248320 x 1024, half the bytes a decode step
reads), so a full-vocabulary draft token costs about half a step; byte-level BPE
vocabularies number their merges roughly by frequency, so a prefix keeps most tokens a
draft would pick (the idea of frequency-ranked draft vocabularies, EAGLE-3 / FR-Spec).
The verify still scores the full vocabulary: output is unchanged, only acceptance can drop.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lattice_engine.errors import CheckpointError, ConfigError
from lattice_engine.quant.formats import PackedMatrix
from lattice_engine.speculative import Draft

from .rejection import RejectionVerifier

LINEAR = "linear_attention"


OPTIONS = ("draft_vocab",)


def _options(method: str, options: Mapping[str, Any]) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"speculative option(s) {', '.join(unknown)} are not {method} "
                          f"options; {method} takes: {', '.join(OPTIONS)}")
    return dict(options)


def head_prefix(target, draft_vocab):
    """The first `draft_vocab` rows of the target's lm_head (a view of its packed rows), or
    None for the full head."""
    if draft_vocab is None:
        return None
    head = target.lm_head
    vocab = head.rows if isinstance(head, PackedMatrix) else target.config.vocab_size
    if not isinstance(draft_vocab, int) or isinstance(draft_vocab, bool) or \
            not 16 <= draft_vocab <= vocab or draft_vocab % 16:
        raise ConfigError(f"speculative.draft_vocab = {draft_vocab!r} is out of range: it "
                          f"must be a multiple of 16 in [16, {vocab}] (the vocabulary)")
    if not isinstance(head, PackedMatrix):
        raise ConfigError("speculative.draft_vocab needs an lm_head in a packed weight "
                          "format; this model's is not")
    if draft_vocab == vocab:
        return None
    return PackedMatrix(head.format, draft_vocab, head.cols, head.data[:draft_vocab])


def _qwen3_5(target, method: str):
    if not (hasattr(target, "layers") and any(getattr(b, "kind", None) == LINEAR
                                               for b in target.layers)):
        raise ConfigError(f"speculative method {method!r} drafts with a Qwen3.5 model's own "
                          f"layers; {type(target).__module__} is not one (use ngram or "
                          f"draft_model)")


class MTPDrafter(RejectionVerifier):
    wants_hidden = True

    def __init__(self, target, draft_vocab=None):
        self.target = target
        self.rows = head_prefix(target, draft_vocab)
        self.head = target.mtp_head()

    @classmethod
    def build(cls, target, tokenizer, options: Mapping[str, Any]) -> "MTPDrafter":
        options = _options("mtp", options)
        _qwen3_5(target, "mtp")
        try:
            return cls(target, **options)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from exc

    def propose(self, request, k: int) -> Draft:
        hidden = request.hidden
        if hidden is None or not len(hidden) or k <= 0:
            return Draft([])
        ids = request.token_ids
        n, length = hidden.shape[0], len(ids)
        if n >= length:
            return Draft([])
        cache = request.state.get("mtp")
        if cache is None:
            cache = request.state["mtp"] = self.head.make_cache()
        # row j: the target's state at position length - 1 - n + j with the token after it
        positions = np.arange(length - 1 - n, length - 1)
        cache.drop_from(int(positions[0]))  # chained drafts of the last propose, re-fed rows
        states = self.head.hidden(ids[length - n:], hidden, positions, cache)
        last, pos, out = states[-1:], int(positions[-1]), []
        for i in range(k):
            token = int(np.argmax(self.head.logits(last, self.rows)[0]))
            out.append(token)
            if i + 1 < k:
                pos += 1
                last = self.head.hidden([token], last, [pos], cache, chained=True)
        return Draft(out)


class SelfDrafter(RejectionVerifier):
    """GDN self-speculation: the linear-attention blocks only, on the target's own state."""

    def __init__(self, target, draft_vocab=None):
        self.target = target
        self.rows = head_prefix(target, draft_vocab)
        self.blocks = [b for b in target.layers if b.kind == LINEAR]

    @classmethod
    def build(cls, target, tokenizer, options: Mapping[str, Any]) -> "SelfDrafter":
        options = _options("self", options)
        _qwen3_5(target, "self")
        return cls(target, **options)

    def propose(self, request, k: int) -> Draft:
        pairs = request.recurrent
        if pairs is None or k <= 0 or not request.token_ids:
            return Draft([])
        if len(pairs) != len(self.blocks):
            raise RuntimeError(f"self drafter: the target lent {len(pairs)} recurrent states "
                               f"for {len(self.blocks)} linear-attention layers")
        model, ops = self.target, self.target.ops
        conv = [np.array(c, np.float32)[None] for c, _ in pairs]  # copies: [1, ...]
        delta = [np.array(d, np.float32)[None] for _, d in pairs]
        eps = model.config.rms_norm_eps
        token, out = int(request.token_ids[-1]), []
        for _ in range(k):
            x = ops.embed(model.embed_tokens, np.array([[token]], np.int64))
            for block in self.blocks:
                a = block.linear_attn
                mixed, beta, g, z = a.project(ops.rms_norm(x, block.input_layernorm, eps, 1.0),
                                              ops)
                core = a.recur(mixed, beta, g, conv[block.slot], delta[block.slot], ops, 0)
                h = x + a.gate_out(core, z, ops)
                x = h + block.mlp(ops.rms_norm(h, block.post_attention_layernorm, eps, 1.0),
                                  ops)
            normed = ops.rms_norm(x, model.norm, eps, 1.0)
            logits = model.logits(normed) if self.rows is None else \
                ops.matmul(normed, self.rows)
            token = int(np.argmax(logits.reshape(-1)))
            out.append(token)
        return Draft(out)
