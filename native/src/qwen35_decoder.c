/* One decode step of Qwen3.5 (Gated DeltaNet layers interleaved with gated full-attention
 * layers) in a single call.
 *
 * Per token the per-kernel path makes ~400 Python-level kernel calls (matmuls, norms, the
 * conv, the delta rule, the gates), each a few microseconds of wrapper and allocation. Here
 * the layers run back to back in C over a caller-provided workspace, and the matrices that
 * read the same input (a DeltaNet layer's qkv/z/b/a projections, q/k/v, gate/up) go to the
 * pool as one job per weight format. The arithmetic is the per-kernel path's: the same
 * kernels in the same order, and the glue between them (gates, residual adds, the
 * attention gate) as the same single float operations, so the step matches
 * `lattice_engine.kernels` op by op (the glue is single adds and multiplies, so there is
 * no a * b + c for the compiler to contract into an FMA the per-kernel path does not do).
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <string.h>
#include <stdlib.h>

/* Where the rows' state lives: the dense step's per-layer arrays (row b is sequence b, at
   position pos), or the paged pools of continuous batching (a flat batch of sequences,
   each its rows q_start[s] .. q_start[s + 1] at positions from pos_start[s], its DeltaNet
   states in slot state_slots[s] of every linear layer's pools). Pools are per layer index
   (NULL for the other kind). */
typedef struct {
    lk_step_kv kv;
    const int64_t *state_slots;
    float *const *conv_pools, *const *delta_pools;
    /* NULL, or per (sequence s, layer i) the trails of a speculative verify at
       [2 * (s * n_layers + i)] (the conv window after each of the sequence's rows,
       [rows, K-1, conv]) and [... + 1] (each row's delta-rule inputs, [rows, conv + 2 hv]:
       the conv's output row, g, beta); NULL entries for sequences that are not verified */
    float *const *trails;
} q35_target;

/* Widths of the per-row buffers. */
typedef struct {
    int64_t h, f, conv, key, value, hv, qg, qd, kvd;
} dims;

static dims dims_of(const lk_qwen35 *m) {
    dims d;
    d.h = m->hidden;
    d.f = m->intermediate;
    d.key = m->lin_k_heads * m->lin_k_dim;
    d.value = m->lin_v_heads * m->lin_v_dim;
    d.conv = 2 * d.key + d.value;
    d.hv = m->lin_v_heads;
    d.qd = m->n_heads * m->head_dim;
    d.qg = 2 * d.qd;
    d.kvd = m->n_kv_heads * m->head_dim;
    return d;
}

int64_t lk_qwen35_work_size(const lk_qwen35 *m, int64_t batch) {
    const dims d = dims_of(m);
    /* x, xn, tmp [h]; DeltaNet: mixed [conv], z, core, normed [value], b, a, g, beta [hv];
       attention: qg [qg], q, attn [qd], k, v [kvd]; MLP: gate, up, act [f] */
    return batch * (3 * d.h + d.conv + 3 * d.value + 4 * d.hv + d.qg + 2 * d.qd + 2 * d.kvd +
                    3 * d.f);
}

/* dense: the layers' own state arrays must be bound (the paged step brings pools) */
static int shapes_ok(const lk_qwen35 *m, int dense) {
    const dims d = dims_of(m);
    if (m->n_layers < 0 || d.h <= 0 || d.f <= 0 || m->head_dim <= 0 || m->n_kv_heads <= 0 ||
        m->n_heads <= 0 || m->n_heads % m->n_kv_heads || m->rope_half < 0 ||
        2 * m->rope_half > m->head_dim || m->lin_k_heads <= 0 || m->lin_v_heads <= 0 ||
        m->lin_v_heads % m->lin_k_heads || m->lin_k_dim <= 0 || m->lin_v_dim <= 0 ||
        m->conv_kernel < 1 || m->conv_kernel > 8 || lk_kv_row_bytes(m->kv_dtype, m->head_dim) < 0)
        return 0;
    if (!lk_step_embed_ok(&m->embed, d.h) ||
        m->embed.rows <= 0 || !m->final_norm)
        return 0;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const lk_qwen35_layer *L = &m->layers[i];
        if (!L->attn_norm || !L->mlp_norm)
            return 0;
        if (L->moe ? !lk_moe_ok(L->moe) || L->moe->hidden != d.h || L->down_in.block
                   : !lk_step_linear_ok(&L->gate, d.f, d.h) ||
                         !lk_step_linear_ok(&L->up, d.f, d.h) || !lk_step_linear_ok(&L->down, d.h, d.f))
            return 0;
        if (L->kind == LK_QWEN35_LINEAR) {
            if (!lk_step_linear_ok(&L->in_qkv, d.conv, d.h) || !lk_step_linear_ok(&L->in_z, d.value, d.h) ||
                !lk_step_linear_ok(&L->in_b, d.hv, d.h) || !lk_step_linear_ok(&L->in_a, d.hv, d.h) ||
                !lk_step_linear_ok(&L->out, d.h, d.value) || !L->conv_w || !L->neg_a || !L->dt_bias ||
                !L->head_norm || (dense && (!L->conv_state || !L->delta_state)))
                return 0;
        } else if (L->kind == LK_QWEN35_FULL) {
            if (!lk_step_linear_ok(&L->q, d.qg, d.h) || !lk_step_linear_ok(&L->k, d.kvd, d.h) ||
                !lk_step_linear_ok(&L->v, d.kvd, d.h) || !lk_step_linear_ok(&L->o, d.h, d.qd) || !L->q_norm ||
                !L->k_norm || (dense && (!L->k_cache || !L->v_cache)))
                return 0;
        } else {
            return 0;
        }
        if (!lk_step_rotation_ok(&L->down_in, d.f))
            return 0;
    }
    return 1;
}

/* The Gated DeltaNet mixer of layer li on xn [B, h]; its output projection goes to out.
   Paged, the conv and the delta rule run per sequence over its rows, as the per-kernel
   path (models/qwen3_5_paged.py) calls them: a prefill chunk in the delta rule's chunked
   form with chunks of block_size, a single row token by token. */
static int deltanet(const lk_qwen35 *m, const lk_qwen35_layer *L, int64_t li, const q35_target *t,
                    const dims *d, int64_t B, const float *xn, float *mixed, float *z, float *bb,
                    float *aa, float *g, float *beta, float *core, float *normed, float *out) {
    const lk_linear *in[4] = {&L->in_qkv, &L->in_z, &L->in_b, &L->in_a};
    float *in_out[4] = {mixed, z, bb, aa};
    if (lk_step_linears(in, in_out, 4, xn, B)) return -5;
    const int64_t conv_len = (m->conv_kernel - 1) * d->conv;
    const int64_t delta_len = d->hv * m->lin_k_dim * m->lin_v_dim;
    const lk_step_kv *kv = &t->kv;
    if (!kv->paged && !kv->rows)
        lk_causal_conv1d(mixed, B, 1, d->conv, d->conv, d->conv, L->conv_w, m->conv_kernel,
                         L->conv_state, 1);
    else
        for (int64_t s = 0; s < kv->nseq; s++) {
            const int64_t r0 = kv->q_start[s], c = kv->q_start[s + 1] - r0;
            float *state = t->conv_pools[li] + t->state_slots[s] * conv_len;
            float *trail = t->trails ? t->trails[2 * (s * m->n_layers + li)] : NULL;
            if (c > 0 && trail) {
                /* the window after row i: the last K-1 inputs of [state, rows 0..i], read
                   before the conv below overwrites both */
                const int64_t w = m->conv_kernel - 1;
                for (int64_t i = 0; i < c; i++)
                    for (int64_t r = 0; r < w; r++) {
                        const int64_t src = i + 1 + r;
                        const float *from = src < w ? state + src * d->conv
                                                    : mixed + (r0 + src - w) * d->conv;
                        memcpy(trail + (i * w + r) * d->conv, from, (size_t)d->conv * 4);
                    }
            }
            if (c > 0)
                lk_causal_conv1d(mixed + r0 * d->conv, 1, c, d->conv, c * d->conv, d->conv,
                                 L->conv_w, m->conv_kernel, state, 1);
        }
    /* beta = sigmoid(b); g = -exp(A_log) * softplus(a + dt_bias), as three float ops */
    lk_sigmoid(bb, B * d->hv, beta);
    for (int64_t b = 0; b < B; b++)
        for (int64_t hh = 0; hh < d->hv; hh++) aa[b * d->hv + hh] += L->dt_bias[hh];
    lk_softplus(aa, B * d->hv, g);
    for (int64_t b = 0; b < B; b++)
        for (int64_t hh = 0; hh < d->hv; hh++) g[b * d->hv + hh] *= L->neg_a[hh];
    if (!kv->paged && !kv->rows)
        lk_gated_delta_rule(mixed, mixed + d->key, mixed + 2 * d->key, B, 1, m->lin_k_heads,
                            m->lin_v_heads, m->lin_k_dim, m->lin_v_dim, d->conv, 0, g, beta,
                            L->delta_state, 0, core);
    else
        for (int64_t s = 0; s < kv->nseq; s++) {
            const int64_t r0 = kv->q_start[s], c = kv->q_start[s + 1] - r0;
            const float *qr = mixed + r0 * d->conv;
            float *state = t->delta_pools[li] + t->state_slots[s] * delta_len;
            float *trail = t->trails ? t->trails[2 * (s * m->n_layers + li) + 1] : NULL;
            if (c > 0 && trail) {
                /* a verify: keep each row's inputs, run the rows token by token without
                   writing the state; the accepted rows are replayed on it afterwards, so
                   the rejected ones cost no state traffic (a 1 MB state per layer, written
                   once per row, was most of a verify's extra time over a decode step) */
                const int64_t w = d->conv + 2 * d->hv;
                for (int64_t i = 0; i < c; i++) {
                    memcpy(trail + i * w, qr + i * d->conv, (size_t)d->conv * 4);
                    memcpy(trail + i * w + d->conv, g + (r0 + i) * d->hv, (size_t)d->hv * 4);
                    memcpy(trail + i * w + d->conv + d->hv, beta + (r0 + i) * d->hv,
                           (size_t)d->hv * 4);
                }
                lk_gated_delta_rule_ahead(qr, qr + d->key, qr + 2 * d->key, 1, c,
                                          m->lin_k_heads, m->lin_v_heads, m->lin_k_dim,
                                          m->lin_v_dim, 0, c > 1 ? d->conv : 0, g + r0 * d->hv,
                                          beta + r0 * d->hv, state, core + r0 * d->value);
            } else if (c > 0) /* one sequence (batch stride 0), its rows conv apart (0 for one row) */
                lk_gated_delta_rule(qr, qr + d->key, qr + 2 * d->key, 1, c, m->lin_k_heads,
                                    m->lin_v_heads, m->lin_k_dim, m->lin_v_dim, 0,
                                    c > 1 ? d->conv : 0, g + r0 * d->hv, beta + r0 * d->hv,
                                    state, c > 1 ? kv->block_size : 0, core + r0 * d->value);
        }
    lk_gated_rms_norm(core, z, B * d->hv, m->lin_v_dim, L->head_norm, m->eps, normed);
    const lk_linear *o[1] = {&L->out};
    return lk_step_linears(o, &out, 1, normed, B) ? -5 : 0;
}

/* The gated full-attention mixer of layer li on xn [B, h]: dense, every row at t->pos
   (one cos / sin row); paged, each row at its own position (a cos / sin row per row). */
static int attention(const lk_qwen35 *m, const lk_qwen35_layer *L, int64_t li, const lk_step_kv *t,
                     const dims *d, int64_t B, const float *cos_t, const float *sin_t,
                     const float *xn, float *qg, float *q, float *k, float *v, float *attn,
                     float *out) {
    const int64_t D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads;
    const lk_linear *in[3] = {&L->q, &L->k, &L->v};
    float *in_out[3] = {qg, k, v};
    if (lk_step_linears(in, in_out, 3, xn, B)) return -5;
    /* q_proj rows are per head: D query features, then D gate features */
    for (int64_t r = 0; r < B * Hq; r++) memcpy(q + r * D, qg + r * 2 * D, (size_t)D * 4);
    lk_rms_norm(q, B * Hq, D, L->q_norm, m->eps, 1.0f, q);
    lk_rms_norm(k, B * Hkv, D, L->k_norm, m->eps, 1.0f, k);
    const int64_t rb = t->paged || t->rows > 1 ? 1 : B, rt = t->paged || t->rows > 1 ? B : 1;
    lk_rope(q, rb, rt, Hq, D, rt * d->qd, d->qd, D, cos_t, sin_t, m->rope_half, 0, q);
    lk_rope(k, rb, rt, Hkv, D, rt * d->kvd, d->kvd, D, cos_t, sin_t, m->rope_half, 0, k);
    /* the per-kernel path's scale: 1 / sqrt(D) in double, rounded once to float */
    const float scale = (float)(1.0 / sqrt((double)D));
    if (lk_step_attend(t, li, m->kv_dtype, L->k_cache, L->v_cache, L->k_shift, L->k_scale,
                       m->cache_cap, q, k, v, B, Hq, Hkv, D, scale, attn))
        return -5; /* out of scratch memory */
    /* attn *= sigmoid(gate), the gate half of each head's q_proj rows (q is free now) */
    for (int64_t r = 0; r < B * Hq; r++) lk_sigmoid(qg + r * 2 * D + D, D, q + r * D);
    for (int64_t i = 0; i < B * d->qd; i++) attn[i] *= q[i];
    const lk_linear *o[1] = {&L->o};
    return lk_step_linears(o, &out, 1, attn, B) ? -5 : 0;
}

/* Every layer over the embedded rows in work (x), then the final norm into hidden_out. */
static int run_layers(const lk_qwen35 *m, const q35_target *t, int64_t B, const float *cos_t,
                      const float *sin_t, float *work, float *hidden_out) {
    const dims d = dims_of(m);
    float *x = work, *xn = x + B * d.h, *tmp = xn + B * d.h;
    float *mixed = tmp + B * d.h, *z = mixed + B * d.conv, *core = z + B * d.value;
    float *normed = core + B * d.value, *bb = normed + B * d.value, *aa = bb + B * d.hv;
    float *g = aa + B * d.hv, *beta = g + B * d.hv;
    float *qg = beta + B * d.hv, *q = qg + B * d.qg, *attn = q + B * d.qd;
    float *k = attn + B * d.qd, *v = k + B * d.kvd;
    float *gate = v + B * d.kvd, *up = gate + B * d.f, *act = up + B * d.f;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const lk_qwen35_layer *L = &m->layers[i];
        lk_rms_norm(x, B, d.h, L->attn_norm, m->eps, 1.0f, xn);
        const int rc = L->kind == LK_QWEN35_LINEAR
            ? deltanet(m, L, i, t, &d, B, xn, mixed, z, bb, aa, g, beta, core, normed, tmp)
            : attention(m, L, i, &t->kv, &d, B, cos_t, sin_t, xn, qg, q, k, v, attn, tmp);
        if (rc) return rc;
        lk_add(x, tmp, B * d.h, x);
        lk_rms_norm(x, B, d.h, L->mlp_norm, m->eps, 1.0f, xn);
        if (L->moe) { /* the MoE MLP (moe.c): every selected expert read once for all B rows */
            const int moe_rc = lk_moe_forward(L->moe, xn, B, tmp);
            if (moe_rc) return moe_rc == -4 ? -4 : -5;
            lk_add(x, tmp, B * d.h, x);
            continue;
        }
        const lk_linear *gu[2] = {&L->gate, &L->up};
        float *gu_out[2] = {gate, up};
        if (lk_step_linears(gu, gu_out, 2, xn, B)) return -5;
        lk_silu_mul(gate, d.f, up, d.f, B, d.f, act);
        const lk_linear *down[1] = {&L->down};
        /* gate is free again: the rotated activations go there */
        if (lk_step_linears(down, &tmp, 1, lk_step_rotated(&L->down_in, act, B, gate), B))
            return -5;
        lk_add(x, tmp, B * d.h, x);
    }
    lk_rms_norm(x, B, d.h, m->final_norm, m->eps, 1.0f, hidden_out);
    return 0;
}

int lk_qwen35_step(const lk_qwen35 *m, const int64_t *tokens, int64_t batch, int64_t pos,
                   const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                   float *hidden_out) {
    lk_init();
    if (batch <= 0) return 0;
    if (!shapes_ok(m, 1)) return -4;
    if (pos < 0 || pos >= m->cache_cap) return -2;
    if (work_len < lk_qwen35_work_size(m, batch)) return -3;
    if (lk_step_embed(&m->embed, tokens, batch, work)) return -1;
    q35_target t = {0};
    t.kv.pos = pos;
    return run_layers(m, &t, batch, cos_t, sin_t, work, hidden_out);
}

int lk_qwen35_step_paged(const lk_qwen35 *m, const int64_t *tokens, int64_t n,
                         const float *cos_t, const float *sin_t, const int64_t *slots,
                         void *const *k_pools, void *const *v_pools, int64_t num_blocks,
                         int64_t block_size, float *const *conv_pools,
                         float *const *delta_pools, int64_t num_state_slots,
                         const int64_t *state_slots, int64_t nseq, const int64_t *q_start,
                         const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                         float *work, int64_t work_len, float *hidden_out) {
    return lk_qwen35_step_paged_trail(m, tokens, n, cos_t, sin_t, slots, k_pools, v_pools,
                                      num_blocks, block_size, conv_pools, delta_pools,
                                      num_state_slots, state_slots, nseq, q_start, pos_start,
                                      tables, max_blocks, NULL, work, work_len, hidden_out);
}

int lk_qwen35_step_paged_trail(const lk_qwen35 *m, const int64_t *tokens, int64_t n,
                               const float *cos_t, const float *sin_t, const int64_t *slots,
                               void *const *k_pools, void *const *v_pools,
                               int64_t num_blocks, int64_t block_size,
                               float *const *conv_pools, float *const *delta_pools,
                               int64_t num_state_slots, const int64_t *state_slots,
                               int64_t nseq, const int64_t *q_start, const int64_t *pos_start,
                               const int32_t *tables, int64_t max_blocks,
                               float *const *trails, float *work, int64_t work_len,
                               float *hidden_out) {
    lk_init();
    if (n <= 0) return 0;
    if (!shapes_ok(m, 0)) return -4;
    if (work_len < lk_qwen35_work_size(m, n)) return -3;
    /* everything the step will touch must be in the pools: rows, slots, tables, states */
    q35_target t = {0};
    if (lk_step_kv_paged(&t.kv, n, num_blocks, block_size, nseq, q_start, pos_start, tables,
                         max_blocks, slots, k_pools, v_pools))
        return -2;
    for (int64_t s = 0; s < nseq; s++)
        if (q_start[s + 1] > q_start[s] && (state_slots[s] < 0 || state_slots[s] >= num_state_slots))
            return -2;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const int linear = m->layers[i].kind == LK_QWEN35_LINEAR;
        if (linear ? !conv_pools[i] || !delta_pools[i] : !k_pools[i] || !v_pools[i]) return -4;
    }
    if (lk_step_embed(&m->embed, tokens, n, work)) return -1;
    t.state_slots = state_slots;
    t.conv_pools = conv_pools;
    t.delta_pools = delta_pools;
    t.trails = trails;
    return run_layers(m, &t, n, cos_t, sin_t, work, hidden_out);
}

int lk_qwen35_step_rows(const lk_qwen35 *m, const int64_t *tokens, int64_t T, int64_t pos,
                        const float *cos_t, const float *sin_t, float *const *trails,
                        float *work, int64_t work_len, float *hidden_out) {
    lk_init();
    if (T <= 0) return 0;
    if (!shapes_ok(m, 1)) return -4;
    if (pos < 0 || pos + T > m->cache_cap) return -2;
    if (work_len < lk_qwen35_work_size(m, T)) return -3;
    if (lk_step_embed(&m->embed, tokens, T, work)) return -1;
    /* the DeltaNet layers run as the paged step's one sequence does (per-sequence conv and
       token-by-token delta rule, each row's state in the trail), their states being the
       layers' own (sequence 0, slot 0) */
    float **pools = (float **)malloc((size_t)(2 * (m->n_layers > 0 ? m->n_layers : 1)) *
                                     sizeof(float *));
    if (!pools) return -5;
    for (int64_t i = 0; i < m->n_layers; i++) {
        pools[i] = m->layers[i].conv_state;
        pools[m->n_layers + i] = m->layers[i].delta_state;
    }
    const int64_t q_start[2] = {0, T}, slot0 = 0;
    q35_target t = {0};
    t.kv.pos = pos;
    t.kv.rows = T;
    t.kv.nseq = 1;
    t.kv.q_start = q_start;
    t.state_slots = &slot0;
    t.conv_pools = pools;
    t.delta_pools = pools + m->n_layers;
    t.trails = trails;
    const int rc = run_layers(m, &t, T, cos_t, sin_t, work, hidden_out);
    free(pools);
    return rc;
}
