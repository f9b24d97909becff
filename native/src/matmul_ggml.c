/* matmul_ggml.c: y[M, N] = x[M, K] @ W^T for W stored in the GGUF block types of a
 * llama.cpp "K-quant" file (Q4_K, Q5_0, Q6_K: what a Q4_K_M file is made of), run from
 * the file's own bytes (the `gguf` quant method), as llama.cpp runs them: x is quantized to
 * int8 (per 256 values for Q4_K / Q6_K, like ggml's q8_K; per 32 for Q5_0, like q8_0), so
 * each block's dot is one vpmaddubsw of the weight codes (unsigned) and the int8 x, widened
 * by a vpmaddwd with the block's integer scale. On the CPUs this runs on a 2-vCPU VM shows
 * that decode is as much bound by multiplies per weight as by bytes, and int16 x (what the
 * q8_0 kernels use) needs twice the multiply instructions: a first version with int16 x
 * ran Qwen2.5-Coder-1.5B Q4_K_M at 9.5 tok/s against q8_0's 11.7.
 *
 * Exactness: integer sums are exact; the float side is fixed per lane (lane l of a block
 * covers values 4l .. 4l+3) and the same in the scalar path (fmaf), so every path gives
 * the same bits, whatever M is (batched decode gives a request what it gets alone):
 *   Q4_K  p_l = sum over the superblock's 8 blocks of sc_j * dot_l (int32), then
 *         acc_l = fma(p_l, d * dx, acc_l); mins: n_j = m_j * (sum of block j's x),
 *         mn_j = fma(n_j, dmin * dx, mn_j);   result hsum8(acc) - hsum8(mn)
 *   Q6_K  p_l = sum of sc * dot_l over the 8 blocks (codes 0..63), minus 32 * (sc_2l *
 *         xsum16_2l + sc_2l+1 * xsum16_2l+1); acc_l = fma(p_l, d * dx, acc_l)
 *   Q5_0  p_l = dot_l of the signed codes; acc_l = fma(p_l, d * dx_b, acc_l)
 * (hsum8 is matmul_internal.h's tree). Against the file's float values times float x the
 * error is x's int8 rounding, as in llama.cpp.
 *
 * Rows are independent: threads take chunks of output rows. Up to GG_MR x rows share
 * each unpacked weight block; more x rows (prefill) run in groups of GG_MR over a tile of
 * GG_TILE weight rows that stays in L1 / L2 while the groups pass over it.
 */
#include "matmul_internal.h"

enum { GG_Q5_0 = 6, GG_Q4_K = 12, GG_Q6_K = 14 };
#define GG_QK 32   /* values per activation block */
#define GG_QKK 256 /* values per K-quant superblock */
#define GG_MR 4    /* x rows per kernel call */
#define GG_TILE 32 /* weight rows per prefill tile */

/* Decode reads each chunk of weight rows as gg_streams interleaved streams, software-
   prefetched gg_pf_rows rows ahead. One plain stream without prefetch measured best on the
   2-vCPU Zen 3 host (Qwen2.5-Coder-1.5B Q4_K_M, `gguf`, alternated in one process: 17.2
   tok/s against 15.4 with 4 streams prefetched 4 rows ahead, whose prefetches stalled on
   full fill buffers); the knobs stay for other CPUs (LATTICE_GG_PF, LATTICE_GG_STREAMS,
   read once; tuning only). */
static int64_t gg_pf_rows = -1;
static int64_t gg_streams = 1;

static int gg_shape(int type, int64_t *values, int64_t *bytes) {
    switch (type) {
    case GG_Q5_0: *values = 32; *bytes = 22; return 1;
    case GG_Q4_K: *values = GG_QKK; *bytes = 144; return 1;
    case GG_Q6_K: *values = GG_QKK; *bytes = 210; return 1;
    default: return 0;
    }
}

static inline float gg_half(const uint8_t *p) { return lk_f16_to_f32(rd16(p)); }

/* Q4_K's eight 6-bit scales and mins from their 12 bytes (as ggml_dequant.c reads them) */
static inline void gg_scales_mins(const uint8_t *s, int sc[8], int mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
}

/* the hsum8 tree of matmul_internal.h on eight floats */
static inline float gg_hsum8(const float a[8]) {
    const float t0 = a[0] + a[4], t1 = a[1] + a[5], t2 = a[2] + a[6], t3 = a[3] + a[7];
    const float u0 = t0 + t2, u1 = t1 + t3;
    return u0 + u1;
}

/* What a kernel call sees: one weight row, up to GG_MR x rows. */
typedef struct {
    const int8_t *xq;   /* x rows, K int8 apart */
    const float *xd;    /* their scales (per 32 values for Q5_0, per 256 for the K-quants) */
    const int16_t *xs;  /* sums of each 16 int8 x, K / 16 apart */
    int64_t K, nb, nd;  /* nb: blocks of 32 per row; nd: scales per x row */
} gg_x;

/* ---- activations ---------------------------------------------------------------------- */

static inline float gg_scale8(float amax) { return amax < 1e-30f ? 0.0f : amax / 127.0f; }

/* One x row -> int8 with one float scale per `group` values (32 or 256): amax / 127,
   round half to even, clamped to +-127; then the sums of each 16 of them. */
static void gg_quant_row_generic(const float *x, int64_t K, int64_t group, int8_t *q, float *d) {
    for (int64_t g = 0; g < K / group; g++) {
        const float *v = x + g * group;
        float amax = 0;
        for (int64_t i = 0; i < group; i++) amax = fmaxf(amax, fabsf(v[i]));
        const float sc = gg_scale8(amax), id = sc != 0.0f ? 1.0f / sc : 0.0f;
        d[g] = sc;
        for (int64_t i = 0; i < group; i++) {
            const float t = nearbyintf(v[i] * id);
            q[g * group + i] = (int8_t)(t > 127.0f ? 127.0f : (t < -127.0f ? -127.0f : t));
        }
    }
}

#if LK_X86
LK_AVX2_TARGET static void gg_quant_row_avx2(const float *x, int64_t K, int64_t group, int8_t *q,
                                             float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lo = _mm256_set1_epi8(-127), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t g = 0; g < K / group; g++) {
        const float *v = x + g * group;
        __m256 m = _mm256_setzero_ps();
        for (int64_t i = 0; i < group; i += 8)
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(v + i), absmask));
        const float sc = gg_scale8(lk_hmax8_avx2(m)), id = sc != 0.0f ? 1.0f / sc : 0.0f;
        d[g] = sc;
        const __m256 vs = _mm256_set1_ps(id);
        for (int64_t b = 0; b < group; b += GG_QK) {
            const float *u = v + b;
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(u), vs));
            const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(u + 8), vs));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(u + 16), vs));
            const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(u + 24), vs));
            /* packs work per 128-bit lane: the dwords come back in order by `order` */
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            p = _mm256_max_epi8(_mm256_permutevar8x32_epi32(p, order), lo);
            _mm256_storeu_si256((__m256i *)(q + g * group + b), p);
        }
    }
}
#endif

/* ---- generic (scalar) ---------------------------------------------------------------- */

/* lanes of a block's integer dot: lane[l] += s * sum over t < 4 of code(4l+t) * x(4l+t),
   s the scale of the 16 values lane l is in (sl for lanes 0-3, sh for 4-7) */
static inline void gg_lanes(const int8_t *code, const int8_t *xv, int sl, int sh, int32_t lane[8]) {
    for (int l = 0; l < 8; l++) {
        int32_t s = 0;
        for (int t = 0; t < 4; t++) s += (int32_t)code[4 * l + t] * xv[4 * l + t];
        lane[l] += (l < 4 ? sl : sh) * s;
    }
}

/* Q6_K block b (0..7) of a superblock: its codes 0..63 */
static inline void gg_q6_k_codes(const uint8_t *blk, int b, int8_t code[32]) {
    const int h = b / 4, g = b % 4;
    for (int i = 0; i < 32; i++) {
        const int lo = (blk[64 * h + 32 * (g % 2) + i] >> (4 * (g / 2))) & 0x0F;
        const int hi = (blk[128 + 32 * h + i] >> (2 * g)) & 0x03;
        code[i] = (int8_t)(lo | hi << 4);
    }
}

static void gg_row_generic(int type, const uint8_t *w, const gg_x *x, int mr, float *out,
                           int64_t ldo) {
    for (int r = 0; r < mr; r++) {
        const int8_t *xq = x->xq + r * x->K;
        const float *xd = x->xd + r * x->nd;
        const int16_t *xs = x->xs + r * (x->K / 16);
        float acc[8] = {0}, mn[8] = {0};
        int8_t code[32];
        if (type == GG_Q5_0) {
            for (int64_t b = 0; b < x->nb; b++) {
                const uint8_t *blk = w + b * 22;
                uint32_t qh;
                memcpy(&qh, blk + 2, 4);
                for (int i = 0; i < 32; i++) {
                    const int q = (i < 16 ? blk[6 + i] & 0x0F : blk[6 + i - 16] >> 4) |
                                  (int)((qh >> i) & 1) << 4;
                    code[i] = (int8_t)(q - 16);
                }
                int32_t lane[8] = {0};
                gg_lanes(code, xq + b * GG_QK, 1, 1, lane);
                const float dd = gg_half(blk) * xd[b];
                for (int l = 0; l < 8; l++) acc[l] = fmaf((float)lane[l], dd, acc[l]);
            }
            out[r * ldo] = gg_hsum8(acc);
            continue;
        }
        for (int64_t sb = 0; sb < x->nb / 8; sb++) {
            int32_t lane[8] = {0};
            const int16_t *bs = xs + sb * 16;
            if (type == GG_Q4_K) {
                const uint8_t *blk = w + sb * 144;
                int sc[8], m[8];
                gg_scales_mins(blk + 4, sc, m);
                for (int j = 0; j < 8; j++) {
                    const uint8_t *q = blk + 16 + 32 * (j / 2);
                    for (int i = 0; i < 32; i++) code[i] = (int8_t)((q[i] >> (4 * (j % 2))) & 0x0F);
                    gg_lanes(code, xq + (sb * 8 + j) * GG_QK, sc[j], sc[j], lane);
                }
                const float dd = gg_half(blk) * xd[sb], dm = gg_half(blk + 2) * xd[sb];
                for (int l = 0; l < 8; l++) {
                    acc[l] = fmaf((float)lane[l], dd, acc[l]);
                    mn[l] = fmaf((float)(m[l] * (bs[2 * l] + bs[2 * l + 1])), dm, mn[l]);
                }
            } else { /* Q6_K */
                const uint8_t *blk = w + sb * 210;
                const int8_t *sc = (const int8_t *)(blk + 192);
                for (int b = 0; b < 8; b++) {
                    gg_q6_k_codes(blk, b, code);
                    gg_lanes(code, xq + (sb * 8 + b) * GG_QK, sc[2 * b], sc[2 * b + 1], lane);
                }
                const float dd = gg_half(blk + 208) * xd[sb];
                for (int l = 0; l < 8; l++) {
                    lane[l] -= 32 * (sc[2 * l] * bs[2 * l] + sc[2 * l + 1] * bs[2 * l + 1]);
                    acc[l] = fmaf((float)lane[l], dd, acc[l]);
                }
            }
        }
        out[r * ldo] = type == GG_Q4_K ? gg_hsum8(acc) - gg_hsum8(mn) : gg_hsum8(acc);
    }
}

/* ---- AVX2 ---------------------------------------------------------------------------- */
#if LK_X86

#define GG_LD(p) _mm256_loadu_si256((const __m256i *)(p))
/* keep an integer accumulator in its register as written: gcc 12 otherwise reassociates a
   chain of integer adds into trees and spills the products (ARCHITECTURE.md, Tests and
   CI); integer adds are exact, so the bits are the same either way */
#define GG_KEEP(v) __asm__("" : "+x"(v))

/* Q5_0: 32 bits -> 32 bytes, 0x10 where the bit is set */
AVX2_INLINE __m256i gg_bits_0x10(uint32_t qh) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

AVX2_INLINE void gg_q5_0_avx2(const uint8_t *w, const gg_x *x, int mr, float *out, int64_t ldo) {
    __m256 acc[GG_MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), c16 = _mm256_set1_epi8(16);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t b = 0; b < x->nb; b++) {
        const uint8_t *blk = w + b * 22;
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const __m128i qs = _mm_loadu_si128((const __m128i *)(blk + 6));
        __m256i c = _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs);
        c = _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(c, m4), gg_bits_0x10(qh)), c16);
        const __m256i ac = _mm256_sign_epi8(c, c); /* |code|; x takes the sign */
        const float d = _cvtsh_ss(rd16(blk));
        for (int r = 0; r < mr; r++) {
            const __m256i xv = GG_LD(x->xq + r * x->K + b * GG_QK);
            const __m256i p =
                _mm256_madd_epi16(_mm256_maddubs_epi16(ac, _mm256_sign_epi8(xv, c)), ones);
            const __m256 dd = _mm256_set1_ps(d * x->xd[r * x->nd + b]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dd, acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) out[r * ldo] = hsum8(acc[r]);
}

/* Q4_K's 12 scale bytes -> 16 bytes: the eight 6-bit scales, then the eight mins (the
   same values as gg_scales_mins, with 32-bit masks instead of 16 byte operations) */
static inline void gg_scales_mins_16(const uint8_t *s, uint8_t out[16]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;
    memcpy(out, u, 16);
}

AVX2_INLINE void gg_q4_k_avx2(const uint8_t *w, const gg_x *x, int mr, float *out, int64_t ldo) {
    __m256 acc[GG_MR], mn[GG_MR];
    for (int r = 0; r < mr; r++) acc[r] = mn[r] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    /* bytes 8..15 (the mins) each twice: one per 16-value sum of x */
    const __m128i dup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    for (int64_t sb = 0; sb < x->nb / 8; sb++) {
        const uint8_t *blk = w + sb * 144;
        uint8_t sm[16];
        gg_scales_mins_16(blk + 4, sm);
        const __m128i smv = _mm_loadu_si128((const __m128i *)sm);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(smv, dup));
        /* the scales as int16 in both 128-bit lanes: block j's is word j */
        const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(smv));
        __m256i p[GG_MR];
        for (int r = 0; r < mr; r++) p[r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i q = GG_LD(blk + 16 + 32 * c);
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            /* word j of sc in every word: bytes 2j, 2j + 1 */
            const short b0 = (short)(0x0100 + 0x0202 * 2 * c), b1 = (short)(b0 + 0x0202);
            const __m256i s0 = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(b0));
            const __m256i s1 = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(b1));
            const int8_t *xv = x->xq + (sb * 8 + 2 * c) * GG_QK;
            for (int r = 0; r < mr; r++) {
                const int8_t *xr = xv + r * x->K;
                const __m256i d0 = _mm256_maddubs_epi16(lo, GG_LD(xr));
                p[r] = _mm256_add_epi32(p[r], _mm256_madd_epi16(d0, s0));
                GG_KEEP(p[r]);
                const __m256i d1 = _mm256_maddubs_epi16(hi, GG_LD(xr + GG_QK));
                p[r] = _mm256_add_epi32(p[r], _mm256_madd_epi16(d1, s1));
                GG_KEEP(p[r]);
            }
        }
        const float d = _cvtsh_ss(rd16(blk)), dmin = _cvtsh_ss(rd16(blk + 2));
        for (int r = 0; r < mr; r++) {
            const float dx = x->xd[r * x->nd + sb];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p[r]), _mm256_set1_ps(d * dx), acc[r]);
            const __m256i n = _mm256_madd_epi16(mins, GG_LD(x->xs + r * (x->K / 16) + sb * 16));
            mn[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(n), _mm256_set1_ps(dmin * dx), mn[r]);
        }
    }
    for (int r = 0; r < mr; r++) out[r * ldo] = hsum8(acc[r]) - hsum8(mn[r]);
}

AVX2_INLINE void gg_q6_k_avx2(const uint8_t *w, const gg_x *x, int mr, float *out, int64_t ldo) {
    __m256 acc[GG_MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03);
    const __m256i m30 = _mm256_set1_epi8(0x30);
    for (int64_t sb = 0; sb < x->nb / 8; sb++) {
        const uint8_t *blk = w + sb * 210;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        __m256i p[GG_MR];
        for (int r = 0; r < mr; r++) p[r] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i a = GG_LD(blk + 64 * h), bq = GG_LD(blk + 64 * h + 32);
            const __m256i hb = GG_LD(blk + 128 + 32 * h);
            __m256i v[4];
            v[0] = _mm256_or_si256(_mm256_and_si256(a, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
            const __m256i hb2 = _mm256_srli_epi16(hb, 2);
            v[1] = _mm256_or_si256(_mm256_and_si256(bq, m4),
                                   _mm256_slli_epi16(_mm256_and_si256(hb2, m3), 4));
            v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                                   _mm256_and_si256(hb, m30));
            v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bq, 4), m4),
                                   _mm256_and_si256(hb2, m30));
            /* this half's eight scales (words 8h .. 8h+7 of sc16) in both 128-bit lanes;
               block g takes word 2g for its first 16 values, 2g+1 for the next */
            const __m256i sch = h ? _mm256_permute2x128_si256(sc16, sc16, 0x11)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x00);
            for (int g = 0; g < 4; g++) {
                const int b = 4 * h + g;
#define GG_W4(a) (char)(a), (char)((a) + 1), (char)(a), (char)((a) + 1), (char)(a), \
                  (char)((a) + 1), (char)(a), (char)((a) + 1)
                const __m256i scv = _mm256_shuffle_epi8(sch, _mm256_setr_epi8(
                    GG_W4(4 * g), GG_W4(4 * g), GG_W4(4 * g + 2), GG_W4(4 * g + 2)));
#undef GG_W4
                const int8_t *xv = x->xq + (sb * 8 + b) * GG_QK;
                for (int r = 0; r < mr; r++) {
                    p[r] = _mm256_add_epi32(p[r], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(v[g], GG_LD(xv + r * x->K)), scv));
                    GG_KEEP(p[r]);
                }
            }
        }
        /* the codes' offset: 32 * sum of scale x (sum of its 16 x) */
        const float d = _cvtsh_ss(rd16(blk + 208));
        for (int r = 0; r < mr; r++) {
            const __m256i off = _mm256_madd_epi16(sc16, GG_LD(x->xs + r * (x->K / 16) + sb * 16));
            const __m256i t = _mm256_sub_epi32(p[r], _mm256_slli_epi32(off, 5));
            const __m256 dd = _mm256_set1_ps(d * x->xd[r * x->nd + sb]);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), dd, acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) out[r * ldo] = hsum8(acc[r]);
}

/* one weight row against mr (1..GG_MR) x rows: the mr cases compile separately, so the
   accumulators stay in registers */
#define GG_AVX2_CASES(fn)                                                                    \
    switch (mr) {                                                                            \
    case 1: fn(w, x, 1, out, ldo); break;                                                    \
    case 2: fn(w, x, 2, out, ldo); break;                                                    \
    case 3: fn(w, x, 3, out, ldo); break;                                                    \
    default: fn(w, x, 4, out, ldo); break;                                                   \
    }

LK_AVX2_TARGET static void gg_row_avx2(int type, const uint8_t *w, const gg_x *x, int mr,
                                       float *out, int64_t ldo) {
    if (type == GG_Q4_K) GG_AVX2_CASES(gg_q4_k_avx2)
    else if (type == GG_Q6_K) GG_AVX2_CASES(gg_q6_k_avx2)
    else GG_AVX2_CASES(gg_q5_0_avx2)
}
#endif

/* ---- dispatch ------------------------------------------------------------------------ */

typedef struct {
    int type, avx2;
    const uint8_t *w;
    int64_t ldw, N, M, K, nb, chunk;
    const int8_t *xq;
    const float *xd;
    const int16_t *xs;
    int64_t nd;
    float *y;
} gg_job;

static void gg_rows(const gg_job *j, const uint8_t *w, int64_t m0, int mr, float *y) {
    const gg_x x = {j->xq + m0 * j->K, j->xd + m0 * j->nd, j->xs + m0 * (j->K / 16), j->K,
                    j->nb, j->nd};
#if LK_X86
    if (j->avx2) {
        gg_row_avx2(j->type, w, &x, mr, y, j->N);
        return;
    }
#endif
    gg_row_generic(j->type, w, &x, mr, y, j->N);
}

/* one weight row of the job for x rows [m, m + mr), prefetching `ahead` (NULL: none) */
static inline void gg_one(const gg_job *j, int64_t r, int64_t m, int mr, const uint8_t *ahead) {
#if LK_X86
    if (ahead)
        for (int64_t o = 0; o < j->ldw; o += 64) _mm_prefetch((const char *)ahead + o, _MM_HINT_T0);
#endif
    gg_rows(j, j->w + r * j->ldw, m, mr, j->y + m * j->N + r);
}

/* output rows [c * chunk, ...) for every x row */
static void gg_task(void *vctx, int64_t c, int ith) {
    (void)ith;
    const gg_job *j = (const gg_job *)vctx;
    const int64_t r0 = c * j->chunk, r1 = r0 + j->chunk < j->N ? r0 + j->chunk : j->N;
    if (j->M <= GG_MR) {
        /* decode: the chunk as gg_streams interleaved streams (see gg_streams) */
        const int64_t n = r1 - r0, q = (n + gg_streams - 1) / gg_streams;
        for (int64_t i = 0; i < q; i++)
            for (int s = 0; s < gg_streams; s++) {
                const int64_t r = r0 + s * q + i;
                if (r >= r1 || (s + 1 < gg_streams && r >= r0 + (s + 1) * q)) continue;
                const int64_t pr = r + gg_pf_rows;
                const uint8_t *ahead = j->avx2 && gg_pf_rows > 0 && pr < r0 + (s + 1) * q && pr < r1
                                       ? j->w + pr * j->ldw : NULL;
                gg_one(j, r, 0, (int)j->M, ahead);
            }
        return;
    }
    /* more x rows: a tile of weight rows stays hot while the groups of GG_MR pass over it */
    for (int64_t t0 = r0; t0 < r1; t0 += GG_TILE) {
        const int64_t t1 = t0 + GG_TILE < r1 ? t0 + GG_TILE : r1;
        for (int64_t m = 0; m < j->M; m += GG_MR) {
            const int mr = (int)(j->M - m < GG_MR ? j->M - m : GG_MR);
            for (int64_t r = t0; r < t1; r++) {
                const int ahead = m == 0 && j->avx2 && r + GG_TILE < j->N;
                gg_one(j, r, m, mr, ahead ? j->w + (r + GG_TILE) * j->ldw : NULL);
            }
        }
    }
}

typedef struct {
    const float *x;
    int64_t K, group;
    int8_t *xq;
    float *xd;
    int16_t *xs;
} gg_quant;

static void gg_quant_task(void *vctx, int64_t m, int ith) {
    (void)ith;
    const gg_quant *q = (const gg_quant *)vctx;
    const int64_t nd = q->K / q->group;
    int8_t *xq = q->xq + m * q->K;
    float *xd = q->xd + m * nd;
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) gg_quant_row_avx2(q->x + m * q->K, q->K, q->group, xq, xd);
    else
#endif
        gg_quant_row_generic(q->x + m * q->K, q->K, q->group, xq, xd);
    int16_t *xs = q->xs + m * (q->K / 16);
    for (int64_t b = 0; b < q->K / 16; b++) {
        int s = 0;
        for (int i = 0; i < 16; i++) s += xq[b * 16 + i];
        xs[b] = (int16_t)s;
    }
}

void lk_ggml_tune(int pf_rows, int streams) {
    if (pf_rows >= 0) gg_pf_rows = pf_rows;
    if (streams >= 1 && streams <= 16) gg_streams = streams;
}

/* several matrices' chunks as one parallel job */
typedef struct {
    gg_job *jobs;
    int n;
    int64_t first[LK_MATMUL_MULTI_MAX + 1]; /* first task of each job; first[n] = total */
} gg_multi;

static void gg_multi_task(void *vctx, int64_t c, int ith) {
    const gg_multi *g = (const gg_multi *)vctx;
    int i = 0;
    while (c >= g->first[i + 1]) i++;
    gg_task(&g->jobs[i], c - g->first[i], ith);
}

int lk_matmul_ggml_multi(int type, const float *x, int64_t M, int64_t K, int n,
                         const void *const *w, const int64_t *ldw, const int64_t *N,
                         float *const *y) {
    int64_t values, bytes;
    if (!gg_shape(type, &values, &bytes) || K <= 0 || K % values || M < 0 || n < 0 ||
        n > LK_MATMUL_MULTI_MAX)
        return -1;
    for (int i = 0; i < n; i++)
        if (N[i] < 0 || ldw[i] < K / values * bytes) return -1;
    if (M == 0 || n == 0) return 0;
    lk_init();
    if (gg_pf_rows < 0) { /* first call: the environment's tuning, once */
        const char *env = getenv("LATTICE_GG_PF");
        gg_pf_rows = env && atoi(env) >= 0 ? atoi(env) : 0;
        env = getenv("LATTICE_GG_STREAMS");
        if (env && atoi(env) >= 1 && atoi(env) <= 16) gg_streams = atoi(env);
    }
    lk_lock();
    const int64_t nb = K / GG_QK;
    /* x as int8 [M, K] (a multiple of 32 bytes per row), its scales float [M, K / values]
       and its sums int16 [M, K / 16], once for all n matrices */
    const size_t xbytes = (size_t)(M * K), dbytes = (size_t)(M * (K / values)) * 4;
    uint8_t *buf = (uint8_t *)lk_shared_scratch(xbytes + dbytes + (size_t)(M * (K / 16)) * 2);
    if (!buf) {
        lk_unlock();
        return -5;
    }
    /* the K-quants' x scales are per superblock, so a superblock's 8 block dots add up as
       integers; Q5_0 has a scale per block of 32 anyway */
    gg_quant q = {x, K, values, (int8_t *)buf, (float *)(buf + xbytes),
                  (int16_t *)(buf + xbytes + dbytes)};
    if (M == 1) gg_quant_task(&q, 0, 0);
    else lk_parallel(gg_quant_task, &q, M);
    const int nth = lk_threads_locked();
    gg_job jobs[LK_MATMUL_MULTI_MAX];
    gg_multi g = {jobs, 0, {0}};
    for (int i = 0; i < n; i++) {
        if (N[i] == 0) continue;
        gg_job *j = &jobs[g.n];
        *j = (gg_job){type, LK_X86 && lk_active_isa == LK_ISA_AVX2, (const uint8_t *)w[i], ldw[i],
                      N[i], M, K, nb, 0, q.xq, q.xd, q.xs, K / values, y[i]};
        if (M <= 2 * GG_MR) {
            /* streaming: a few chunks per thread, each at least ~64 KiB of weights */
            int64_t target = (int64_t)nth * lk_chunks_per_thread;
            const int64_t by_bytes = N[i] * ldw[i] / (64 * 1024);
            if (by_bytes < target) target = by_bytes > nth ? by_bytes : nth;
            j->chunk = (N[i] + target - 1) / target;
        } else { /* prefill: one tile per task, but at least a task per thread */
            const int64_t per = (N[i] + nth - 1) / nth;
            j->chunk = per < GG_TILE ? per : GG_TILE;
        }
        if (j->chunk < 1) j->chunk = 1;
        g.first[g.n + 1] = g.first[g.n] + (N[i] + j->chunk - 1) / j->chunk;
        g.n++;
    }
    if (g.n) lk_parallel(gg_multi_task, &g, g.first[g.n]);
    lk_unlock();
    return 0;
}

int lk_matmul_ggml(int type, const float *x, int64_t M, int64_t K, const void *w, int64_t ldw,
                   int64_t N, float *y) {
    return lk_matmul_ggml_multi(type, x, M, K, 1, &w, &ldw, &N, &y);
}

/* the ctx lk_matmul_ggml_extern reads: the type id, static for the life of the process */
static const int32_t gg_ctx_q5_0 = GG_Q5_0, gg_ctx_q4_k = GG_Q4_K, gg_ctx_q6_k = GG_Q6_K;

const void *lk_ggml_matmul_ctx(int type) {
    switch (type) {
    case GG_Q5_0: return &gg_ctx_q5_0;
    case GG_Q4_K: return &gg_ctx_q4_k;
    case GG_Q6_K: return &gg_ctx_q6_k;
    default: return NULL;
    }
}

int lk_ggml_ctx_type(const void *ctx) {
    return ctx == &gg_ctx_q5_0 || ctx == &gg_ctx_q4_k || ctx == &gg_ctx_q6_k ? *(const int32_t *)ctx
                                                                           : 0;
}

int lk_matmul_ggml_extern(const void *ctx, const float *x, int64_t M, int64_t K, const void *w,
                          int64_t ldw, int64_t N, float *y) {
    const int rc = lk_matmul_ggml(*(const int32_t *)ctx, x, M, K, w, ldw, N, y);
    return rc == -1 ? -2 : rc;
}

int lk_embed_ggml(int type, const void *w, int64_t ldw, int64_t rows, int64_t cols,
                  const int64_t *ids, int64_t n, float *out) {
    int64_t values, bytes;
    if (!gg_shape(type, &values, &bytes) || cols <= 0 || cols % values ||
        ldw < cols / values * bytes)
        return -1;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= rows) return -2;
    lk_init();
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = (const uint8_t *)w + ids[i] * ldw;
        for (int64_t b = 0; b < cols / values; b++)
            lk_ggml_block_to_f32(type, row + b * bytes, out + i * cols + b * values);
    }
    return 0;
}
