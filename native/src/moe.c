/* The sparse mixture-of-experts MLP (Qwen3-MoE, Qwen3.5-MoE) over n rows, the C twin of
 * lattice_engine/models/moe.py (SparseMoE.reference).
 *
 * Expert dispatch reads each selected expert's weights once per call: the rows are routed
 * (router matmul, top-k by logit, softmax weights), then counting-sorted by expert so that
 * each expert's rows are contiguous, and every expert's gate/up (then down) runs as one
 * few-row matmul over its rows. For the core formats all experts' matrices go to the
 * thread pool as ONE job (lk_matmul_grouped: the activations quantized once, each matrix
 * reading its own rows); a plugin format (LK_FMT_EXTERN) gets them all in one call of
 * its grouped matmul when it has one (lk_extern_matmul_grouped), else once per expert.
 * Each row then sums its experts' outputs in ascending expert order, so a row's
 * bits do not depend on the other rows of the batch (the matmuls are batch invariant too).
 *
 * The fused decode steps (decoder.c, qwen35_decoder.c) call lk_moe_forward for a layer
 * whose `moe` is set; the per-kernel path calls it through kernels/moe.py.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdlib.h>
#include <string.h>

int lk_moe_ok(const lk_moe *m) {
    const int64_t h = m->hidden, f = m->inter, e = m->n_experts;
    if (h <= 0 || f <= 0 || e <= 0 || m->top_k < 1 || m->top_k > e || m->top_k > LK_MOE_TOPK_MAX ||
        !m->gate || !m->up || !m->down || !lk_step_linear_ok(&m->router, e, h))
        return 0;
    for (int64_t i = 0; i < e; i++)
        if (!lk_step_linear_ok(&m->gate[i], f, h) || !lk_step_linear_ok(&m->up[i], f, h) ||
            !lk_step_linear_ok(&m->down[i], h, f) || m->gate[i].bias || m->up[i].bias ||
            m->down[i].bias || m->gate[i].fmt != m->gate[0].fmt ||
            m->up[i].fmt != m->gate[0].fmt || m->down[i].fmt != m->down[0].fmt)
            return 0;
    if (m->shared_inter > 0) {
        const int64_t s = m->shared_inter;
        if (!lk_step_linear_ok(&m->sh_gate, s, h) || !lk_step_linear_ok(&m->sh_up, s, h) ||
            !lk_step_linear_ok(&m->sh_down, h, s) || !lk_step_linear_ok(&m->sh_score, 1, h))
            return 0;
    }
    return 1;
}

/* Per-thread scratch, grown on demand and kept (the steps run from one thread at a time
   per model; different host threads get their own). */
static __thread void *moe_buf;
static __thread size_t moe_cap;

static void *scratch(size_t bytes) { return lk_thread_buffer(&moe_buf, &moe_cap, bytes); }

#define ALIGN16(n) (((n) + 15) & ~(int64_t)15) /* floats: keep every array 64-byte aligned */

/* Top-k of one row of router logits by logit (ties to the lower expert id), in ascending
   expert order, with their softmax probabilities over all experts, renormalised over the
   k when asked. */
static void route_row(const float *logit, int64_t E, int64_t k, int normalize, int32_t *ids,
                      float *w) {
    float mx = logit[0];
    for (int64_t e = 1; e < E; e++) mx = logit[e] > mx ? logit[e] : mx;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; e++) sum += expf(logit[e] - mx);
    uint64_t taken[(LK_MOE_EXPERTS_MAX + 63) / 64] = {0};
    for (int64_t j = 0; j < k; j++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!(taken[e >> 6] >> (e & 63) & 1) && (best < 0 || logit[e] > logit[best])) best = e;
        taken[best >> 6] |= 1ull << (best & 63);
    }
    int64_t j = 0;
    for (int64_t e = 0; e < E && j < k; e++)
        if (taken[e >> 6] >> (e & 63) & 1) {
            ids[j] = (int32_t)e;
            w[j] = expf(logit[e] - mx) / sum;
            j++;
        }
    if (normalize) {
        float s = 0.0f;
        for (j = 0; j < k; j++) s += w[j];
        for (j = 0; j < k; j++) w[j] /= s;
    }
}

/* y_e = matrices of format fmt over the rows [row0[e], row0[e] + cnt[e]) of x, for the
   experts with rows: one pool job for the core formats, one call for a plugin format with
   a grouped matmul (lk_extern_matmul_grouped), one call per expert otherwise. */
static int run_grouped(const lk_linear *const *l, float *const *y, int64_t nmat,
                       const float *x, int64_t K, const int64_t *row0, const int64_t *cnt,
                       const void **wp, int64_t *ldw, int64_t *N) {
    if (nmat == 0) return 0;
    int64_t same = 1; /* every matrix of the same plugin format: one grouped call */
    for (int64_t i = 1; i < nmat && l[0]->fmt == LK_FMT_EXTERN; i++)
        same &= l[i]->ext_grouped == l[0]->ext_grouped && l[i]->ext_ctx == l[0]->ext_ctx;
    if (l[0]->fmt == LK_FMT_EXTERN && (!l[0]->ext_grouped || !same)) {
        for (int64_t i = 0; i < nmat; i++)
            if (l[i]->ext(l[i]->ext_ctx, x + row0[i] * K, cnt[i], K, l[i]->w, l[i]->ldw,
                          l[i]->rows, y[i]))
                return -5;
        return 0;
    }
    for (int64_t i = 0; i < nmat; i++) {
        wp[i] = l[i]->w;
        ldw[i] = l[i]->ldw;
        N[i] = l[i]->rows;
    }
    if (l[0]->fmt == LK_FMT_EXTERN)
        return l[0]->ext_grouped(l[0]->ext_ctx, x, K, nmat, row0, cnt, wp, ldw, N, y) ? -5 : 0;
    return lk_matmul_grouped(l[0]->fmt, x, K, nmat, row0, cnt, wp, ldw, N, y) ? -5 : 0;
}

/* Rows per pass: a long prefill is cut into passes of this many rows, which bounds the
   scratch (~180 KB per row at Qwen3-30B-A3B's shapes) while each expert still gets enough
   rows (512 x top-8 / 128 experts = 32 on average) for the prefill kernels' tiles. */
#define MOE_PASS_ROWS 512

static int forward_rows(const lk_moe *m, const float *x, int64_t n, float *out);

int lk_moe_forward(const lk_moe *m, const float *x, int64_t n, float *out) {
    lk_init();
    if (n <= 0) return 0;
    if (!lk_moe_ok(m) || m->n_experts > LK_MOE_EXPERTS_MAX) return -4;
    for (int64_t r = 0; r < n; r += MOE_PASS_ROWS) {
        const int rc = forward_rows(m, x + r * m->hidden,
                                    n - r < MOE_PASS_ROWS ? n - r : MOE_PASS_ROWS,
                                    out + r * m->hidden);
        if (rc) return rc;
    }
    return 0;
}

static int forward_rows(const lk_moe *m, const float *x, int64_t n, float *out) {
    const int64_t H = m->hidden, F = m->inter, E = m->n_experts, k = m->top_k;
    const int64_t S = m->shared_inter > 0 ? m->shared_inter : 0, R = n * k;
    /* floats: logits [n, E], w [n, k], xg [R, H], g, u [R, F], yg [R, H], shared g, u
       [n, S], score [n], sy [n, H]; int64: pos [R], row0, cnt, fill [E], and the grouped
       calls' ldw, N, first rows, row counts [2E]; pointers: weights, outputs [2E]; int32:
       ids [R] */
    const int64_t nf = ALIGN16(n * E) + ALIGN16(R) + ALIGN16(R * H) + 2 * ALIGN16(R * F) +
                       ALIGN16(R * H) + 2 * ALIGN16(n * S) + ALIGN16(n) + ALIGN16(n * H);
    const size_t bytes = (size_t)nf * 4 + (size_t)(R + 11 * E) * 8 +
                         (size_t)(4 * E) * sizeof(void *) + (size_t)R * 4;
    uint8_t *base = (uint8_t *)scratch(bytes);
    if (!base) return -5;
    float *logits = (float *)base, *w = logits + ALIGN16(n * E), *xg = w + ALIGN16(R);
    float *g = xg + ALIGN16(R * H), *u = g + ALIGN16(R * F), *yg = u + ALIGN16(R * F);
    float *sg = yg + ALIGN16(R * H), *su = sg + ALIGN16(n * S), *score = su + ALIGN16(n * S);
    float *sy = score + ALIGN16(n);
    int64_t *pos = (int64_t *)(sy + ALIGN16(n * H)), *row0 = pos + R, *cnt = row0 + E;
    int64_t *fill = cnt + E, *ldw = fill + E, *N = ldw + 2 * E, *r0m = N + 2 * E;
    int64_t *cntm = r0m + 2 * E;
    const void **wp = (const void **)(cntm + 2 * E);
    float **ym = (float **)(wp + 2 * E);
    int32_t *ids = (int32_t *)(ym + 2 * E);

    /* route */
    const lk_linear *router[1] = {&m->router};
    if (lk_step_linears(router, &logits, 1, x, n)) return -5;
    for (int64_t r = 0; r < n; r++)
        route_row(logits + r * E, E, k, m->normalize, ids + r * k, w + r * k);
    /* counting sort of the (row, slot) pairs by expert; xg holds each expert's rows */
    memset(cnt, 0, (size_t)E * 8);
    for (int64_t i = 0; i < R; i++) cnt[ids[i]]++;
    int64_t acc = 0;
    for (int64_t e = 0; e < E; e++) {
        row0[e] = acc;
        fill[e] = acc;
        acc += cnt[e];
    }
    for (int64_t i = 0; i < R; i++) {
        pos[i] = fill[ids[i]]++;
        memcpy(xg + pos[i] * H, x + (i / k) * H, (size_t)H * 4);
    }
    /* gate and up of every selected expert in one job, silu * up, then every down */
    const lk_linear *mats[2 * LK_MOE_EXPERTS_MAX];
    int64_t nm = 0;
    for (int64_t e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        mats[nm] = &m->gate[e], r0m[nm] = row0[e], cntm[nm] = cnt[e], ym[nm] = g + row0[e] * F;
        nm++;
        mats[nm] = &m->up[e], r0m[nm] = row0[e], cntm[nm] = cnt[e], ym[nm] = u + row0[e] * F;
        nm++;
    }
    if (run_grouped(mats, ym, nm, xg, H, r0m, cntm, wp, ldw, N)) return -5;
    lk_silu_mul(g, F, u, F, R, F, g);
    nm = 0;
    for (int64_t e = 0; e < E; e++) {
        if (!cnt[e]) continue;
        mats[nm] = &m->down[e], r0m[nm] = row0[e], cntm[nm] = cnt[e], ym[nm] = yg + row0[e] * H;
        nm++;
    }
    if (run_grouped(mats, ym, nm, g, F, r0m, cntm, wp, ldw, N)) return -5;
    /* each row: its experts' outputs, weighted, in ascending expert order */
    for (int64_t r = 0; r < n; r++) {
        float *o = out + r * H;
        memset(o, 0, (size_t)H * 4);
        for (int64_t j = 0; j < k; j++) {
            const float wj = w[r * k + j], *y = yg + pos[r * k + j] * H;
            for (int64_t c = 0; c < H; c++) {
                const float t = wj * y[c];
                o[c] = o[c] + t;
            }
        }
    }
    if (S) { /* + sigmoid(score . x) * shared_expert(x) */
        const lk_linear *in[3] = {&m->sh_gate, &m->sh_up, &m->sh_score};
        float *in_out[3] = {sg, su, score};
        if (lk_step_linears(in, in_out, 3, x, n)) return -5;
        lk_silu_mul(sg, S, su, S, n, S, sg);
        const lk_linear *down[1] = {&m->sh_down};
        if (lk_step_linears(down, &sy, 1, sg, n)) return -5;
        lk_sigmoid(score, n, score);
        for (int64_t r = 0; r < n; r++)
            for (int64_t c = 0; c < H; c++) {
                const float t = score[r] * sy[r * H + c];
                out[r * H + c] = out[r * H + c] + t;
            }
    }
    return 0;
}
