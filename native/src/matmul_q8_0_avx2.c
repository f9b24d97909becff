/* matmul_q8_0_avx2.c: the q8_0 and q8_0_r16 kernels with AVX2 (vpmaddwd + add),
 * instantiated from matmul_q8_0_x86.h, and the AVX2 activation quantizer (x to int16 per
 * block of 32, bit for bit the generic one). */#include "matmul_internal.h"

#if LK_X86
/* Same arithmetic as quantize_act_generic (bit for bit: cvtps rounds half to even). */
LK_AVX2_TARGET static void quantize_act_avx2(const float *x, int64_t K, int16_t *q, float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < K / LK_QK8_0; b++) {
        const float *v = x + b * LK_QK8_0;
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
        __m256 v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                                 _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
        const float s = q16_scale(lk_hmax8_avx2(m));
        const float id = s != 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        const __m256 vs = _mm256_set1_ps(id);
        const __m256i lo = _mm256_set1_epi16(-32767);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vs));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vs));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vs));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vs));
        /* packs works per 128-bit lane: put the 64-bit quarters back in order */
        __m256i p0 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xD8); /* 0..15 */
        __m256i p1 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xD8); /* 16..31 */
        p0 = _mm256_max_epi16(p0, lo);
        p1 = _mm256_max_epi16(p1, lo);
        /* even values, then odd ones (q16_pos) */
        __m256i e = _mm256_packs_epi32(_mm256_srai_epi32(_mm256_slli_epi32(p0, 16), 16),
                                       _mm256_srai_epi32(_mm256_slli_epi32(p1, 16), 16));
        __m256i o = _mm256_packs_epi32(_mm256_srai_epi32(p0, 16), _mm256_srai_epi32(p1, 16));
        _mm256_storeu_si256((__m256i *)(q + b * LK_QK8_0), _mm256_permute4x64_epi64(e, 0xD8));
        _mm256_storeu_si256((__m256i *)(q + b * LK_QK8_0 + 16), _mm256_permute4x64_epi64(o, 0xD8));
    }
}

#define Q8_TARGET LK_AVX2_TARGET
#define Q8_VNNI 0
#define Q8_NAME(n) n##_avx2
#include "matmul_q8_0_x86.h"

const lk_mm_kernels lk_mm_q8_avx2 = {NULL, NULL, rows_q8_0_avx2, rows_q8r_avx2, quantize_act_avx2};

#endif /* LK_X86 */
