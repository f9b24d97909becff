/* matmul_amx.c: y[M, N] = x[M, K] @ W[N, K]^T for float32 weights with AMX-BF16 (Intel
 * Sapphire Rapids and later), for the encoders' many-row passes (BERT-family embedders,
 * vision towers), where a float32 matmul is bound by the FMA ports (~60% of their peak
 * on two cores, 114 GMAC/s, against 0.5+ TMAC/s of bf16 tile products).
 *
 * bf16x3: each float is split into a bf16 high part and the bf16 of its remainder,
 * x = xh + xl and w = wh + wl (16 significant bits between them), and the products
 * xh wh + xh wl + xl wh are accumulated in float32 by TDPBF16PS; the dropped xl wl is
 * below 2^-16 of |x w|. Relative RMS error 4e-6 against float64 (float32 kernels: ~1e-7),
 * and all-MiniLM-L6-v2's embeddings stay within cosine 0.9999999 of float32's, where one
 * bf16 product (no split) falls to 0.99997. Not the float32 kernels' bits: a model opts in
 * per weight (an encoder has no decode rows whose bits must match its prefill's).
 *
 * Layout. W is packed once (lk_bf16x3_pack) into B tiles of 16 columns (weight rows) x
 * 32 values of K: 16 rows of VNNI pairs (tile row p holds values 2p, 2p + 1 of each
 * column), every high-part tile of all of W, then every low-part tile. x is split per call
 * into A tiles of 16 rows x 32 values (rows past M zero). One task is a pair of column
 * tiles (32 weight rows) against every 16-row tile of x, two x tiles at a time (amx_gemm);
 * x is walked in blocks of 256 rows so its tiles stay in L2.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if LK_X86
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_TARGET \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define AMX_MBLOCK 16 /* x tiles (of 16 rows) per block */

static int amx_ready = 0;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

/* The CPU has AMX-BF16 and AVX512-BF16, the kernels are not forced generic
   (LATTICE_ISA=generic) or switched off (LATTICE_AMX=0), and Linux grants this process the
   tile state (arch_prctl; without it the first tile instruction faults). */
static void amx_detect(void) {
    if (lk_init() != LK_ISA_AVX2) return;
    const char *env = getenv("LATTICE_AMX");
    if (env && strcmp(env, "0") == 0) return;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    if (!(d & (1u << 22)) || !(d & (1u << 24)) || !(b & (1u << 16)) || !(b & (1u << 30)))
        return; /* amx-bf16, amx-tile, avx512f, avx512bw */
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return; /* avx512bf16 */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return;
    amx_ready = 1;
}
#endif

int lk_amx_bf16x3_ready(void) {
#if LK_X86
    pthread_once(&amx_once, amx_detect);
    return amx_ready;
#else
    return 0;
#endif
}

static uint16_t bf16_rne(float f) { /* finite f: round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf16_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

int64_t lk_bf16x3_packed_size(int64_t N, int64_t K) { return 2 * N * K; }

int lk_bf16x3_pack(const float *w, int64_t N, int64_t K, uint16_t *out) {
    if (N <= 0 || K <= 0 || N % 32 || K % 32) return -1;
    const int64_t KT = K / 32;
    uint16_t *lo = out + N * K;
    for (int64_t nt = 0; nt < N / 16; nt++)
        for (int64_t kt = 0; kt < KT; kt++) {
            const int64_t t = (nt * KT + kt) * 512;
            for (int p = 0; p < 16; p++)
                for (int col = 0; col < 16; col++)
                    for (int e = 0; e < 2; e++) {
                        const float v = w[(nt * 16 + col) * K + kt * 32 + 2 * p + e];
                        const uint16_t h = bf16_rne(v);
                        out[t + p * 32 + col * 2 + e] = h;
                        lo[t + p * 32 + col * 2 + e] = bf16_rne(v - bf16_value(h));
                    }
        }
    return 0;
}

#if LK_X86
typedef struct {
    const float *x;
    const uint16_t *bh, *bl;
    uint16_t *ah, *al;
    int64_t M, K, N, MT, KT;
    float *y;
    int64_t nchunks, chunk; /* the column-tile pairs in nchunks chunks of `chunk` */
} amx_job;

typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_tilecfg;

/* x tiles [m0, m1): the high and low bf16 parts, 16 values at a time (rows past M zero) */
AMX_TARGET static void amx_split(void *ctx, int64_t m0, int64_t m1, int ith) {
    (void)ith;
    const amx_job *j = (const amx_job *)ctx;
    const int64_t K = j->K, KT = j->KT;
    for (int64_t mt = m0; mt < m1; mt++)
        for (int r = 0; r < 16; r++) {
            const int64_t m = mt * 16 + r;
            for (int64_t k = 0; k < K; k += 16) {
                const __m512 v = m < j->M ? _mm512_loadu_ps(j->x + m * K + k) : _mm512_setzero_ps();
                const __m256bh h = _mm512_cvtneps_pbh(v);
                const __m512 hv = _mm512_castsi512_ps(
                    _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
                const __m256bh l = _mm512_cvtneps_pbh(_mm512_sub_ps(v, hv));
                const int64_t at = (mt * KT + k / 32) * 512 + r * 32 + k % 32;
                _mm256_storeu_si256((__m256i *)(j->ah + at), (__m256i)h);
                _mm256_storeu_si256((__m256i *)(j->al + at), (__m256i)l);
            }
        }
}

/* tile t (a literal) into y's 16 x 16 block at row m of x: all of it, or its rows below M */
#define AMX_STORE(t, y, m)                                                             \
    do {                                                                               \
        if ((m) + 16 <= M) {                                                           \
            _tile_stored(t, y, N * 4);                                                 \
        } else {                                                                       \
            _tile_stored(t, part, 64);                                                 \
            for (int64_t r = 0; r < M - (m); r++) memcpy((y) + r * N, part + r * 16, 64); \
        }                                                                              \
    } while (0)

/* tasks [i0, i1): task i is block i / nchunks of AMX_MBLOCK x tiles (in L2 while it runs)
   against chunk i % nchunks of the column-tile pairs, two x tiles at a time (four C tiles;
   x's tiles come in an even count, the last one zero rows when needed;
   per 32 values of K the three products one after another, A and B tiles reloaded between
   them: 10 tile loads for 12 TDPBF16PS, where one x tile needs 6 for 6). Each C row sums
   xh wl, xl wh, xh wh of each K step in that order, so a row's result does not depend on
   the rows around it. */
AMX_TARGET static void amx_gemm(void *ctx, int64_t i0, int64_t i1, int ith) {
    (void)ith;
    const amx_job *j = (const amx_job *)ctx;
    const int64_t KT = j->KT, N = j->N, M = j->M;
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    float part[16 * 16] __attribute__((aligned(64)));
    for (int64_t i = i0; i < i1; i++) {
        const int64_t mb = i / j->nchunks * AMX_MBLOCK;
        const int64_t me = mb + AMX_MBLOCK < j->MT ? mb + AMX_MBLOCK : j->MT;
        const int64_t u0 = i % j->nchunks * j->chunk;
        const int64_t u1 = u0 + j->chunk < j->N / 32 ? u0 + j->chunk : j->N / 32;
        for (int64_t u = u0; u < u1; u++) {
            const int64_t nt = 2 * u;
            const uint16_t *b0h = j->bh + nt * KT * 512, *b1h = b0h + KT * 512;
            const uint16_t *b0l = j->bl + nt * KT * 512, *b1l = b0l + KT * 512;
            for (int64_t mt = mb; mt < me; mt += 2) {
                const uint16_t *a0h = j->ah + mt * KT * 512, *a1h = a0h + KT * 512;
                const uint16_t *a0l = j->al + mt * KT * 512, *a1l = a0l + KT * 512;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t kt = 0; kt < KT; kt++) {
                    const int64_t o = kt * 512;
                    _tile_loadd(4, a0h + o, 64);
                    _tile_loadd(5, a1h + o, 64);
                    _tile_loadd(6, b0l + o, 64);
                    _tile_loadd(7, b1l + o, 64);
                    _tile_dpbf16ps(0, 4, 6); /* xh wl */
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    _tile_loadd(4, a0l + o, 64);
                    _tile_loadd(5, a1l + o, 64);
                    _tile_loadd(6, b0h + o, 64);
                    _tile_loadd(7, b1h + o, 64);
                    _tile_dpbf16ps(0, 4, 6); /* xl wh */
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                    _tile_loadd(4, a0h + o, 64);
                    _tile_loadd(5, a1h + o, 64);
                    _tile_dpbf16ps(0, 4, 6); /* xh wh */
                    _tile_dpbf16ps(1, 4, 7);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
                float *y0 = j->y + mt * 16 * N + nt * 16, *y1 = y0 + 16 * N;
                AMX_STORE(0, y0, mt * 16);
                AMX_STORE(1, y0 + 16, mt * 16);
                AMX_STORE(2, y1, mt * 16 + 16);
                AMX_STORE(3, y1 + 16, mt * 16 + 16);
            }
        }
    }
    _tile_release();
}
#endif

#if LK_X86
/* x's split parts, per calling thread, grown on demand and kept: a fresh allocation per
   call (megabytes at a few hundred rows) page-faulted on every call */
static __thread void *split_buf;
static __thread size_t split_cap;

static uint16_t *split_scratch(size_t bytes) {
    return (uint16_t *)lk_thread_buffer(&split_buf, &split_cap, bytes);
}
#endif

int lk_matmul_bf16x3(const float *x, int64_t M, int64_t K, const uint16_t *packed, int64_t N,
                     float *y) {
    if (M <= 0) return 0;
    if (K <= 0 || N <= 0 || K % 32 || N % 32) return -1;
#if LK_X86
    if (!lk_amx_bf16x3_ready()) return -2;
    const int64_t MT = ((M + 15) / 16 + 1) & ~(int64_t)1; /* even: amx_gemm takes tile pairs */
    uint16_t *a = split_scratch((size_t)(MT * 16 * K * 2) * sizeof(uint16_t));
    if (!a) return -5;
    /* every thread a share of the columns of each block of x: x's tiles are read from L2
       once per chunk, and a chunk's weights (a thread's share) stay in its L2 */
    const int64_t units = N / 32, threads = lk_get_threads() > 0 ? lk_get_threads() : 1;
    const int64_t nchunks = units < threads ? units : threads;
    amx_job j = {x, packed, packed + N * K, a, a + MT * 16 * K, M, K, N, MT, K / 32, y,
                 nchunks, (units + nchunks - 1) / nchunks};
    lk_parallel_for(amx_split, &j, MT, 4);
    lk_parallel_for(amx_gemm, &j, (MT + AMX_MBLOCK - 1) / AMX_MBLOCK * nchunks, 1);
    return 0;
#else
    (void)x; (void)packed; (void)y;
    return -2;
#endif
}
