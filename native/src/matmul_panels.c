/* matmul_panels.c: y[M, N] = x[M, K] @ W[N, K]^T for float32 weights packed in column
 * panels, for the encoders' many-row passes (BERT-family embedders, vision towers) on
 * AVX2 CPUs.
 *
 * The float32 kernels of matmul_f_avx2.c reduce every output as 8 lanes along K then a
 * fixed tree, so that a decode row and a prefill row get the same bits; that costs
 * horizontal sums per output and tile, a real share of the work at an encoder's small K
 * (all-MiniLM-L6-v2: 384). An encoder has no decode rows, so here each output is an FMA
 * chain along K in a lane of its own (the outer-product form of BLAS kernels): a 6 x 16
 * tile of outputs lives in 12 registers while K streams by, with no reduction at all. The
 * chain does not depend on M or on the other rows, so a row's result is the same in any
 * batch. Not the float32 kernels' bits (a sum in another order): a model opts in per
 * weight. One Zen 3 core, the MiniLM and vision-tower shapes: 56-79 GFLOP/s against 48-69
 * for the float32 kernels and 51-88 for OpenBLAS (noisy VM; 1.1-1.3x on two threads).
 *
 * Layout. W is packed once (lk_f32_panels_pack) into panels of 16 weight rows: panel p
 * holds, for k = 0 .. K-1, the 16 values W[16p .. 16p + 15][k] (one 64-byte line per k).
 * x is copied per call into tiles of 6 rows with the 6 values of each k together (one
 * stream of broadcasts instead of six). One task is a group of PANELS_PER_TASK panels
 * against every tile of x, K in slices of KC values: a slice of the group's panels stays
 * in L2 while every tile passes over it, the tile's 6 x KC values in L1 across the group.
 * Each slice sums from zero and is added to the tile's earlier slices in y (blocked
 * summation: the error grows with KC + K / KC, not K; KC = 128 measured 3-6e-7 relative
 * against float64 at K = 384 .. 3072, against 1e-6 for one chain, at the same speed).
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdlib.h>
#include <string.h>

#define PANEL 16          /* weight rows per panel: two 8-lane vectors */
#define MR 6              /* x rows per tile: 12 accumulators + 2 weight vectors + 1 x */
#define KC 128            /* K values per slice */
#define PANELS_PER_TASK 4 /* 64 columns of y per task */

int64_t lk_f32_panels_size(int64_t N, int64_t K) {
    if (N <= 0 || K <= 0) return -1;
    return N * K;
}

int lk_f32_panels_pack(const float *w, int64_t N, int64_t K, float *out) {
    if (N <= 0 || K <= 0 || N % PANEL) return -1;
    for (int64_t p = 0; p < N / PANEL; p++) {
        float *dst = out + p * PANEL * K;
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < PANEL; j++) dst[k * PANEL + j] = w[(p * PANEL + j) * K + k];
    }
    return 0;
}

int lk_f32_panels_ready(void) {
#if LK_X86
    /* AVX2 CPUs without AVX-512: those with it run their float32 prefill on 512-bit
       kernels, against which this 256-bit one is not measured. LATTICE_PANELS=0: off */
    const char *env = getenv("LATTICE_PANELS");
    if (env && strcmp(env, "0") == 0) return 0;
    return lk_init() == LK_ISA_AVX2 && !(lk_cpu_features() & LK_CPU_AVX512F);
#else
    return 0;
#endif
}

typedef struct {
    const float *x, *w;
    float *y;
    int64_t M, K, N;
    float *xp; /* x in tiles of MR rows: tile t holds, for k = 0 .. K-1, its MR values */
} panels_job;

#if LK_X86
/* A tile of x (a [kc][MR], rows past mr repeating the last one; not stored) times one
   panel slice b [kc][16] -> the tile at y (row stride ldy); acc: added to the tile's
   earlier slices (the slice's own chain starts from zero: blocked summation, whose error
   grows with KC + K / KC instead of K). */
LK_AVX2_TARGET static void tile6x16(const float *a, const float *b, int64_t kc,
                                    float *y, int64_t ldy, int mr, int acc) {
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++, a += MR) {
        const __m256 b0 = _mm256_load_ps(b + k * PANEL), b1 = _mm256_load_ps(b + k * PANEL + 8);
        __m256 v = _mm256_broadcast_ss(a);
        c00 = _mm256_fmadd_ps(v, b0, c00); c01 = _mm256_fmadd_ps(v, b1, c01);
        v = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(v, b0, c10); c11 = _mm256_fmadd_ps(v, b1, c11);
        v = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(v, b0, c20); c21 = _mm256_fmadd_ps(v, b1, c21);
        v = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(v, b0, c30); c31 = _mm256_fmadd_ps(v, b1, c31);
        v = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(v, b0, c40); c41 = _mm256_fmadd_ps(v, b1, c41);
        v = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(v, b0, c50); c51 = _mm256_fmadd_ps(v, b1, c51);
    }
#define STORE_ROW(i, lo, hi)                                                             \
    if ((i) < mr) {                                                                      \
        float *r = y + (i) * ldy;                                                        \
        _mm256_storeu_ps(r, acc ? _mm256_add_ps(_mm256_loadu_ps(r), lo) : lo);           \
        _mm256_storeu_ps(r + 8, acc ? _mm256_add_ps(_mm256_loadu_ps(r + 8), hi) : hi);   \
    }
    STORE_ROW(0, c00, c01) STORE_ROW(1, c10, c11) STORE_ROW(2, c20, c21)
    STORE_ROW(3, c30, c31) STORE_ROW(4, c40, c41) STORE_ROW(5, c50, c51)
#undef STORE_ROW
}

/* Tiles [t0, t1) of x into xp (written in order: the six rows read side by side). */
static void pack_x_range(void *ctx, int64_t t0, int64_t t1, int ith) {
    (void)ith;
    const panels_job *j = (const panels_job *)ctx;
    const int64_t K = j->K;
    for (int64_t t = t0; t < t1; t++) {
        float *dst = j->xp + t * MR * K;
        const float *src[MR];
        for (int i = 0; i < MR; i++)
            src[i] = j->x + (t * MR + i < j->M ? t * MR + i : j->M - 1) * K;
        for (int64_t k = 0; k < K; k++, dst += MR)
            for (int i = 0; i < MR; i++) dst[i] = src[i][k];
    }
}

/* Tasks [t0, t1): groups of PANELS_PER_TASK panels against all of x. */
static void panels_range(void *ctx, int64_t t0, int64_t t1, int ith) {
    (void)ith;
    const panels_job *j = (const panels_job *)ctx;
    const int64_t panels = j->N / PANEL, K = j->K;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t p0 = t * PANELS_PER_TASK;
        const int64_t p1 = p0 + PANELS_PER_TASK < panels ? p0 + PANELS_PER_TASK : panels;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            for (int64_t m = 0; m < j->M; m += MR) {
                const int mr = j->M - m < MR ? (int)(j->M - m) : MR;
                const float *a = j->xp + m * K + k0 * MR;
                for (int64_t p = p0; p < p1; p++)
                    tile6x16(a, j->w + p * PANEL * K + k0 * PANEL, kc,
                             j->y + m * j->N + p * PANEL, j->N, mr, k0 > 0);
            }
        }
    }
}
#endif

#if LK_X86
/* x's tiles, per calling thread, grown on demand and kept (a fresh allocation per call
   would page-fault on every call) */
static __thread void *x_buf;
static __thread size_t x_cap;

static float *x_scratch(size_t bytes) { return (float *)lk_thread_buffer(&x_buf, &x_cap, bytes); }
#endif

int lk_matmul_f32_panels(const float *x, int64_t M, int64_t K, const float *packed, int64_t N,
                         float *y) {
    if (M <= 0) return 0;
    if (K <= 0 || N <= 0 || N % PANEL) return -1;
#if LK_X86
    if (!lk_f32_panels_ready()) return -2;
    if ((uintptr_t)packed % 32) return -1; /* the panels are read with aligned loads */
    const int64_t tiles = (M + MR - 1) / MR;
    float *xp = x_scratch((size_t)(tiles * MR * K) * sizeof(float));
    if (!xp) return -5;
    panels_job j = {x, packed, y, M, K, N, xp};
    lk_parallel_for(pack_x_range, &j, tiles, 8);
    const int64_t tasks = (N / PANEL + PANELS_PER_TASK - 1) / PANELS_PER_TASK;
    lk_parallel_for(panels_range, &j, tasks, 1);
    return 0;
#else
    (void)x; (void)packed; (void)y;
    return -2;
#endif
}
