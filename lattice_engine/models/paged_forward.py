"""Forward pass of a decoder over a flat batch of sequences in a `PagedKVCache`.

Continuous batching runs many sequences per step, each at its own position: one decodes
its next token, another prefills a chunk of its prompt. Instead of padding them to a
[B, T] rectangle, their tokens are laid end to end as N rows, so every projection and MLP
is one matmul with M = N, rope takes one position per row, and attention reads each
sequence's keys through its block table (`ops.paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from ..cache.paged import PagedKVCache, SequenceBlocks
from .base import project


@dataclass
class PagedBatch:
    """What one forward computes. Sequence i contributes tokens[q_start[i]:q_start[i+1]] at
    positions pos_start[i] + 0, 1, ...; logits are returned for rows `logit_rows`."""

    tokens: np.ndarray        # int64 [N]
    positions: np.ndarray     # int64 [N]
    q_start: np.ndarray       # int64 [S + 1]
    pos_start: np.ndarray     # int64 [S]
    block_tables: np.ndarray  # int32 [S, max_blocks]
    slots: np.ndarray         # int64 [N], flat KV slot of each row
    logit_rows: np.ndarray    # int64 [L]
    state_slots: np.ndarray   # int64 [S], recurrent-state slot per sequence (-1: none)
    # bool [S]: sequences whose rows are a speculative verify (logits at every row): a
    # model with recurrent layers runs their recurrence token by token and keeps the state
    # after each row (`RecurrentStateSlots.start_trail`), so a partial accept rolls back
    record: Optional[np.ndarray] = None
    # set want_hidden before the forward to get the final-norm hidden states of the logit
    # rows in `hidden` afterwards ([L, H]: what a drafter inside the model, an MTP head,
    # reads); a model calls keep_hidden on them
    want_hidden: bool = False
    hidden: Optional[np.ndarray] = None
    # multimodal sequences (`multimodal.ForwardInputs` per item): M-RoPE positions of every
    # row [3, N] (None: `positions`), rows whose embeddings are replaced, their embeddings
    # [k, H] and deepstack additions after the first layers
    rope_positions: Optional[np.ndarray] = None
    replace_rows: Optional[np.ndarray] = None
    replace_embeds: Optional[np.ndarray] = None
    deepstack: tuple = ()

    def keep_hidden(self, hidden: np.ndarray) -> np.ndarray:
        """Record the logit rows' final hidden states if asked; returns them unchanged."""
        if self.want_hidden:
            self.hidden = np.array(hidden, dtype=np.float32, copy=True)
        return hidden

    def rope(self, model):
        """cos, sin of every row: 1-D positions, or the model's M-RoPE tables."""
        if self.rope_positions is None:
            return model.ops.rope_tables(self.positions, model.inv_freq)
        return model.rope_tables(self.rope_positions)

    @property
    def replaces(self) -> bool:
        return self.replace_rows is not None and len(self.replace_rows) > 0

    def replace_and_stack(self, x: np.ndarray, layer: Optional[int] = None) -> np.ndarray:
        """x [1, N, H] with the replaced rows' embeddings (layer None) or with layer's
        deepstack rows added."""
        if not self.replaces or (layer is not None and layer >= len(self.deepstack)):
            return x
        x = np.array(x, dtype=np.float32)
        if layer is None:
            x[0, self.replace_rows] = self.replace_embeds
        else:
            x[0, self.replace_rows] += self.deepstack[layer]
        return x

    @classmethod
    def build(cls, cache: PagedKVCache,
              items: Sequence[tuple[SequenceBlocks, Sequence[int], int, Union[bool, int]]],
              inputs: Optional[Sequence] = None) -> "PagedBatch":
        """items: (sequence blocks, new token ids, position of the first, logits wanted):
        True (or 1) for the last row's logits, False (0) for none, n > 1 for the last n
        rows' (a verify row: n = all of its tokens). The sequences' tables must already hold
        blocks for the new tokens. inputs: per item a `multimodal.ForwardInputs` or None
        (text at index positions)."""
        counts = [len(toks) for _, toks, _, _ in items]
        q_start = np.zeros(len(items) + 1, np.int64)
        q_start[1:] = np.cumsum(counts)
        pos_start = np.array([p for _, _, p, _ in items], np.int64)
        width = max((len(s.table) for s, _, _, _ in items), default=1) or 1
        tables = np.zeros((len(items), width), np.int32)
        for i, (seq, _, _, _) in enumerate(items):
            tables[i, :len(seq.table)] = seq.table
        tokens = np.concatenate([np.asarray(t, np.int64) for _, t, _, _ in items]) if items \
            else np.zeros(0, np.int64)
        positions = np.concatenate([np.arange(p, p + n) for p, n in zip(pos_start, counts)]) \
            if items else np.zeros(0, np.int64)
        slots = np.concatenate([cache.slots(s, p, n) for (s, _, p, _), n in zip(items, counts)]) \
            if items else np.zeros(0, np.int64)
        wanted = [int(it[3]) for it in items]
        if any(w < 0 or w > c for w, c in zip(wanted, counts)):
            raise ValueError(f"logits wanted {wanted} for rows {counts}: each must be in "
                             f"[0, its row count]")
        logit_rows = np.array([r for i, w in enumerate(wanted)
                               for r in range(q_start[i + 1] - w, q_start[i + 1])], np.int64)
        state_slots = np.array([-1 if s.state_slot is None else s.state_slot
                                for s, _, _, _ in items], np.int64)
        record = np.array([w > 1 for w in wanted], bool)
        batch = cls(tokens, positions, q_start, pos_start, tables, slots, logit_rows,
                    state_slots, record=record if record.any() else None)
        if inputs is not None and any(i is not None for i in inputs):
            batch._add_inputs(inputs)
        return batch

    def _add_inputs(self, inputs: Sequence) -> None:
        rope = np.broadcast_to(self.positions, (3, len(self.positions))).copy()
        rows, embeds, deep = [], [], []
        for i, inp in enumerate(inputs):
            if inp is None:
                continue
            r0, r1 = int(self.q_start[i]), int(self.q_start[i + 1])
            if inp.positions is not None:
                rope[:, r0:r1] = inp.positions
            if inp.replaces:
                rows.append(inp.rows + r0)
                embeds.append(inp.embeds)
                deep.append(inp.deepstack)
        self.rope_positions = rope
        if rows:
            depth = {len(d) for d in deep}
            if len(depth) != 1:
                raise ValueError("the sequences of one batch disagree on deepstack depth")
            self.replace_rows = np.concatenate(rows)
            self.replace_embeds = np.concatenate(embeds)
            self.deepstack = tuple(np.concatenate([d[j] for d in deep])
                                   for j in range(depth.pop()))


def forward_paged(model, batch: PagedBatch, cache: PagedKVCache) -> np.ndarray:
    """Logits float32 [len(batch.logit_rows), V] for a `DecoderModel`-shaped model (its
    `layers` of Block with self_attn / mlp, `embed_tokens`, `norm`, `lm_head`)."""
    ops, cfg = model.ops, model.config
    tokens = batch.tokens
    if tokens.size and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"token id out of range 0..{cfg.vocab_size - 1}")
    n = tokens.shape[0]
    cos, sin = batch.rope(model)
    step = None if batch.replaces else model._decode_step()
    if step is not None:  # the whole forward in one C call: the same kernels, in order
        hidden = step.paged(tokens, cos, sin, batch, cache.keys, cache.values)
        return model.logits(batch.keep_hidden(hidden[batch.logit_rows]))
    x = batch.replace_and_stack(ops.embed(model.embed_tokens, tokens[None, :]))  # [1, N, H]
    for index, block in enumerate(model.layers):
        attn = block.self_attn
        h = block.attn_input(x, ops)
        q, k, v = project(h, (attn.q_proj, attn.k_proj, attn.v_proj), ops)
        q = q.reshape(1, n, attn.nq, attn.d)
        k = k.reshape(1, n, attn.nkv, attn.d)
        v = v.reshape(1, n, attn.nkv, attn.d)
        if attn.q_norm is not None:
            q = ops.rms_norm(q, attn.q_norm, attn.eps)
            k = ops.rms_norm(k, attn.k_norm, attn.eps)
        q = ops.rope(q, cos, sin)
        k = ops.rope(k, cos, sin)
        cache.write(block.index, batch.slots, k[0], v[0])
        out = ops.paged_attention(q[0], cache.keys[block.index], cache.values[block.index],
                                  batch.q_start, batch.pos_start, batch.block_tables,
                                  1.0 / np.sqrt(attn.d), kv=cache.layouts[block.index])
        x = x + attn.project_out(out.reshape(1, n, attn.nq * attn.d), ops)
        x = x + block.mlp(block.mlp_input(x, ops), ops)
        x = batch.replace_and_stack(x, index)
    last = x[0, batch.logit_rows]                                # only rows that sample
    return model.logits(batch.keep_hidden(ops.rms_norm(last, model.norm, cfg.rms_norm_eps)))
