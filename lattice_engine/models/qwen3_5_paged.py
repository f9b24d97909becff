"""Qwen3.5's forward over a flat batch of sequences in a `PagedKVCache` (continuous batching).

The gated full-attention layers read K/V through the block tables like the llama family's
(`paged_forward`). The Gated DeltaNet layers keep, per sequence, a conv window and a
delta-rule memory in the cache's `RecurrentStateSlots` (two arrays per layer); their
projections, norms and MLPs run once over all rows of the step (M = rows), only the
recurrence itself runs sequence by sequence.

Batch invariance: a row's result must not depend on what else is in the step nor on how
its prompt was chunked. The matmuls give every row the same bits at any M; the recurrence
is the only place where rows of one sequence interact, and the chunked delta rule's
result depends on where its chunks start. The scheduler starts prefill chunks on block
boundaries (for the state snapshots), so the delta rule runs with chunks of block_size
tokens: they then always start at multiples of block_size, whatever the chunking, and
the state handed from one call to the next is the float32 state a single call would
carry (checked bit for bit in the tests). Decode rows run the recurrent form, and so do a
speculative verify's rows (`batch.record`), which leave each row's conv window and
delta-rule inputs in the slot's trail and the delta memory as it was (fused step and
per-kernel path alike): `RecurrentStateSlots.rollback` replays the kept rows on it.
"""

from __future__ import annotations

import numpy as np

from ..cache.paged import PagedKVCache
from ..cache.recurrent import RecurrentStateSlots
from .base import check_tokens


def make_paged_cache(model, num_blocks: int, block_size: int = 16, variant: str = "",
                     max_sequences: int = 0) -> PagedKVCache:
    """K/V blocks for the full-attention layers and a recurrent-state slot (conv window
    [K-1, conv_dim] and memory [nv, dk, dv] per DeltaNet layer) for each of max_sequences
    running sequences; a verify's kept tokens are replayed on the memories
    (`model.delta_replays`)."""
    c = model.config
    conv_dim = 2 * c.linear_num_key_heads * c.linear_key_head_dim + \
        c.linear_num_value_heads * c.linear_value_head_dim
    shapes = []
    for _ in range(model.num_linear):
        shapes += [(c.linear_conv_kernel_dim - 1, conv_dim),
                   (c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)]
    replays = {2 * j + 1: r for j, r in enumerate(model.delta_replays())}
    recurrent = RecurrentStateSlots(shapes, max(max_sequences, 1), replays=replays) \
        if shapes else None
    return PagedKVCache(model.num_full, c.num_key_value_heads, c.head_dim, num_blocks,
                        block_size, variant, recurrent=recurrent, dtype=model.kv_cache,
                        key_transforms=model.kv_key_transforms())


def forward_paged(model, batch, cache: PagedKVCache) -> np.ndarray:
    """Logits float32 [len(batch.logit_rows), V]; writes the rows' K/V and advances each
    sequence's recurrent state (`batch.state_slots`)."""
    ops, cfg = model.ops, model.config
    tokens = check_tokens(batch.tokens[None, :], cfg.vocab_size)[0]
    n = tokens.shape[0]
    q_start = batch.q_start
    if model.num_linear and (cache.recurrent is None or
                             np.any(batch.state_slots[np.diff(q_start) > 0] < 0)):
        raise ValueError("a Qwen3.5 paged batch needs a recurrent-state slot for every "
                         "sequence (make the cache with the model's make_paged_cache)")
    cos, sin = batch.rope(model)
    record = batch.record if batch.record is not None and model.num_linear else None
    # rows that take image embeddings need the per-kernel path (it replaces the rows)
    step = model._decode_step() if not batch.replaces else None
    trails = {}
    if record is not None:
        for i in np.flatnonzero(record):
            slot = int(batch.state_slots[i])
            cache.recurrent.start_trail(slot, int(q_start[i + 1] - q_start[i]))
            # a verify keeps each row's conv window and delta-rule inputs (the fused step
            # too); rollback replays the kept rows on the delta states it left as they were
            trails[int(i)] = [(cache.recurrent.trails[slot][2 * j][1:],
                               cache.recurrent.trails[slot][2 * j + 1][1:])
                              for j in range(model.num_linear)]
    if step is not None:  # the whole forward in one C call: the same kernels, in order
        hidden = step.paged(tokens, cos, sin, batch, cache.keys, cache.values,
                            cache.recurrent.arrays if cache.recurrent is not None else [],
                            trails)
        return model.logits(batch.keep_hidden(hidden[batch.logit_rows]))
    x = batch.replace_and_stack(ops.embed(model.embed_tokens, tokens[None, :]))  # [1, N, H]
    for index, block in enumerate(model.layers):
        normed = ops.rms_norm(x, block.input_layernorm, block.eps, 1.0)
        if block.kind == "linear_attention":
            a = block.linear_attn
            mixed, beta, g, z = a.project(normed, ops)
            core = np.empty((1, n, a.nv, a.dv), np.float32)
            for i, slot in enumerate(batch.state_slots):
                r0, r1 = int(q_start[i]), int(q_start[i + 1])
                if r1 == r0:
                    continue
                states = cache.recurrent.state(int(slot))
                conv, delta = states[2 * block.slot][None], states[2 * block.slot + 1][None]
                if record is not None and record[i]:
                    # verify rows: one token-by-token call (decoding's bits per token) that
                    # keeps what a partial accept needs to roll back exactly
                    rec = cache.recurrent
                    core[:, r0:r1] = a.recur_trail(
                        np.ascontiguousarray(mixed[:, r0:r1]),
                        np.ascontiguousarray(beta[:, r0:r1]),
                        np.ascontiguousarray(g[:, r0:r1]), conv, delta, ops,
                        rec.trail_view(int(slot), 2 * block.slot),
                        rec.trail_view(int(slot), 2 * block.slot + 1))
                    continue
                core[:, r0:r1] = a.recur(np.ascontiguousarray(mixed[:, r0:r1]),
                                         np.ascontiguousarray(beta[:, r0:r1]),
                                         np.ascontiguousarray(g[:, r0:r1]), conv, delta, ops,
                                         cache.block_size if r1 - r0 > 1 else 0)
            h = x + a.gate_out(core, z, ops)
        else:
            attn = block.self_attn
            q, k, v, gate = attn.project(normed, cos, sin, ops)
            cache.write(block.slot, batch.slots, k[0], v[0])
            out = ops.paged_attention(q[0], cache.keys[block.slot], cache.values[block.slot],
                                      q_start, batch.pos_start, batch.block_tables,
                                      1.0 / np.sqrt(attn.d), kv=cache.layouts[block.slot])
            h = x + attn.gate_out(out, gate, ops)
        x = h + block.mlp(ops.rms_norm(h, block.post_attention_layernorm, block.eps, 1.0), ops)
        x = batch.replace_and_stack(x, index)
    last = x[0, batch.logit_rows]
    return model.logits(batch.keep_hidden(ops.rms_norm(last, model.norm, cfg.rms_norm_eps,
                                                       1.0)))
