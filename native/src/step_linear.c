/* The pieces the fused decode steps (decoder.c, qwen35_decoder.c) share: checking a
 * matrix description, running the matrices that read one input, embedding lookup. */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <string.h>

int lk_step_linear_ok(const lk_linear *l, int64_t rows, int64_t cols) {
    if (l->fmt == LK_FMT_EXTERN) return l->ext && l->w && l->rows == rows && l->cols == cols;
    if (l->fmt < LK_FMT_F32 || l->fmt > LK_FMT_Q8_0_R16 || !l->w) return 0;
    if (l->rows != rows || l->cols != cols) return 0;
    if ((l->fmt == LK_FMT_Q8_0 || l->fmt == LK_FMT_Q8_0_R16) && cols % LK_QK8_0) return 0;
    if (l->fmt == LK_FMT_Q8_0_R16 &&
        (rows % LK_R16_ROWS || l->ldw != cols / LK_QK8_0 * (int64_t)sizeof(lk_block_q8_0)))
        return 0;
    return 1;
}

/* after a matmul the core did not run as one of its own jobs: l's bias, then its
   adapters' update, on y [M, l->rows]. Returns lk_lora_apply's code. */
static int extern_post(const lk_linear *l, const float *x, int64_t M, float *y) {
    if (l->bias)
        for (int64_t r = 0; r < M; r++) lk_add(y + r * l->rows, l->bias, l->rows, y + r * l->rows);
    return l->lora ? lk_lora_apply(l->lora, x, M, l->cols, l->rows, y) : 0;
}

/* y_i = x @ W_i^T (+ b_i) (+ the adapters' low-rank updates) for n matrices reading the
   same x: one pool job per core weight format among them (usually one job for all), which
   also runs the adapters' down pass (its first tasks) and adds each chunk of output rows'
   bias and adapter update right after the chunk (what the down pass was not ready for
   then gets a second job; lora.c); a plugin format's matrices one
   call each, then their bias and lk_lora_apply. Returns 0, -5 when a plugin's matmul or
   the adapter update ran out of memory, -2 when the adapter row selection does not cover
   the M rows. */
int lk_step_linears(const lk_linear *const *l, float *const *y, int n, const float *x,
                    int64_t M) {
    int done[LK_MATMUL_MULTI_MAX] = {0};
    for (int i = 0; i < n; i++) {
        if (done[i]) continue;
        const int gtype = l[i]->fmt == LK_FMT_EXTERN ? lk_ggml_ctx_type(l[i]->ext_ctx) : 0;
        if (gtype) {
            /* the core's GGUF block types: every matrix of this type reading x in one call
               (x quantized once, one pool job), then each one's bias and adapters */
            const void *w[LK_MATMUL_MULTI_MAX];
            int64_t ldw[LK_MATMUL_MULTI_MAX], rows[LK_MATMUL_MULTI_MAX];
            float *out[LK_MATMUL_MULTI_MAX];
            int idx[LK_MATMUL_MULTI_MAX], m = 0;
            for (int j = i; j < n; j++) {
                if (done[j] || l[j]->fmt != LK_FMT_EXTERN ||
                    lk_ggml_ctx_type(l[j]->ext_ctx) != gtype)
                    continue;
                done[j] = 1;
                w[m] = l[j]->w, ldw[m] = l[j]->ldw, rows[m] = l[j]->rows, out[m] = y[j];
                idx[m++] = j;
            }
            const int rc = lk_matmul_ggml_multi(gtype, x, M, l[i]->cols, m, w, ldw, rows, out);
            if (rc) return rc == -1 ? -2 : rc;
            for (int k = 0; k < m; k++) {
                const int prc = extern_post(l[idx[k]], x, M, y[idx[k]]);
                if (prc) return prc;
            }
            continue;
        }
        if (l[i]->fmt == LK_FMT_EXTERN) {
            done[i] = 1;
            if (l[i]->ext(l[i]->ext_ctx, x, M, l[i]->cols, l[i]->w, l[i]->ldw, l[i]->rows, y[i]))
                return -5;
            const int prc = extern_post(l[i], x, M, y[i]);
            if (prc) return prc;
            continue;
        }
        const void *w[LK_MATMUL_MULTI_MAX];
        int64_t ldw[LK_MATMUL_MULTI_MAX], rows[LK_MATMUL_MULTI_MAX];
        float *out[LK_MATMUL_MULTI_MAX];
        const lk_lora *lora[LK_MATMUL_MULTI_MAX];
        const float *bias[LK_MATMUL_MULTI_MAX];
        int m = 0, extra = 0;
        for (int j = i; j < n; j++) {
            if (done[j] || l[j]->fmt != l[i]->fmt) continue;
            done[j] = 1;
            w[m] = l[j]->w;
            ldw[m] = l[j]->ldw;
            rows[m] = l[j]->rows;
            out[m] = y[j];
            lora[m] = l[j]->lora;
            bias[m] = l[j]->bias;
            extra |= lora[m] || bias[m];
            m++;
        }
        if (!extra) {
            lk_matmul_multi(l[i]->fmt, x, M, l[i]->cols, m, w, ldw, rows, out);
            continue;
        }
        lk_lora_plan plan;
        const int rc = lk_lora_plan_make(&plan, m, lora, bias, out, rows, x, M, l[i]->cols);
        if (rc) {
            lk_lora_plan_free(&plan);
            return rc;
        }
        const lk_mm_hooks hooks = {plan.active ? plan.ndown : 0, lk_lora_plan_down,
                                   lk_lora_plan_post, &plan};
        lk_matmul_multi_hooked(l[i]->fmt, x, M, l[i]->cols, m, w, ldw, rows, out, &hooks);
        lk_lora_plan_run_up(&plan);
        lk_lora_plan_free(&plan);
    }
    return 0;
}

int lk_step_embed_ok(const lk_linear *e, int64_t cols) {
    /* by its ctx: Python hands over cffi's address of the function, which need not be the
       symbol's own */
    if (e->fmt == LK_FMT_EXTERN && !lk_ggml_ctx_type(e->ext_ctx)) return 0;
    return lk_step_linear_ok(e, e->rows, cols);
}

int lk_step_embed(const lk_linear *e, const int64_t *ids, int64_t n, float *out) {
    switch (e->fmt) {
    case LK_FMT_F32: return lk_embed_f32(e->w, e->ldw, e->rows, e->cols, ids, n, out);
    case LK_FMT_F16: return lk_embed_f16(e->w, e->ldw, e->rows, e->cols, ids, n, out);
    case LK_FMT_Q8_0_R16: return lk_embed_q8_0_r16(e->w, e->ldw, e->rows, e->cols, ids, n, out);
    case LK_FMT_EXTERN: /* a table in a GGUF block type the core runs as stored */
        if (!lk_ggml_ctx_type(e->ext_ctx)) return -1;
        return lk_embed_ggml(lk_ggml_ctx_type(e->ext_ctx), e->w, e->ldw, e->rows, e->cols, ids,
                             n, out);
    default: return lk_embed_q8_0(e->w, e->ldw, e->rows, e->cols, ids, n, out);
    }
}

int lk_step_kv_paged(lk_step_kv *t, int64_t n, int64_t num_blocks, int64_t block_size,
                     int64_t nseq, const int64_t *q_start, const int64_t *pos_start,
                     const int32_t *tables, int64_t max_blocks, const int64_t *slots,
                     void *const *k_pools, void *const *v_pools) {
    /* everything attention will read must be in the pool: rows, slots, tables */
    if (nseq <= 0 || q_start[0] != 0 || q_start[nseq] != n || block_size <= 0) return -2;
    for (int64_t i = 0; i < nseq; i++) {
        const int64_t rows = q_start[i + 1] - q_start[i];
        if (rows < 0 || pos_start[i] < 0 ||
            (pos_start[i] + rows + block_size - 1) / block_size > max_blocks) return -2;
    }
    for (int64_t i = 0; i < nseq * max_blocks; i++)
        if (tables[i] < 0 || tables[i] >= num_blocks) return -2;
    for (int64_t r = 0; r < n; r++)
        if (slots[r] < 0 || slots[r] >= num_blocks * block_size) return -2;
    memset(t, 0, sizeof *t);
    t->paged = 1;
    t->slots = slots;
    t->q_start = q_start;
    t->pos_start = pos_start;
    t->tables = tables;
    t->nseq = nseq;
    t->max_blocks = max_blocks;
    t->block_size = block_size;
    t->k_pools = k_pools;
    t->v_pools = v_pools;
    return 0;
}

int lk_step_attend(const lk_step_kv *t, int64_t layer, int32_t dtype, void *k_cache,
                   void *v_cache, const float *k_shift, const float *k_scale,
                   int64_t cache_cap, const float *q, const float *k, const float *v,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float scale, float *attn) {
    const int64_t qd = Hq * D, kvd = Hkv * D, rowb = lk_kv_row_bytes(dtype, D);
    /* a row's Hkv head vectors, stored as dtype (the keys' transform per head) */
#define STORE_ROW(dst_k, dst_v, b)                                                         \
    do {                                                                                   \
        for (int64_t h = 0; h < Hkv; h++) {                                                \
            lk_kv_store(dtype, k + (b) * kvd + h * D, 1, D, k_shift ? k_shift + h * D : NULL, \
                        k_scale ? k_scale + h * D : NULL, (char *)(dst_k) + h * rowb);     \
            lk_kv_store(dtype, v + (b) * kvd + h * D, 1, D, NULL, NULL,                    \
                        (char *)(dst_v) + h * rowb);                                       \
        }                                                                                  \
    } while (0)
    if (t->paged) {
        char *kp = (char *)t->k_pools[layer], *vp = (char *)t->v_pools[layer];
        for (int64_t b = 0; b < B; b++)
            STORE_ROW(kp + t->slots[b] * Hkv * rowb, vp + t->slots[b] * Hkv * rowb, b);
        return lk_paged_attention_kv(q, Hq, D, dtype, kp, vp, k_scale, t->block_size, Hkv,
                                     t->nseq, t->q_start, t->pos_start, t->tables,
                                     t->max_blocks, scale, attn) ? -5 : 0;
    }
    const int64_t stride = cache_cap * Hkv * rowb; /* bytes of one sequence's cache rows */
    /* strides in the storage's units (floats, halves or bytes) */
    const int64_t unit = dtype == LK_KV_F32 ? 4 : dtype == LK_KV_F16 ? 2 : 1;
    const int64_t es = stride / unit, et = Hkv * rowb / unit, eh = rowb / unit;
    if (t->rows > 1) { /* B rows of sequence 0 at pos .. pos + B - 1, causal among them */
        for (int64_t b = 0; b < B; b++)
            STORE_ROW((char *)k_cache + (t->pos + b) * Hkv * rowb,
                      (char *)v_cache + (t->pos + b) * Hkv * rowb, b);
        lk_attention_kv(q, 1, B, Hq, D, B * qd, qd, D, dtype, k_cache, es, et, eh, v_cache, es,
                        et, eh, k_scale, t->pos + B, Hkv, t->pos, scale, attn);
        return 0;
    }
    for (int64_t b = 0; b < B; b++)
        STORE_ROW((char *)k_cache + b * stride + t->pos * Hkv * rowb,
                  (char *)v_cache + b * stride + t->pos * Hkv * rowb, b);
#undef STORE_ROW
    lk_attention_kv(q, B, 1, Hq, D, qd, qd, D, dtype, k_cache, es, et, eh, v_cache, es, et, eh,
                    k_scale, t->pos + 1, Hkv, t->pos, scale, attn);
    return 0;
}

int lk_step_rotation_ok(const lk_rotation *r, int64_t width) {
    if (!r->block) return 1;
    return r->block > 0 && !(r->block & (r->block - 1)) && r->m >= 1 &&
           r->m * r->block == width && (r->m == 1 || r->mix);
}

const float *lk_step_rotated(const lk_rotation *r, const float *x, int64_t rows, float *out) {
    if (!r->block) return x;
    lk_block_rotate(x, rows, r->m, r->block, r->mix, out);
    return out;
}
