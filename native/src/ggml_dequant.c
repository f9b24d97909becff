/* ggml_dequant.c: GGUF block types to float32, the load path of a llama.cpp file whose
 * matrices lattice does not run as they are (Q4_K_M files: Q4_K, Q6_K and Q5_0 beside
 * Q8_0). The gguf package's numpy dequantizers took 7 of the 12.7 s that loading
 * Qwen2.5-Coder-0.5B's Q4_K_M file took (cProfile).
 *
 * Each type gives, bit for bit, the values gguf.quants gives (the test compares them on
 * random blocks): the same float32 operations in the same order, one rounding each. The
 * multiply and the add of the types with a minimum are separate statements, and this file
 * is compiled without contraction (below), so they never fuse into one FMA rounding.
 *
 * Block layouts (ggml-common.h; values of one block in order, d / m half precision):
 *   Q4_0 [d][16 B]             x = d * (q - 8)         q: low nibbles (values 0-15),
 *   Q4_1 [d][m][16 B]          x = d * q + m              then high nibbles (16-31)
 *   Q5_0 [d][qh u32][16 B]     x = d * (q - 16)        q's fifth bit: bit i of qh
 *   Q5_1 [d][m][qh u32][16 B]  x = d * q + m
 *   Q8_0 [d][32 x int8]        x = d * q
 *   Q4_K 256 values: [d][dmin][12 B of 6-bit scales and mins][128 B of nibbles]
 *        sub-block j (32 values): x = (d * sc_j) * q - (dmin * mn_j)
 *   Q5_K as Q4_K with [32 B of fifth bits] before the nibbles
 *   Q6_K 256 values: [128 B low nibbles][64 B 2-bit highs][16 int8 scales][d]
 *        x = (d * sc_(i/16)) * (q - 32)
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

#define LK_INTERNAL
#include "lattice_kernels.h"

#include <string.h>

/* ggml type ids (the GGUF tensor-info field) */
enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13,
       T_Q6_K = 14 };

static inline float half_at(const uint8_t *p) {
    return lk_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
}

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* values per block and bytes per block of a type; 0 when it is not one of ours */
static int block_shape(int type, int64_t *values, int64_t *bytes) {
    switch (type) {
    case T_Q4_0: *values = 32; *bytes = 18; return 1;
    case T_Q4_1: *values = 32; *bytes = 20; return 1;
    case T_Q5_0: *values = 32; *bytes = 22; return 1;
    case T_Q5_1: *values = 32; *bytes = 24; return 1;
    case T_Q8_0: *values = 32; *bytes = 34; return 1;
    case T_Q4_K: *values = 256; *bytes = 144; return 1;
    case T_Q5_K: *values = 256; *bytes = 176; return 1;
    case T_Q6_K: *values = 256; *bytes = 210; return 1;
    default: return 0;
    }
}

/* the 32-value types: codes (already offset for the symmetric ones) times d, plus m */
static void block32(int type, const uint8_t *b, float *y) {
    const float d = half_at(b);
    if (type == T_Q8_0) {
        for (int i = 0; i < 32; i++) y[i] = d * (float)(int8_t)b[2 + i];
        return;
    }
    const int with_min = type == T_Q4_1 || type == T_Q5_1;
    const float m = with_min ? half_at(b + 2) : 0.0f;
    const uint8_t *p = b + (with_min ? 4 : 2);
    uint32_t qh = 0;
    const int five = type == T_Q5_0 || type == T_Q5_1;
    if (five) {
        qh = u32_at(p);
        p += 4;
    }
    for (int i = 0; i < 32; i++) {
        int q = i < 16 ? p[i] & 0x0F : p[i - 16] >> 4;
        if (five) q |= (int)((qh >> i) & 1) << 4;
        if (with_min) {
            const float t = d * (float)q;
            y[i] = t + m;
        } else {
            y[i] = d * (float)(q - (five ? 16 : 8));
        }
    }
}

/* Q4_K / Q5_K's eight 6-bit scales and mins, packed in 12 bytes: bytes 0-3 hold scales
   0-3 (low 6 bits) and the high 2 bits of scales 4-7; bytes 4-7 the same for the mins;
   bytes 8-11 the low 4 bits of scale (low nibble) and min (high nibble) 4-7. */
static void scales_mins_k(const uint8_t *s, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
}

/* Q4_K and Q5_K: sub-block j (32 values) takes nibble half j % 2 of bytes 32 (j / 2) ..
   32 (j / 2) + 31, and (Q5_K) bit j of each of the 32 high-bit bytes */
static void block_k45(int type, const uint8_t *b, float *y) {
    const float d = half_at(b), dmin = half_at(b + 2);
    int sc[8], mn[8];
    scales_mins_k(b + 4, sc, mn);
    const uint8_t *qh = type == T_Q5_K ? b + 16 : NULL;
    const uint8_t *qs = b + (type == T_Q5_K ? 48 : 16);
    for (int j = 0; j < 8; j++) {
        const float dj = d * (float)sc[j], mj = dmin * (float)mn[j];
        const uint8_t *q = qs + 32 * (j / 2);
        const int shift = 4 * (j % 2);
        for (int i = 0; i < 32; i++) {
            int v = (q[i] >> shift) & 0x0F;
            if (qh) v |= ((qh[i] >> j) & 1) << 4;
            const float t = dj * (float)v;
            y[32 * j + i] = t - mj;
        }
    }
}

/* Q6_K: two halves of 128 values; in half h, value 32 g + i (g < 4) takes the low (g < 2)
   or high (g >= 2) nibble of low-bit byte 64 h + 32 (g % 2) + i and bits 2 g .. 2 g + 1 of
   high-bit byte 32 h + i */
static void block_q6k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = half_at(b + 208);
    for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++)
            for (int i = 0; i < 32; i++) {
                const int n = 128 * h + 32 * g + i;
                const int lo = (ql[64 * h + 32 * (g % 2) + i] >> (4 * (g / 2))) & 0x0F;
                const int hi = (qh[32 * h + i] >> (2 * g)) & 0x03;
                const float ds = d * (float)sc[n / 16];
                y[n] = ds * (float)((lo | hi << 4) - 32);
            }
}

typedef struct {
    lk_ggml_rows in;
    float *dst;
} dq_job;

#if LK_X86
/* ---- AVX2: the same float operations eight values at a time --------------------------
   Each value is still one int -> float conversion (exact), then the scalar code's multiply
   and, for the types with a minimum, its separate add or subtract (the pragma above keeps
   them from fusing here too): the same bits. A Q4_K_M file loads ~5x faster through these
   than through the scalar loops above (which the generic build keeps). */

/* 32 codes (bytes) -> y[0..31] = a * (float)(q - off), or (a * (float)q) + m when sub is 0
   and m is given: the caller's formula per type, spelled out by the flags */
LK_AVX2_TARGET static inline void codes_avx2(__m256i q, int off, float a0, float a1, int with_m,
                                             float m, int minus, float *y) {
    uint8_t c[32];
    _mm256_storeu_si256((__m256i *)c, q);
    const __m256i vo = _mm256_set1_epi32(off);
    for (int k = 0; k < 4; k++) {
        const __m256i qi = _mm256_sub_epi32(
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + 8 * k))), vo);
        const __m256 t = _mm256_mul_ps(_mm256_set1_ps(k < 2 ? a0 : a1), _mm256_cvtepi32_ps(qi));
        __m256 v = t;
        if (with_m)
            v = minus ? _mm256_sub_ps(t, _mm256_set1_ps(m)) : _mm256_add_ps(t, _mm256_set1_ps(m));
        _mm256_storeu_ps(y + 8 * k, v);
    }
}

/* bit i of bits -> 0x10 in byte i (the fifth bit of Q5_0 / Q5_1 value i) */
LK_AVX2_TARGET static inline __m256i fifth_bits_avx2(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)bits),
        _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
    const __m256i pick = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, pick), pick),
                            _mm256_set1_epi8(0x10));
}

LK_AVX2_TARGET static void block32_avx2(int type, const uint8_t *b, float *y) {
    const float d = half_at(b);
    if (type == T_Q8_0) {
        for (int k = 0; k < 4; k++)
            _mm256_storeu_ps(y + 8 * k, _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * k))))));
        return;
    }
    const int with_min = type == T_Q4_1 || type == T_Q5_1;
    const float m = with_min ? half_at(b + 2) : 0.0f;
    const uint8_t *p = b + (with_min ? 4 : 2);
    const int five = type == T_Q5_0 || type == T_Q5_1;
    uint32_t qh = 0;
    if (five) {
        qh = u32_at(p);
        p += 4;
    }
    const __m128i packed = _mm_loadu_si128((const __m128i *)p), low = _mm_set1_epi8(0x0F);
    __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low),
                                 _mm_and_si128(packed, low));
    if (five) q = _mm256_or_si256(q, fifth_bits_avx2(qh));
    codes_avx2(q, with_min ? 0 : (five ? 16 : 8), d, d, with_min, m, 0, y);
}

LK_AVX2_TARGET static void block_k45_avx2(int type, const uint8_t *b, float *y) {
    const float d = half_at(b), dmin = half_at(b + 2);
    int sc[8], mn[8];
    scales_mins_k(b + 4, sc, mn);
    const uint8_t *qh = type == T_Q5_K ? b + 16 : NULL;
    const uint8_t *qs = b + (type == T_Q5_K ? 48 : 16);
    const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m256i hb = qh ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const float dj = d * (float)sc[j], mj = dmin * (float)mn[j];
        __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * (j / 2)));
        if (j % 2) q = _mm256_srli_epi16(q, 4);
        q = _mm256_and_si256(q, low);
        if (qh) /* bit j of each high-bit byte (16-bit shifts, then one bit per byte) */
            q = _mm256_or_si256(q, _mm256_slli_epi16(
                _mm256_and_si256(_mm256_srl_epi16(hb, _mm_cvtsi32_si128(j)), one), 4));
        codes_avx2(q, 0, dj, dj, 1, mj, 1, y + 32 * j);
    }
}

LK_AVX2_TARGET static void block_q6k_avx2(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = half_at(b + 208);
    const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
    for (int h = 0; h < 2; h++) {
        const __m256i hv = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
        for (int g = 0; g < 4; g++) {
            __m256i lo = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32 * (g % 2)));
            if (g / 2) lo = _mm256_srli_epi16(lo, 4);
            lo = _mm256_and_si256(lo, low);
            const __m256i hi = _mm256_and_si256(_mm256_srl_epi16(hv, _mm_cvtsi32_si128(2 * g)), two);
            const int n = 128 * h + 32 * g;
            codes_avx2(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), 32, d * (float)sc[n / 16],
                       d * (float)sc[n / 16 + 1], 0, 0.0f, 0, y + n);
        }
    }
}
#endif

void lk_ggml_block_to_f32(int type, const uint8_t *blk, float *y) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        if (type == T_Q6_K) block_q6k_avx2(blk, y);
        else if (type == T_Q4_K || type == T_Q5_K) block_k45_avx2(type, blk, y);
        else block32_avx2(type, blk, y);
        return;
    }
#endif
    if (type == T_Q6_K) block_q6k(blk, y);
    else if (type == T_Q4_K || type == T_Q5_K) block_k45(type, blk, y);
    else block32(type, blk, y);
}

static void dq_range(void *ctx, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    const dq_job *j = (const dq_job *)ctx;
    const lk_ggml_rows *in = &j->in;
    const int64_t nb = in->K / in->block_values;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = in->src + r * in->row_bytes;
        float *y = j->dst + r * in->K;
        for (int64_t b = 0; b < nb; b++)
            lk_ggml_block_to_f32(in->type, row + b * in->block_bytes, y + b * in->block_values);
    }
}

int lk_ggml_block_shape(int ggml_type, int64_t *block_values, int64_t *block_bytes) {
    return block_shape(ggml_type, block_values, block_bytes) ? 0 : -1;
}

int lk_dequantize_ggml(int ggml_type, const void *src, int64_t rows, int64_t K, float *dst) {
    int64_t values, bytes;
    if (!block_shape(ggml_type, &values, &bytes) || rows < 0 || K <= 0 || K % values)
        return -1;
    lk_init(); /* picks the AVX2 blocks where the CPU has them */
    dq_job j = {{ggml_type, (const uint8_t *)src, K, K / values * bytes, values, bytes}, dst};
    /* rows in chunks of >= 64k values: a thread wake-up per chunk is then noise */
    const int64_t grain = K >= 65536 ? 1 : 65536 / K;
    lk_parallel_for(dq_range, &j, rows, grain);
    return 0;
}
