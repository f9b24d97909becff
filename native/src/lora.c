/* Low-rank adapter updates (LoRA), applied unmerged after a linear's matmul:
 *
 *     y[m] += scale_s * (x[m] . A_s^T) . B_s^T      for each row m, s = the row's slot
 *
 * with A_s [r, K] and B_s [N, r] float32 (the adapter stays float whatever the base
 * format). Rows choose their slot through the shared lk_lora_rows (one slot for all rows,
 * or one per row; -1 or a slot without factors for this module adds nothing), so one
 * batch can mix adapters and rows without any. Two passes, each spread over the pool when
 * it is large enough: t[m] = scale * x[m] . A^T (M x r dots of length K), then
 * y[m, o] += t[m] . B[o] (M x N dots of length r).
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdlib.h>

typedef struct {
    const lk_lora *l;
    const float *x;
    int64_t M, K, N, rmax, nch;
    float *t;
    float *y;
} lora_job;

enum { OUT_CHUNK = 256, STACK_FLOATS = 4096 };

static float dot_generic(const float *a, const float *b, int64_t n) {
    float s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++) s[k] += a[i + k] * b[i + k];
    float acc = (s[0] + s[1]) + (s[2] + s[3]);
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

#if LK_X86
LK_AVX2_TARGET static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float acc = lk_hsum8_avx2(_mm256_add_ps(s0, s1));
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) return dot_avx2(a, b, n);
#endif
    return dot_generic(a, b, n);
}

/* the factors row m uses, or NULL */
static inline const lk_lora_factor *row_factor(const lk_lora *l, int64_t m) {
    const lk_lora_rows *rows = l->rows;
    const int32_t s = rows->slot ? rows->slot[m] : rows->uniform;
    if (s < 0 || s >= l->n_slots || !l->slots[s].a || !l->slots[s].b) return NULL;
    return &l->slots[s];
}

/* pass 1 over units (row, j): t[m, j] = scale * x[m] . A[j] */
static void down_range(void *ctx, int64_t u0, int64_t u1, int ith) {
    (void)ith;
    const lora_job *j = (const lora_job *)ctx;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t m = u / j->rmax, k = u % j->rmax;
        const lk_lora_factor *f = row_factor(j->l, m);
        if (!f || k >= f->r) continue;
        j->t[u] = f->scale * dot(j->x + m * j->K, f->a + k * j->K, j->K);
    }
}

/* pass 2 over units (row, chunk of outputs): y[m, o] += t[m] . B[o] */
static void up_range(void *ctx, int64_t u0, int64_t u1, int ith) {
    (void)ith;
    const lora_job *j = (const lora_job *)ctx;
    for (int64_t u = u0; u < u1; u++) {
        const int64_t m = u / j->nch, c = u % j->nch;
        const lk_lora_factor *f = row_factor(j->l, m);
        if (!f) continue;
        const float *t = j->t + m * j->rmax;
        float *y = j->y + m * j->N;
        const int64_t o1 = (c + 1) * OUT_CHUNK < j->N ? (c + 1) * OUT_CHUNK : j->N;
        for (int64_t o = c * OUT_CHUNK; o < o1; o++) y[o] += dot(t, f->b + o * f->r, f->r);
    }
}

int lk_lora_apply(const lk_lora *l, const float *x, int64_t M, int64_t K, int64_t N,
                  float *y) {
    if (!l || l->n_slots <= 0 || M <= 0) return 0;
    const lk_lora_rows *rows = l->rows;
    if (!rows) return -2;
    if (rows->slot && rows->n != M) return -2;
    if (!rows->slot && (rows->uniform < 0 || rows->uniform >= l->n_slots)) return 0;
    int64_t rmax = 0;
    for (int64_t s = 0; s < l->n_slots; s++) {
        if (!l->slots[s].a) continue;
        if (l->slots[s].r <= 0) return -2;
        if (l->slots[s].r > rmax) rmax = l->slots[s].r;
    }
    if (rmax == 0) return 0;
    float stack[STACK_FLOATS];
    float *t = M * rmax <= STACK_FLOATS ? stack : malloc((size_t)(M * rmax) * sizeof(float));
    if (!t) return -5;
    lora_job j = {l, x, M, K, N, rmax, (N + OUT_CHUNK - 1) / OUT_CHUNK, t, y};
    /* grains: about 16k multiply-adds per piece */
    const int64_t g1 = K >= 16384 ? 1 : 16384 / K;
    lk_parallel_for(down_range, &j, M * rmax, g1);
    const int64_t g2 = 16384 / (OUT_CHUNK * rmax) > 1 ? 16384 / (OUT_CHUNK * rmax) : 1;
    lk_parallel_for(up_range, &j, M * j.nch, g2);
    if (t != stack) free(t);
    return 0;
}
