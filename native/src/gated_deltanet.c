/* Gated DeltaNet (Qwen3.5's linear attention): the causal depthwise conv with its rolling
 * state, the gated delta rule (token-by-token recurrence for decode, the chunked UT-transform
 * form for prefill) and the per-head gated RMSNorm.
 *
 * The delta-rule state of one value head is Dk x Dv floats (64 KiB at 128 x 128), so a
 * work unit is one (sequence, value head): its state stays in L2 while the unit runs, and
 * heads spread over the pool. The loop bodies are written once as plain C (`*_body`,
 * always inlined) and instantiated twice: a generic version and one compiled for
 * AVX2/FMA, where GCC vectorizes them; the variant is picked at run time like the rest.
 * Reductions use eight partial sums so they vectorize without reassociation.
 *
 * Why one file of ~600 lines: the conv, both delta-rule forms and the gated norm share the
 * vector helpers and the (sequence, head) work split below, and each is instantiated
 * twice from one body; split apart, those helpers would move into a header every part
 * includes, for no reader's gain (each kernel is a few dozen lines, in order).
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

static inline int use_avx2(void) { return LK_X86 && lk_active_isa == LK_ISA_AVX2; }

/* ---- vector helpers (inlined into both instantiations) --------------------------------- */

INLINE float dot_body(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += a * x */
INLINE void axpy_body(float *restrict y, float a, const float *restrict x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* x * scale / sqrt(sum(x^2) + eps) into o */
INLINE void l2norm_body(const float *x, int64_t n, float scale, float *o) {
    const float inv = scale / sqrtf(dot_body(x, x, n) + 1e-6f);
    for (int64_t i = 0; i < n; i++) o[i] = x[i] * inv;
}

/* ---- causal conv1d ---------------------------------------------------------------------- */

typedef struct {
    float *x;
    int64_t B, T, C, sbx, stx;
    const float *w; /* [K, C] */
    int64_t K;
    float *state; /* [B, K-1, C] */
    int silu;
} conv_job;

#define CONV_BLOCK 256 /* channels per work unit */
#define CONV_MAXK 8

static void silu_row_generic(const float *a, float *o, int64_t n) {
    for (int64_t c = 0; c < n; c++) o[c] = a[c] / (1.0f + expf(-a[c]));
}
#if LK_X86
/* the SiLU of lk_silu's AVX2 kernel (a scalar expf per channel cost ~30 us per decode
   step of a 6144-channel conv) */
LK_AVX2_TARGET static void silu_row_avx2(const float *a, float *o, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        __m256 v = _mm256_loadu_ps(a + c);
        __m256 e = lk_exp8_avx2(_mm256_xor_ps(v, sign));
        _mm256_storeu_ps(o + c, _mm256_div_ps(v, _mm256_add_ps(one, e)));
    }
    for (; c < n; c++) o[c] = a[c] / (1.0f + expf(-a[c]));
}
#endif

/* Channels [c0, c1) of every sequence, in place: time runs backwards so each output
   overwrites an input no later step needs. */
INLINE void conv_body(const conv_job *j, int64_t c0, int64_t c1,
                      void (*silu_row)(const float *, float *, int64_t)) {
    const int64_t K = j->K, T = j->T, C = j->C, n = c1 - c0;
    float hist[CONV_MAXK - 1][CONV_BLOCK]; /* the state before this call */
    for (int64_t b = 0; b < j->B; b++) {
        float *st = j->state + b * (K - 1) * C;
        float *xb = j->x + b * j->sbx;
        for (int64_t r = 0; r < K - 1; r++) memcpy(hist[r], st + r * C + c0, (size_t)n * 4);
        /* new state: the last K-1 inputs of [old state, x] */
        for (int64_t r = 0; r < K - 1; r++) {
            const int64_t src = T + r; /* index in the extended sequence */
            const float *from = src < K - 1 ? hist[src] : xb + (src - (K - 1)) * j->stx + c0;
            memcpy(st + r * C + c0, from, (size_t)n * 4);
        }
        for (int64_t t = T - 1; t >= 0; t--) {
            float *o = xb + t * j->stx + c0;
            float acc[CONV_BLOCK];
            for (int64_t c = 0; c < n; c++) acc[c] = 0;
            for (int64_t tap = 0; tap < K; tap++) {
                const int64_t src = t + tap; /* extended index: t + tap - (K-1) in x */
                const float *in = src < K - 1 ? hist[src] : xb + (src - (K - 1)) * j->stx + c0;
                const float *w = j->w + tap * C + c0;
                for (int64_t c = 0; c < n; c++) acc[c] += w[c] * in[c];
            }
            if (j->silu)
                silu_row(acc, o, n);
            else
                memcpy(o, acc, (size_t)n * 4);
        }
    }
}

static void conv_generic(const conv_job *j, int64_t c0, int64_t c1) {
    conv_body(j, c0, c1, silu_row_generic);
}
#if LK_X86
LK_AVX2_TARGET static void conv_avx2(const conv_job *j, int64_t c0, int64_t c1) {
    conv_body(j, c0, c1, silu_row_avx2);
}
#endif

static void conv_range(void *ctx, int64_t u0, int64_t u1, int ith) {
    (void)ith;
    const conv_job *j = (const conv_job *)ctx;
    for (int64_t u = u0; u < u1; u++) {
        int64_t c0 = u * CONV_BLOCK, c1 = c0 + CONV_BLOCK > j->C ? j->C : c0 + CONV_BLOCK;
#if LK_X86
        if (use_avx2()) { conv_avx2(j, c0, c1); continue; }
#endif
        conv_generic(j, c0, c1);
    }
}

int lk_causal_conv1d(float *x, int64_t B, int64_t T, int64_t C, int64_t sbx, int64_t stx,
                     const float *w, int64_t K, float *state, int silu) {
    if (K < 1 || K > CONV_MAXK || B < 0 || T < 0 || C < 0) return -1;
    lk_init();
    conv_job j = {x, B, T, C, sbx, stx, w, K, state, silu};
    const int64_t units = (C + CONV_BLOCK - 1) / CONV_BLOCK;
    /* decode (one token) is a few microseconds of work: no thread hand-off */
    const int64_t grain = B * T * CONV_BLOCK * K < 65536 ? units : 1;
    lk_parallel_for(conv_range, &j, units, grain);
    return 0;
}

/* ---- gated delta rule -------------------------------------------------------------------- */

typedef struct {
    const float *q, *k, *v;
    int64_t B, T, Hk, Hv, Dk, Dv, sb, st;
    const float *g, *beta;
    float *state, *out;
    int64_t chunk;
    int ahead; /* the state is read, not written: each unit runs on a copy in its scratch
                  (token-by-token form only; lk_gated_delta_rule_ahead) */
} gdr_job;

/* Scratch per unit: q, k (normalized) and kv / delta rows for the recurrence; for the
   chunked form Q, K, beta exp(gc) K, W [C, Dk], beta V, U [C, Dv], T, P [C, C],
   K'^T [Dk, C], gc and beta [C]; then, ahead, the copy of the head's state. */
static size_t scratch_base(const gdr_job *j) {
    const int64_t C = j->chunk > 0 ? j->chunk : 1;
    return (size_t)(2 * j->Dk + 2 * j->Dv +
                    C * (4 * j->Dk + 2 * j->Dv + 2 * C + j->Dk + 3) + 64) / 16 * 16;
}
static size_t scratch_floats(const gdr_job *j) {
    return scratch_base(j) + (j->ahead ? (size_t)(j->Dk * j->Dv) : 0);
}

/* One (sequence, value head), token by token:
     S = exp(g) S;  kv = S^T k;  S += k (beta (v - kv))^T;  o = S^T q
   rearranged so the state is read twice and written once per token (decode is bound by
   that traffic): with d = exp(g) and S the old state,
     kv = d S^T k,  qs = d S^T q,  delta = beta (v - kv),  o = qs + (k . q) delta,
     S = d S + k delta^T                                                              */
INLINE void recurrent_body(const gdr_job *j, int64_t b, int64_t h, float *S, float *scr) {
    const int64_t Dk = j->Dk, Dv = j->Dv, Hv = j->Hv, hk = h / (Hv / j->Hk);
    float *qn = scr, *kn = qn + Dk, *kv = kn + Dk, *delta = kv + Dv;
    const float qscale = 1.0f / sqrtf((float)Dk);
    for (int64_t t = 0; t < j->T; t++) {
        const int64_t row = b * j->sb + t * j->st;
        l2norm_body(j->q + row + hk * Dk, Dk, qscale, qn);
        l2norm_body(j->k + row + hk * Dk, Dk, 1.0f, kn);
        const float *v = j->v + row + h * Dv;
        const float decay = expf(j->g[(b * j->T + t) * Hv + h]);
        const float beta = j->beta[(b * j->T + t) * Hv + h];
        float *o = j->out + ((b * j->T + t) * Hv + h) * Dv;
        for (int64_t c = 0; c < Dv; c++) kv[c] = o[c] = 0;
        for (int64_t i = 0; i < Dk; i++) {
            const float *Si = S + i * Dv;
            const float ki = kn[i], qi = qn[i];
            for (int64_t c = 0; c < Dv; c++) {
                kv[c] += ki * Si[c];
                o[c] += qi * Si[c];
            }
        }
        const float kq = dot_body(kn, qn, Dk);
        for (int64_t c = 0; c < Dv; c++) {
            delta[c] = (v[c] - decay * kv[c]) * beta;
            o[c] = decay * o[c] + kq * delta[c];
        }
        for (int64_t i = 0; i < Dk; i++) {
            float *Si = S + i * Dv;
            const float ki = kn[i];
            for (int64_t c = 0; c < Dv; c++) Si[c] = decay * Si[c] + ki * delta[c];
        }
    }
}

/* ---- small GEMM for the chunked form: C[M, N] += alpha * A[M, K] @ B[K, N] ------------ */

typedef void (*gemm_fn)(int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                        int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc);

static void gemm_generic(int64_t M, int64_t N, int64_t K, float alpha, const float *A,
                         int64_t lda, const float *B, int64_t ldb, float *C, int64_t ldc) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) {
            const float a = alpha * A[i * lda + k];
            if (a != 0.0f) axpy_body(C + i * ldc, a, B + k * ldb, N);
        }
}

#if LK_X86
/* MR rows x 16 columns in 2 * MR named registers (an array would be spilled), B streamed
   once per row block. */
LK_AVX2_TARGET static void gemm_tile1(int64_t K, float alpha, const float *A, int64_t lda,
                                        const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(A + 0 * lda + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    }
    const __m256 al = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(C + 0 * ldc, _mm256_fmadd_ps(al, c00, _mm256_loadu_ps(C + 0 * ldc)));
    _mm256_storeu_ps(C + 0 * ldc + 8, _mm256_fmadd_ps(al, c01, _mm256_loadu_ps(C + 0 * ldc + 8)));
}
LK_AVX2_TARGET static void gemm_tile2(int64_t K, float alpha, const float *A, int64_t lda,
                                        const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00; __m256 c10 = _mm256_setzero_ps(), c11 = c10;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(A + 0 * lda + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(A + 1 * lda + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    }
    const __m256 al = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(C + 0 * ldc, _mm256_fmadd_ps(al, c00, _mm256_loadu_ps(C + 0 * ldc)));
    _mm256_storeu_ps(C + 0 * ldc + 8, _mm256_fmadd_ps(al, c01, _mm256_loadu_ps(C + 0 * ldc + 8)));
    _mm256_storeu_ps(C + 1 * ldc, _mm256_fmadd_ps(al, c10, _mm256_loadu_ps(C + 1 * ldc)));
    _mm256_storeu_ps(C + 1 * ldc + 8, _mm256_fmadd_ps(al, c11, _mm256_loadu_ps(C + 1 * ldc + 8)));
}
LK_AVX2_TARGET static void gemm_tile3(int64_t K, float alpha, const float *A, int64_t lda,
                                        const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00; __m256 c10 = _mm256_setzero_ps(), c11 = c10; __m256 c20 = _mm256_setzero_ps(), c21 = c20;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(A + 0 * lda + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(A + 1 * lda + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(A + 2 * lda + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    }
    const __m256 al = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(C + 0 * ldc, _mm256_fmadd_ps(al, c00, _mm256_loadu_ps(C + 0 * ldc)));
    _mm256_storeu_ps(C + 0 * ldc + 8, _mm256_fmadd_ps(al, c01, _mm256_loadu_ps(C + 0 * ldc + 8)));
    _mm256_storeu_ps(C + 1 * ldc, _mm256_fmadd_ps(al, c10, _mm256_loadu_ps(C + 1 * ldc)));
    _mm256_storeu_ps(C + 1 * ldc + 8, _mm256_fmadd_ps(al, c11, _mm256_loadu_ps(C + 1 * ldc + 8)));
    _mm256_storeu_ps(C + 2 * ldc, _mm256_fmadd_ps(al, c20, _mm256_loadu_ps(C + 2 * ldc)));
    _mm256_storeu_ps(C + 2 * ldc + 8, _mm256_fmadd_ps(al, c21, _mm256_loadu_ps(C + 2 * ldc + 8)));
}
LK_AVX2_TARGET static void gemm_tile4(int64_t K, float alpha, const float *A, int64_t lda,
                                        const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00; __m256 c10 = _mm256_setzero_ps(), c11 = c10; __m256 c20 = _mm256_setzero_ps(), c21 = c20; __m256 c30 = _mm256_setzero_ps(), c31 = c30;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(A + 0 * lda + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(A + 1 * lda + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(A + 2 * lda + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(A + 3 * lda + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    }
    const __m256 al = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(C + 0 * ldc, _mm256_fmadd_ps(al, c00, _mm256_loadu_ps(C + 0 * ldc)));
    _mm256_storeu_ps(C + 0 * ldc + 8, _mm256_fmadd_ps(al, c01, _mm256_loadu_ps(C + 0 * ldc + 8)));
    _mm256_storeu_ps(C + 1 * ldc, _mm256_fmadd_ps(al, c10, _mm256_loadu_ps(C + 1 * ldc)));
    _mm256_storeu_ps(C + 1 * ldc + 8, _mm256_fmadd_ps(al, c11, _mm256_loadu_ps(C + 1 * ldc + 8)));
    _mm256_storeu_ps(C + 2 * ldc, _mm256_fmadd_ps(al, c20, _mm256_loadu_ps(C + 2 * ldc)));
    _mm256_storeu_ps(C + 2 * ldc + 8, _mm256_fmadd_ps(al, c21, _mm256_loadu_ps(C + 2 * ldc + 8)));
    _mm256_storeu_ps(C + 3 * ldc, _mm256_fmadd_ps(al, c30, _mm256_loadu_ps(C + 3 * ldc)));
    _mm256_storeu_ps(C + 3 * ldc + 8, _mm256_fmadd_ps(al, c31, _mm256_loadu_ps(C + 3 * ldc + 8)));
}
LK_AVX2_TARGET static void gemm_tile6(int64_t K, float alpha, const float *A, int64_t lda,
                                        const float *B, int64_t ldb, float *C, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00; __m256 c10 = _mm256_setzero_ps(), c11 = c10; __m256 c20 = _mm256_setzero_ps(), c21 = c20; __m256 c30 = _mm256_setzero_ps(), c31 = c30; __m256 c40 = _mm256_setzero_ps(), c41 = c40; __m256 c50 = _mm256_setzero_ps(), c51 = c50;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
        __m256 a;
        a = _mm256_broadcast_ss(A + 0 * lda + k); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(A + 1 * lda + k); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(A + 2 * lda + k); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(A + 3 * lda + k); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(A + 4 * lda + k); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(A + 5 * lda + k); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    const __m256 al = _mm256_set1_ps(alpha);
    _mm256_storeu_ps(C + 0 * ldc, _mm256_fmadd_ps(al, c00, _mm256_loadu_ps(C + 0 * ldc)));
    _mm256_storeu_ps(C + 0 * ldc + 8, _mm256_fmadd_ps(al, c01, _mm256_loadu_ps(C + 0 * ldc + 8)));
    _mm256_storeu_ps(C + 1 * ldc, _mm256_fmadd_ps(al, c10, _mm256_loadu_ps(C + 1 * ldc)));
    _mm256_storeu_ps(C + 1 * ldc + 8, _mm256_fmadd_ps(al, c11, _mm256_loadu_ps(C + 1 * ldc + 8)));
    _mm256_storeu_ps(C + 2 * ldc, _mm256_fmadd_ps(al, c20, _mm256_loadu_ps(C + 2 * ldc)));
    _mm256_storeu_ps(C + 2 * ldc + 8, _mm256_fmadd_ps(al, c21, _mm256_loadu_ps(C + 2 * ldc + 8)));
    _mm256_storeu_ps(C + 3 * ldc, _mm256_fmadd_ps(al, c30, _mm256_loadu_ps(C + 3 * ldc)));
    _mm256_storeu_ps(C + 3 * ldc + 8, _mm256_fmadd_ps(al, c31, _mm256_loadu_ps(C + 3 * ldc + 8)));
    _mm256_storeu_ps(C + 4 * ldc, _mm256_fmadd_ps(al, c40, _mm256_loadu_ps(C + 4 * ldc)));
    _mm256_storeu_ps(C + 4 * ldc + 8, _mm256_fmadd_ps(al, c41, _mm256_loadu_ps(C + 4 * ldc + 8)));
    _mm256_storeu_ps(C + 5 * ldc, _mm256_fmadd_ps(al, c50, _mm256_loadu_ps(C + 5 * ldc)));
    _mm256_storeu_ps(C + 5 * ldc + 8, _mm256_fmadd_ps(al, c51, _mm256_loadu_ps(C + 5 * ldc + 8)));
}

LK_AVX2_TARGET static void gemm_avx2(int64_t M, int64_t N, int64_t K, float alpha,
                                     const float *A, int64_t lda, const float *B, int64_t ldb,
                                     float *C, int64_t ldc) {
    const int64_t N16 = N / 16 * 16;
    for (int64_t j = 0; j < N16; j += 16) {
        int64_t i = 0;
        for (; i + 6 <= M; i += 6) gemm_tile6(K, alpha, A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc);
        const float *Ai = A + i * lda;
        float *Ci = C + i * ldc + j;
        switch (M - i) {
        case 5: gemm_tile4(K, alpha, Ai, lda, B + j, ldb, Ci, ldc);
                gemm_tile1(K, alpha, Ai + 4 * lda, lda, B + j, ldb, Ci + 4 * ldc, ldc); break;
        case 4: gemm_tile4(K, alpha, Ai, lda, B + j, ldb, Ci, ldc); break;
        case 3: gemm_tile3(K, alpha, Ai, lda, B + j, ldb, Ci, ldc); break;
        case 2: gemm_tile2(K, alpha, Ai, lda, B + j, ldb, Ci, ldc); break;
        case 1: gemm_tile1(K, alpha, Ai, lda, B + j, ldb, Ci, ldc); break;
        default: break;
        }
    }
    if (N16 < N) gemm_generic(M, N - N16, K, alpha, A, lda, B + N16, ldb, C + N16, ldc);
}
#endif

/* One (sequence, value head), `chunk` tokens at a time (the UT transform of FLA and
   transformers). Within a chunk of n tokens, with gc the cumulative log decay,
   A[i][m] = beta_i (k_i . k_m) exp(gc_i - gc_m) for m < i and T = (I + A)^-1:
     U = T (beta v),  W = T (beta exp(gc) k),  vn = U - W S,
     o = (exp(gc) q) S + P vn   with P[i][m] = (q_i . k_m) exp(gc_i - gc_m) for m <= i,
     S = exp(gc_n) S + K'^T vn  with K'[m] = exp(gc_n - gc_m) k_m
   which equals the recurrence step by step (tests check it); the products are small
   GEMMs, so prefill runs at arithmetic speed instead of the state's memory speed. */
#define LK_GDR_MAXCHUNK 256

static void exp_row_generic(float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = expf(x[i]);
}
#if LK_X86
LK_AVX2_TARGET static void exp_row_avx2(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, lk_exp8_avx2(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) x[i] = expf(x[i]);
}
#endif

INLINE void chunked_body(const gdr_job *j, int64_t b, int64_t h, float *scr, gemm_fn gemm,
                         void (*exp_row)(float *, int64_t)) {
    const int64_t Dk = j->Dk, Dv = j->Dv, Hv = j->Hv, hk = h / (Hv / j->Hk), C = j->chunk;
    const int64_t ldo = Hv * Dv;
    float *S = j->state + (b * Hv + h) * Dk * Dv;
    float *Q = scr, *Kc = Q + C * Dk, *Kb = Kc + C * Dk, *W = Kb + C * Dk, *Vb = W + C * Dk;
    float *U = Vb + C * Dv, *Tm = U + C * Dv, *P = Tm + C * C, *Kt = P + C * C;
    float *gc = Kt + Dk * C, *bt = gc + C;
    const float qscale = 1.0f / sqrtf((float)Dk);
    for (int64_t t0 = 0; t0 < j->T; t0 += C) {
        const int64_t n = j->T - t0 < C ? j->T - t0 : C;
        float cum = 0;
        for (int64_t i = 0; i < n; i++) {
            const int64_t t = t0 + i, row = b * j->sb + t * j->st;
            l2norm_body(j->q + row + hk * Dk, Dk, qscale, Q + i * Dk);
            l2norm_body(j->k + row + hk * Dk, Dk, 1.0f, Kc + i * Dk);
            cum += j->g[(b * j->T + t) * Hv + h];
            gc[i] = cum;
            bt[i] = j->beta[(b * j->T + t) * Hv + h];
            const float *v = j->v + row + h * Dv;
            const float eb = bt[i] * expf(cum);
            for (int64_t c = 0; c < Dv; c++) Vb[i * Dv + c] = bt[i] * v[c];
            for (int64_t c = 0; c < Dk; c++) Kb[i * Dk + c] = eb * Kc[i * Dk + c];
        }
        /* the q.k and k.k scores as GEMMs against K^T (Kt holds it for now) */
        for (int64_t m = 0; m < n; m++)
            for (int64_t r = 0; r < Dk; r++) Kt[r * n + m] = Kc[m * Dk + r];
        for (int64_t x = 0; x < n * n; x++) P[x] = Tm[x] = 0;
        gemm(n, n, Dk, 1.0f, Q, Dk, Kt, n, P, n);       /* P = Q K^T */
        gemm(n, n, Dk, 1.0f, Kc, Dk, Kt, n, Tm, n);     /* A = K K^T (in T for now) */
        /* decay: P[i][m] *= exp(gc_i - gc_m) for m <= i, 0 above; A likewise times beta_i
           strictly below the diagonal, then T = (I + A)^-1 row by row in place:
           T_i = e_i - sum_{m<i} A[i][m] T_m (T_m only has columns <= m) */
        for (int64_t i = 0; i < n; i++) {
            float *Pi = P + i * n, *Ti = Tm + i * n, *dec = gc + 2 * C;
            for (int64_t m = 0; m <= i; m++) dec[m] = gc[i] - gc[m];
            exp_row(dec, i + 1);
            for (int64_t m = 0; m <= i; m++) Pi[m] *= dec[m];
            for (int64_t m = i + 1; m < n; m++) Pi[m] = 0;
            float arow[LK_GDR_MAXCHUNK];
            for (int64_t m = 0; m < i; m++) arow[m] = bt[i] * Ti[m] * dec[m];
            for (int64_t m = 0; m < n; m++) Ti[m] = m == i ? 1.0f : 0.0f;
            for (int64_t m = 0; m < i; m++) axpy_body(Ti, -arow[m], Tm + m * n, m + 1);
        }
        for (int64_t x = 0; x < n * Dv; x++) U[x] = 0;
        for (int64_t x = 0; x < n * Dk; x++) W[x] = 0;
        gemm(n, Dv, n, 1.0f, Tm, n, Vb, Dv, U, Dv);     /* U = T (beta v) */
        gemm(n, Dk, n, 1.0f, Tm, n, Kb, Dk, W, Dk);     /* W = T (beta exp(gc) k) */
        gemm(n, Dv, Dk, -1.0f, W, Dk, S, Dv, U, Dv);    /* vn = U - W S (into U) */
        float *O = j->out + (b * j->T + t0) * ldo + h * Dv;
        for (int64_t i = 0; i < n; i++) {
            const float eg = expf(gc[i]);
            for (int64_t c = 0; c < Dk; c++) Q[i * Dk + c] *= eg;
            for (int64_t c = 0; c < Dv; c++) O[i * ldo + c] = 0;
        }
        gemm(n, Dv, Dk, 1.0f, Q, Dk, S, Dv, O, ldo);    /* o = (exp(gc) q) S */
        gemm(n, Dv, n, 1.0f, P, n, U, Dv, O, ldo);      /*   + P vn */
        const float last = gc[n - 1], en = expf(last);
        for (int64_t m = 0; m < n; m++) {
            const float e = expf(last - gc[m]);
            for (int64_t r = 0; r < Dk; r++) Kt[r * n + m] = e * Kc[m * Dk + r];
        }
        for (int64_t x = 0; x < Dk * Dv; x++) S[x] *= en;
        gemm(Dk, Dv, n, 1.0f, Kt, n, U, Dv, S, Dv);     /* S = exp(gc_n) S + K'^T vn */
    }
}

static void recurrent_generic(const gdr_job *j, int64_t b, int64_t h, float *S, float *s) {
    recurrent_body(j, b, h, S, s);
}

#if LK_X86
/* The AVX2 recurrence (Dv a multiple of 32): the read pass keeps kv and S^T q for 32
   columns in eight registers while it walks all Dk rows, instead of reloading and storing
   two accumulator rows per state row. */
LK_AVX2_TARGET static void recurrent_step_avx2(const gdr_job *j, int64_t b, int64_t h,
                                               float *S, float *scr) {
    const int64_t Dk = j->Dk, Dv = j->Dv, Hv = j->Hv, hk = h / (Hv / j->Hk);
    float *qn = scr, *kn = qn + Dk, *delta = kn + Dk;
    const float qscale = 1.0f / sqrtf((float)Dk);
    for (int64_t t = 0; t < j->T; t++) {
        const int64_t row = b * j->sb + t * j->st;
        l2norm_body(j->q + row + hk * Dk, Dk, qscale, qn);
        l2norm_body(j->k + row + hk * Dk, Dk, 1.0f, kn);
        const float *v = j->v + row + h * Dv;
        const float decay = expf(j->g[(b * j->T + t) * Hv + h]);
        const float beta = j->beta[(b * j->T + t) * Hv + h];
        const float kq = dot_body(kn, qn, Dk);
        float *o = j->out + ((b * j->T + t) * Hv + h) * Dv;
        const __m256 vd = _mm256_set1_ps(decay), vb = _mm256_set1_ps(beta),
                     vkq = _mm256_set1_ps(kq);
        for (int64_t c = 0; c < Dv; c += 32) {
            __m256 k0 = _mm256_setzero_ps(), k1 = k0, k2 = k0, k3 = k0;
            __m256 q0 = k0, q1 = k0, q2 = k0, q3 = k0;
            const float *Sc = S + c;
            for (int64_t i = 0; i < Dk; i++, Sc += Dv) {
                const __m256 ki = _mm256_broadcast_ss(kn + i), qi = _mm256_broadcast_ss(qn + i);
                const __m256 s0 = _mm256_loadu_ps(Sc), s1 = _mm256_loadu_ps(Sc + 8);
                const __m256 s2 = _mm256_loadu_ps(Sc + 16), s3 = _mm256_loadu_ps(Sc + 24);
                k0 = _mm256_fmadd_ps(ki, s0, k0); q0 = _mm256_fmadd_ps(qi, s0, q0);
                k1 = _mm256_fmadd_ps(ki, s1, k1); q1 = _mm256_fmadd_ps(qi, s1, q1);
                k2 = _mm256_fmadd_ps(ki, s2, k2); q2 = _mm256_fmadd_ps(qi, s2, q2);
                k3 = _mm256_fmadd_ps(ki, s3, k3); q3 = _mm256_fmadd_ps(qi, s3, q3);
            }
            /* delta = beta (v - d kv);  o = d qs + (k . q) delta */
#define LK_DELTA_OUT(kk, qq, off)                                                        \
            {                                                                           \
                __m256 dl = _mm256_mul_ps(vb, _mm256_fnmadd_ps(vd, kk,                  \
                                                  _mm256_loadu_ps(v + c + off)));       \
                _mm256_storeu_ps(delta + c + off, dl);                                  \
                _mm256_storeu_ps(o + c + off, _mm256_fmadd_ps(vkq, dl, _mm256_mul_ps(vd, qq))); \
            }
            LK_DELTA_OUT(k0, q0, 0) LK_DELTA_OUT(k1, q1, 8)
            LK_DELTA_OUT(k2, q2, 16) LK_DELTA_OUT(k3, q3, 24)
#undef LK_DELTA_OUT
        }
        /* S = d S + k delta^T */
        for (int64_t i = 0; i < Dk; i++) {
            float *Si = S + i * Dv;
            const __m256 ki = _mm256_broadcast_ss(kn + i);
            for (int64_t c = 0; c < Dv; c += 8)
                _mm256_storeu_ps(Si + c, _mm256_fmadd_ps(ki, _mm256_loadu_ps(delta + c),
                                                         _mm256_mul_ps(vd, _mm256_loadu_ps(Si + c))));
        }
    }
}
#endif
static void chunked_generic(const gdr_job *j, int64_t b, int64_t h, float *s) {
    chunked_body(j, b, h, s, gemm_generic, exp_row_generic);
}
#if LK_X86
LK_AVX2_TARGET static void recurrent_avx2(const gdr_job *j, int64_t b, int64_t h, float *S,
                                          float *s) {
    recurrent_body(j, b, h, S, s);
}
LK_AVX2_TARGET static void chunked_avx2(const gdr_job *j, int64_t b, int64_t h, float *s) {
    chunked_body(j, b, h, s, gemm_avx2, exp_row_avx2);
}
#endif

static void gdr_unit(const gdr_job *j, int64_t unit, float *scr) {
    const int64_t b = unit / j->Hv, h = unit % j->Hv, n = j->Dk * j->Dv;
    float *S = j->state + (b * j->Hv + h) * n;
    if (j->ahead) { /* the same operations on a copy: the caller's state stays as it was */
        float *copy = scr + scratch_base(j);
        memcpy(copy, S, (size_t)n * sizeof(float));
        S = copy;
    }
#if LK_X86
    if (use_avx2()) {
        if (j->chunk > 0) chunked_avx2(j, b, h, scr);
        else if (j->Dv % 32 == 0) recurrent_step_avx2(j, b, h, S, scr);
        else recurrent_avx2(j, b, h, S, scr);
        return;
    }
#endif
    if (j->chunk > 0) chunked_generic(j, b, h, scr);
    else recurrent_generic(j, b, h, S, scr);
}

/* Strongly decaying heads drive exp(cumulative decay), and the products it scales, through
   the subnormal range, where every x86 floating-point op takes a microcode assist: a
   512-token prefill of the 0.8B random checkpoint (decays of -0.5 .. -11 per token) spent
   68 ms per layer here instead of 10. So the delta rule runs with subnormals flushed to
   zero (FTZ and DAZ, on this thread, restored after): it only drops magnitudes below
   1.2e-38, in states read against unit-norm keys. Every caller (prefill, decode, batched,
   paged) takes this path, so results stay consistent between them. */
static void gdr_task(void *ctx, int64_t unit, int ith) {
    const gdr_job *j = (const gdr_job *)ctx;
    float *scr = (float *)lk_scratch(ith, scratch_floats(j) * sizeof(float));
    if (!scr) return; /* out of memory: the caller sees the state untouched for this head */
#if LK_X86
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u); /* FTZ (bit 15) | DAZ (bit 6) */
    gdr_unit(j, unit, scr);
    _mm_setcsr(csr);
#else
    gdr_unit(j, unit, scr);
#endif
}

int lk_gated_delta_rule(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                        int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int64_t sb, int64_t st,
                        const float *g, const float *beta, float *state, int64_t chunk,
                        float *out) {
    if (B < 0 || T < 0 || Hk < 1 || Hv < 1 || Hv % Hk || Dk < 1 || Dv < 1 || chunk < 0 ||
        chunk > LK_GDR_MAXCHUNK)
        return -1;
    if (B == 0 || T == 0) return 0;
    gdr_job j = {q, k, v, B, T, Hk, Hv, Dk, Dv, sb, st, g, beta, state, out, chunk, 0};
    lk_lock();
    lk_parallel(gdr_task, &j, B * Hv);
    lk_unlock();
    return 0;
}

int lk_gated_delta_rule_ahead(const float *q, const float *k, const float *v, int64_t B,
                              int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                              int64_t sb, int64_t st, const float *g, const float *beta,
                              const float *state, float *out) {
    if (B < 0 || T < 0 || Hk < 1 || Hv < 1 || Hv % Hk || Dk < 1 || Dv < 1) return -1;
    if (B == 0 || T == 0) return 0;
    /* the token-by-token form: each token's bits are a decode step's; the state is only
       read (the job's pointer is not const because the in-place form writes through it) */
    gdr_job j = {q, k, v, B, T, Hk, Hv, Dk, Dv, sb, st, g, beta, (float *)state, out, 0, 1};
    lk_lock();
    lk_parallel(gdr_task, &j, B * Hv);
    lk_unlock();
    return 0;
}

/* ---- gated RMSNorm: out = x / sqrt(mean(x^2) + eps) * w * silu(z) -------------------- */

typedef struct {
    const float *x, *z, *w;
    int64_t D;
    float eps;
    float *out;
} gnorm_job;

static void gnorm_rows_generic(const gnorm_job *j, int64_t r0, int64_t r1) {
    const int64_t D = j->D;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D, *z = j->z + r * D;
        float *o = j->out + r * D;
        const float inv = 1.0f / sqrtf(dot_body(x, x, D) / (float)D + j->eps);
        for (int64_t i = 0; i < D; i++) o[i] = (x[i] * inv) * j->w[i] * (z[i] / (1.0f + expf(-z[i])));
    }
}

#if LK_X86
LK_AVX2_TARGET static void gnorm_rows_avx2(const gnorm_job *j, int64_t r0, int64_t r1) {
    const int64_t D = j->D;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = r0; r < r1; r++) {
        const float *x = j->x + r * D, *z = j->z + r * D;
        float *o = j->out + r * D;
        const float inv = 1.0f / sqrtf(dot_body(x, x, D) / (float)D + j->eps);
        const __m256 vi = _mm256_set1_ps(inv);
        int64_t i = 0;
        for (; i + 8 <= D; i += 8) {
            __m256 zv = _mm256_loadu_ps(z + i);
            __m256 e = lk_exp8_avx2(_mm256_xor_ps(zv, sign));
            __m256 s = _mm256_div_ps(zv, _mm256_add_ps(one, e));
            __m256 n = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi),
                                     _mm256_loadu_ps(j->w + i));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(n, s));
        }
        for (; i < D; i++) o[i] = (x[i] * inv) * j->w[i] * (z[i] / (1.0f + expf(-z[i])));
    }
}
#endif

static void gnorm_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
#if LK_X86
    if (use_avx2()) {
        gnorm_rows_avx2((const gnorm_job *)ctx, r0, r1);
        return;
    }
#endif
    gnorm_rows_generic((const gnorm_job *)ctx, r0, r1);
}

void lk_gated_rms_norm(const float *x, const float *z, int64_t rows, int64_t D,
                       const float *w, float eps, float *out) {
    lk_init();
    gnorm_job j = {x, z, w, D, eps, out};
    int64_t grain = 32768 / (D > 0 ? D : 1);
    lk_parallel_for(gnorm_range, &j, rows, grain < 1 ? 1 : grain);
}

/* ---- gates: sigmoid and softplus ------------------------------------------------------ */

/* A few dozen values per layer (beta, the decay, the attention gate): scalar, and the
   same code on every ISA, so the fused decode step and the per-kernel path agree. */
void lk_sigmoid(const float *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + expf(-x[i]));
}

void lk_softplus(const float *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        /* torch's threshold: x itself above 20 (NaN stays NaN) */
        out[i] = v > 20.0f ? v : log1pf(expf(v));
    }
}
