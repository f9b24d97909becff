/* matmul_q8_0_avx512vnni.c: the q8_0 and q8_0_r16 kernels with AVX512-VNNI (256-bit
 * vpdpwssd for decode, 512-bit prefill), instantiated from matmul_q8_0_x86.h. */#include "matmul_internal.h"

#if LK_X86
#define Q8_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#define Q8_VNNI 2
#define Q8_NAME(n) n##_avx512vnni
#include "matmul_q8_0_x86.h"

const lk_mm_kernels lk_mm_q8_avx512vnni = {NULL, NULL, rows_q8_0_avx512vnni, rows_q8r_avx512vnni, NULL};

#endif /* LK_X86 */
