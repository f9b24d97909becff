/* matmul_q8_0_avxvnni.c: the q8_0 and q8_0_r16 kernels with AVX-VNNI (256-bit vpdpwssd),
 * instantiated from matmul_q8_0_x86.h. */#include "matmul_internal.h"

#if LK_X86
#define Q8_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define Q8_VNNI 1
#define Q8_NAME(n) n##_avxvnni
#include "matmul_q8_0_x86.h"

const lk_mm_kernels lk_mm_q8_avxvnni = {NULL, NULL, rows_q8_0_avxvnni, rows_q8r_avxvnni, NULL};

#endif /* LK_X86 */
