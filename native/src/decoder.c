/* One decode step of a llama-family decoder (llama, qwen2, qwen3) in a single call.
 *
 * Decode runs ~15 kernels per layer on one row each; from Python every call costs a few
 * microseconds of wrapper and allocation, a few milliseconds per token on a 24-layer
 * model. Here the layers run back to back in C over a caller-provided workspace, and the
 * matrices that read the same input (q/k/v, gate/up) go to the pool as one job each.
 * The arithmetic is the per-kernel path's: the same kernels, in the same order, so the
 * step matches `lattice_engine.kernels` op by op.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <string.h>


int64_t lk_decoder_work_size(const lk_decoder *m, int64_t batch) {
    const int64_t qd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim;
    /* x, xn, tmp [hidden]; q, attn [qd]; k, v [kvd]; gate, up, act [intermediate] */
    return batch * (3 * m->hidden + 2 * qd + 2 * kvd + 3 * m->intermediate);
}

static int shapes_ok(const lk_decoder *m) {
    const int64_t h = m->hidden, qd = m->n_heads * m->head_dim, kvd = m->n_kv_heads * m->head_dim;
    const int64_t f = m->intermediate;
    if (m->n_layers < 0 || h <= 0 || m->head_dim <= 0 || m->n_kv_heads <= 0 ||
        m->n_heads % m->n_kv_heads || 2 * m->rope_half > m->head_dim || m->rope_half < 0 ||
        lk_kv_row_bytes(m->kv_dtype, m->head_dim) < 0)
        return 0;
    /* the embedding is looked up, never multiplied: a core format */
    if (!lk_step_embed_ok(&m->embed, h) ||
        m->embed.rows <= 0) return 0;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const lk_decoder_layer *L = &m->layers[i];
        if (!lk_step_linear_ok(&L->q, qd, h) || !lk_step_linear_ok(&L->k, kvd, h) || !lk_step_linear_ok(&L->v, kvd, h) ||
            !lk_step_linear_ok(&L->o, h, qd) || !L->attn_norm ||
            !L->mlp_norm || (!L->q_norm) != (!L->k_norm))
            return 0;
        if (L->moe ? !lk_moe_ok(L->moe) || L->moe->hidden != h || L->mlp_in.block ||
                         L->down_in.block
                   : !lk_step_linear_ok(&L->gate, f, h) || !lk_step_linear_ok(&L->up, f, h) ||
                         !lk_step_linear_ok(&L->down, h, f))
            return 0;
        if (!lk_step_rotation_ok(&L->down_in, f) || !lk_step_rotation_ok(&L->attn_in, h) ||
            !lk_step_rotation_ok(&L->mlp_in, h) || !lk_step_rotation_ok(&L->o_in, qd))
            return 0;
    }
    return 1;
}

/* t: a contiguous cache at one position for every row (lk_decoder_step), or a paged pool
   with its own position per row (lk_decoder_step_paged); everything else in a layer is the
   same. */
static int run_layers(const lk_decoder *m, const lk_step_kv *t, int64_t B, const float *cos_t,
                      const float *sin_t, float *work, float *hidden_out) {
    const int64_t h = m->hidden, D = m->head_dim, Hq = m->n_heads, Hkv = m->n_kv_heads;
    const int64_t qd = Hq * D, kvd = Hkv * D, f = m->intermediate;
    float *x = work, *xn = x + B * h, *tmp = xn + B * h, *q = tmp + B * h, *attn = q + B * qd;
    float *k = attn + B * qd, *v = k + B * kvd, *gate = v + B * kvd, *up = gate + B * f;
    float *act = up + B * f;
    const float scale = 1.0f / sqrtf((float)D);
    /* rope: one table row for all rows (contiguous), or one per row as T = B (paged) */
    const int64_t rb = t->paged || t->rows > 1 ? 1 : B, rt = t->paged || t->rows > 1 ? B : 1;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const lk_decoder_layer *L = &m->layers[i];
        lk_rms_norm(x, B, h, L->attn_norm, m->eps, m->norm_offset, xn);
        const lk_linear *qkv[3] = {&L->q, &L->k, &L->v};
        float *qkv_out[3] = {q, k, v};
        /* tmp is free until o's output: the rotated input of q/k/v goes there */
        if (lk_step_linears(qkv, qkv_out, 3, lk_step_rotated(&L->attn_in, xn, B, tmp), B)) return -5;
        if (L->q_norm) {
            lk_rms_norm(q, B * Hq, D, L->q_norm, m->eps, m->norm_offset, q);
            lk_rms_norm(k, B * Hkv, D, L->k_norm, m->eps, m->norm_offset, k);
        }
        lk_rope(q, rb, rt, Hq, D, rt * qd, qd, D, cos_t, sin_t, m->rope_half, m->rope_interleaved, q);
        lk_rope(k, rb, rt, Hkv, D, rt * kvd, kvd, D, cos_t, sin_t, m->rope_half, m->rope_interleaved, k);
        if (lk_step_attend(t, i, m->kv_dtype, L->k_cache, L->v_cache, L->k_shift, L->k_scale,
                           m->cache_cap, q, k, v, B, Hq, Hkv, D, scale, attn))
            return -5; /* out of scratch memory */
        const lk_linear *o[1] = {&L->o};
        float *o_out[1] = {tmp};
        /* q is free after attention: the rotated attention output goes there */
        if (lk_step_linears(o, o_out, 1, lk_step_rotated(&L->o_in, attn, B, q), B)) return -5;
        lk_add(x, tmp, B * h, x);
        lk_rms_norm(x, B, h, L->mlp_norm, m->eps, m->norm_offset, xn);
        if (L->moe) { /* the MoE MLP (moe.c): every selected expert read once for all B rows */
            const int rc = lk_moe_forward(L->moe, xn, B, tmp);
            if (rc) return rc == -4 ? -4 : -5;
            lk_add(x, tmp, B * h, x);
            continue;
        }
        const lk_linear *gu[2] = {&L->gate, &L->up};
        float *gu_out[2] = {gate, up};
        if (lk_step_linears(gu, gu_out, 2, lk_step_rotated(&L->mlp_in, xn, B, tmp), B)) return -5;
        lk_silu_mul(gate, f, up, f, B, f, act);
        const lk_linear *down[1] = {&L->down};
        float *down_out[1] = {tmp};
        /* gate is free again: the rotated activations go there */
        if (lk_step_linears(down, down_out, 1, lk_step_rotated(&L->down_in, act, B, gate), B))
            return -5;
        lk_add(x, tmp, B * h, x);
    }
    lk_rms_norm(x, B, h, m->final_norm, m->eps, m->norm_offset, hidden_out);
    return 0;
}

/* rows rows of the dense cache starting at pos: their token ids embedded into work, the
   cache position set in t. Returns 0 or the entry points' error code. */
static int dense_rows(const lk_decoder *m, const int64_t *tokens, int64_t rows, int64_t pos,
                      int64_t last_pos, float *work, int64_t work_len, lk_step_kv *t) {
    if (!shapes_ok(m)) return -4;
    if (pos < 0 || last_pos >= m->cache_cap) return -2;
    for (int64_t i = 0; i < m->n_layers; i++)
        if (!m->layers[i].k_cache || !m->layers[i].v_cache) return -4;
    if (work_len < lk_decoder_work_size(m, rows)) return -3;
    if (lk_step_embed(&m->embed, tokens, rows, work)) return -1;
    memset(t, 0, sizeof *t);
    t->pos = pos;
    return 0;
}

int lk_decoder_step(const lk_decoder *m, const int64_t *tokens, int64_t batch, int64_t pos,
                    const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                    float *hidden_out) {
    lk_init();
    if (batch <= 0) return 0;
    lk_step_kv t;
    const int rc = dense_rows(m, tokens, batch, pos, pos, work, work_len, &t);
    return rc ? rc : run_layers(m, &t, batch, cos_t, sin_t, work, hidden_out);
}

int lk_decoder_step_rows(const lk_decoder *m, const int64_t *tokens, int64_t T, int64_t pos,
                         const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                         float *hidden_out) {
    lk_init();
    if (T <= 0) return 0;
    lk_step_kv t;
    const int rc = dense_rows(m, tokens, T, pos, pos + T - 1, work, work_len, &t);
    if (rc) return rc;
    t.rows = T;
    return run_layers(m, &t, T, cos_t, sin_t, work, hidden_out);
}

int lk_decoder_step_paged(const lk_decoder *m, const int64_t *tokens, int64_t n,
                          const float *cos_t, const float *sin_t, const int64_t *slots,
                          void *const *k_pools, void *const *v_pools, int64_t num_blocks,
                          int64_t block_size, int64_t nseq, const int64_t *q_start,
                          const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                          float *work, int64_t work_len, float *hidden_out) {
    lk_init();
    if (n <= 0) return 0;
    if (!shapes_ok(m)) return -4;
    if (work_len < lk_decoder_work_size(m, n)) return -3;
    lk_step_kv t;
    if (lk_step_kv_paged(&t, n, num_blocks, block_size, nseq, q_start, pos_start, tables,
                         max_blocks, slots, k_pools, v_pools))
        return -2;
    for (int64_t i = 0; i < m->n_layers; i++)
        if (!k_pools[i] || !v_pools[i]) return -4;
    if (lk_step_embed(&m->embed, tokens, n, work)) return -1;
    return run_layers(m, &t, n, cos_t, sin_t, work, hidden_out);
}
