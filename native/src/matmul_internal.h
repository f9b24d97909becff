/* matmul_internal.h: what the matmul sources share (private to native/src: neither
 * installed nor part of the binding or of the plugin ABI).
 *
 * The matmul is split by format and instruction set, one translation unit each:
 *   matmul.c               dispatch: job setup, row chunks, thread jobs, the q8_0 variant
 *                          choice, activation quantization, the lk_matmul_* entry points
 *   matmul_generic.c       scalar C for every format (the LATTICE_ISA=generic path)
 *   matmul_f_avx2.c        f32 / f16 with AVX2 / FMA / F16C: matvec, few rows, prefill tiles
 *   matmul_f_avx512.c      f32 / f16 few rows and prefill with 512-bit FMAs (same bits)
 *   matmul_float_x86.h     the AVX2 f32 tile kernels those two share (static inline)
 *   matmul_q8_0_x86.h      the q8_0 / q8_0_r16 kernels written once (static inline,
 *                          parameterised by Q8_NAME / Q8_TARGET / Q8_VNNI), compiled by
 *   matmul_q8_0_avx2.c     ... with madd + add (and the AVX2 activation quantizer),
 *   matmul_q8_0_avxvnni.c  ... with 256-bit vpdpwssd,
 *   matmul_q8_0_avx512vnni.c ... with vpdpwssd, 512-bit prefill
 *   weights.c              embedding lookup, q8_0 <-> q8_0_r16 conversion, q8_0 weight
 *                          quantization (per-format row utilities that are not matmuls)
 * The design notes (streaming, tiling, batch invariance) head matmul.c.
 *
 * Each kernel file exports its entry points as one lk_mm_kernels table (below); a row
 * kernel computes output rows [r0, r1) of one job on thread ith, and matmul.c picks one
 * per call and hands it row chunks.
 */
#ifndef LK_MATMUL_INTERNAL_H
#define LK_MATMUL_INTERNAL_H

#define LK_INTERNAL
#include "lattice_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { FMT_F32 = LK_FMT_F32, FMT_F16 = LK_FMT_F16, FMT_Q8_0 = LK_FMT_Q8_0,
       FMT_Q8_0_R16 = LK_FMT_Q8_0_R16 };

/* Prefill tiling: weight rows per chunk, and the K slice (values) kept in L1. */
#define PF_ROWS 64
#define PF_KSLICE 256
/* q8_0: weight rows per chunk, and the K slice (blocks) packed to int16 and kept in L1
   (32 x 16 blocks = 32 KiB; 8 blocks measured ~15% slower) */
#define PF_Q8_ROWS 32
#define PF_Q16_BLOCKS 16
/* few rows: K slice (blocks) packed at a time; short, so the loads of the next slice
   overlap the micro-kernel's arithmetic on this one (LATTICE_FEW_BLOCKS: tuning only) */
extern int lk_few_blocks; /* default 4 */

typedef struct matmul_job {
    const float *x;
    int64_t M, K;
    const uint8_t *w;
    int64_t ldw, N;
    float *y;
    const int16_t *xq; /* q8_0: x quantized to int16, [M, K] */
    const float *xd;   /* q8_0: its scales, [M, K/32] */
    int64_t chunk, nchunks;
    void (*rows)(const struct matmul_job *j, int64_t r0, int64_t r1, int ith);
    const lk_mm_hooks *hooks; /* post(hooks->ctx, hook_i, r0, r1) after each chunk */
    int hook_i;
} matmul_job;

static inline uint16_t rd16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* q8_0: activations are quantized per block of 32 to int16 with a float32 scale
   (amax / 32767), so the integer dot keeps ~15 bits of x (int8 activations cost 0.1
   perplexity on SmolLM2-135M). |sum of 32 products| <= 32 * 32767 * 128 fits int32.
   Within a block the int16 values are stored even-indexed first, then odd-indexed
   (q16_pos), so the SIMD kernels sign-extend a weight block's even and odd bytes
   with shifts (no cross-lane widening on the shuffle port). */
static inline int q16_pos(int i) { return (i & 1) ? 16 + (i >> 1) : i >> 1; }

/* The int16 scale of one block of activations; 0 for an (almost) all-zero block, so
   1 / d never overflows. */
static inline float q16_scale(float amax) { return amax < 1e-30f ? 0.0f : amax / 32767.0f; }

static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}


/* Up to this many x rows use the streaming (matvec-like) kernels: the weights are read
   once either way, and the streaming order keeps the prefetchers fed. */
#define FEW_ROWS 8
/* q8_0 from this many x rows packs each weight block once for all of them (few); below,
   each x row runs mv4 (packing cost more than it saved at M = 2) */
#define Q8_FEW_MIN 3
/* q8_0 keeps streaming up to this many rows. All linears of Qwen2.5-0.5B, 2 threads, ms
   (prefill tiles -> few rows): M = 9 71 -> 54, 16 84 -> 66, 32 129 -> 105, 64 198 -> 184,
   96 283 -> 276, 128 360 -> 363. A decode batch plus a prefill slice lives in this range
   (LATTICE_Q8_FEW_ROWS: tuning only) */
#ifndef Q8_FEW_ROWS_MAX
#define Q8_FEW_ROWS_MAX 128
#endif
extern int lk_q8_few_rows; /* default 64 */
/* decode chunks per thread and matrix (LATTICE_CHUNKS; tuning only) */
extern int lk_chunks_per_thread; /* default 4 */
extern int lk_f_pf512;     /* LATTICE_PF512=0: the AVX2 prefill for f32 / f16 with AVX-512 (A/B) */
static inline int64_t q8_few_rows(void) {
    return lk_q8_few_rows >= FEW_ROWS && lk_q8_few_rows <= Q8_FEW_ROWS_MAX ? lk_q8_few_rows : 64;
}

/* Tuning knobs (defined in matmul.c, set from the environment by runtime.c) */
/* Software prefetch distance for the matvec weight streams: 0 = the next group of four
   rows (best measured), 1..64 = that many rows ahead, > 64 = bytes ahead, < 0 = off.
   LATTICE_PF overrides it (tuning only). */
extern int lk_pf_dist; /* default 0 */
/* LATTICE_MV_QUARTERS=0: the four rows of mv4 adjacent (A/B; tuning only) */
extern int lk_mv_quarters; /* default 1 */

/* Output rows [r0, r1) of job j on thread ith (lk_scratch slot ith). */
typedef void (*lk_mm_rows_fn)(const matmul_job *j, int64_t r0, int64_t r1, int ith);

/* The kernels one file provides (NULL: not there), exported as a table while the functions
   themselves stay static: GCC then compiles them exactly as when they all lived in one
   file (external definitions changed the register allocation of the q8_0 decode loop's
   bookkeeping, +0.1..0.9% instructions). */
typedef struct {
    lk_mm_rows_fn f32, f16, q8_0, q8_0_r16;
    /* q8_0 activations: x [K] -> int16 q [K] and scales d [K / 32] (lk_quantize_row_q16_act) */
    void (*quantize_act)(const float *x, int64_t K, int16_t *q, float *d);
} lk_mm_kernels;

extern const lk_mm_kernels lk_mm_generic; /* matmul_generic.c: every format */
#if LK_X86
extern const lk_mm_kernels lk_mm_f_avx2;    /* matmul_f_avx2.c: f32, f16 */
extern const lk_mm_kernels lk_mm_f_few512;  /* matmul_f_avx512.c: f32, f16, 2..FEW_ROWS rows */
extern const lk_mm_kernels lk_mm_f_pf512;   /* matmul_f_avx512.c: f32, f16, prefill */
extern const lk_mm_kernels lk_mm_q8_avx2;   /* matmul_q8_0_avx2.c: q8_0, q8_0_r16, quantize_act */
extern const lk_mm_kernels lk_mm_q8_avxvnni;    /* matmul_q8_0_avxvnni.c: q8_0, q8_0_r16 */
extern const lk_mm_kernels lk_mm_q8_avx512vnni; /* matmul_q8_0_avx512vnni.c: q8_0, q8_0_r16 */

/* ---- AVX2 / FMA / F16C helpers shared by the x86 files ---------------------------- */

#define AVX2_INLINE LK_AVX2_TARGET __attribute__((always_inline)) static inline

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* [sum a0, sum a1, sum a2, sum a3] */
AVX2_INLINE __m128 hsum8x4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* Eight weights from row p at column k as f32 (fmt is a compile-time constant). */
AVX2_INLINE __m256 load_w8(const uint8_t *p, int64_t k, int fmt) {
    if (fmt == FMT_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * k)));
    return _mm256_loadu_ps((const float *)p + k);
}

AVX2_INLINE float load_w1(const uint8_t *p, int64_t k, int fmt) {
    if (fmt == FMT_F16) return _cvtsh_ss(rd16(p + 2 * k));
    return ((const float *)p)[k];
}

/* into L1: T1/T2 measured the same, NTA far worse */
AVX2_INLINE void pf_(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }

/* f32 / f16: every path (matvec, few rows, prefill tiles) computes a dot in the same
   order, so an output row has the same bits whatever M is (batched decode gives a request
   what it gets alone): per K slice of PF_KSLICE values, one 8-lane FMA accumulator over
   the slice's whole groups of 8, summed by the hsum8x4 tree, then the slice's last values
   (only the last slice has any) by scalar FMAs; slice sums are added to y in order. */

AVX2_INLINE float fma1(float a, float b, float c) {
    return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

/* hsum8x4's sum of one vector (the same tree) */
AVX2_INLINE float hsum8t(__m256 v) { return _mm_cvtss_f32(hsum8x4(v, v, v, v)); }

/* The software prefetch inside the row loops covers the next group of rows; the first
   group of a chunk has nobody ahead of it, so warm it up front. */
AVX2_INLINE void prefetch_rows(const uint8_t *w, int64_t bytes) {
    if (bytes > 16384) bytes = 16384;
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)w + o, _MM_HINT_T0);
}

AVX2_INLINE float f16s(const lk_block_q8_0 *b) { return _cvtsh_ss(rd16(&b->d)); }

#endif /* LK_X86 */

#endif /* LK_MATMUL_INTERNAL_H */
