/* Low-rank adapter updates (LoRA), applied unmerged after a linear's matmul:
 *
 *     y[m] += scale_s * (x[m] . A_s^T) . B_s^T      for each row m, s = the row's slot
 *
 * with A_s [r, K] and B_s [N, r] float32 (the adapter stays float whatever the base
 * format). Rows choose their slot through the shared lk_lora_rows (one slot for all rows,
 * or one per row; -1 or a slot without factors for this module adds nothing), so one
 * batch can mix adapters and rows without any.
 *
 * A plan (lk_lora_plan) covers the linears that read one x (q/k/v, gate/up) and runs in
 * two passes over the rows grouped by slot, so each adapter's factors are read once per
 * call whatever the number of rows using it (8 streams on 4 adapters read 4 sets, not 8):
 *
 *   down  t[m] = scale * x[m] . A^T      units (linear, group, j): A's row j against every
 *                                        row of the group (M x r dots of length K)
 *   up    y[m, o] += t[m] . B[o]         per chunk of outputs: B's rows against every row
 *                                        of the group (M x N dots of length r)
 *
 * In the fused steps (lk_step_linears) both run inside the base matmul's parallel job
 * (lk_matmul_multi_hooked): the down tasks come first, and each chunk of output rows gets
 * its bias and, when every down task is finished by then, its up pass from the thread
 * that just computed it (B's rows for the chunk stream while the other thread is in the
 * matmul, the rows of y are in cache; no extra job). A chunk that finds the down pass
 * still running leaves its outputs pending (in a bitmap, by GRANULE outputs) and does not
 * wait: the pending outputs get their up pass in a second job, only when there are any
 * (at one row a decode chunk can be as short as a down task). Nothing within a job waits
 * for another thread: up tasks that waited for the down tasks and the chunks under their
 * outputs had a thread spin on a preempted one's task on the busy machine (18% of the
 * samples at one stream; some runs decoded at half speed). lk_lora_apply runs the same
 * plan alone: a down job, then an up job over every output.
 *
 * Every row's arithmetic is the same whatever the batch and the grouping (each dot is
 * one row's, in one order), so a request gets the same bits batched as alone.
 */
#define LK_INTERNAL
#include "lattice_kernels.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if LK_X86
static inline void relax(void) { __builtin_ia32_pause(); }
#else
static inline void relax(void) { __asm__ __volatile__("" ::: "memory"); }
#endif

/* OUT_BLOCK: outputs whose B rows stay in L1 while a group's rows pass over them; UP_CHUNK:
   outputs per up task; DOWN_COST: multiply-adds per down task; PF_FLOATS:
   how far ahead the factors' stream is prefetched (4 KiB, as lk_bench_read does: without
   it one thread's dependent loads over B ran at ~5 GB/s) */
enum { OUT_BLOCK = 64, UP_CHUNK = 256, DOWN_COST = 4096, PF_FLOATS = 1024, GRANULE = 4 };

/* ---- dots ---------------------------------------------------------------------------- */

static float dot_generic(const float *a, const float *b, int64_t n) {
    float s[4] = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++) s[k] += a[i + k] * b[i + k];
    float acc = (s[0] + s[1]) + (s[2] + s[3]);
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* up pass of one row over outputs [o0, o1): y[o] += t . b[o] (b rows of r floats) */
static void up_generic(const float *t, const float *b, int64_t r, int64_t o0, int64_t o1,
                       float *y) {
    for (int64_t o = o0; o < o1; o++) y[o] += dot_generic(t, b + o * r, r);
}

#if LK_X86
LK_AVX2_TARGET static float dot_avx2(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        _mm_prefetch((const char *)(b + i + PF_FLOATS), _MM_HINT_T0);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float acc = lk_hsum8_avx2(_mm256_add_ps(s0, s1));
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

/* lanes j < n of a mask for maskload (n in 0..8) */
LK_AVX2_TARGET static inline __m256i tail_mask(int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx);
}

/* acc lanes of one output: sum over k of t[k] b[k], k in lane k % 8 (the tail masked) */
LK_AVX2_TARGET static inline __m256 up_acc(const __m256 *tv, int64_t nv, __m256 tt,
                                           __m256i tm, int64_t rt, const float *b) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t v = 0; v < nv; v++) acc = _mm256_fmadd_ps(tv[v], _mm256_loadu_ps(b + 8 * v), acc);
    if (rt) acc = _mm256_fmadd_ps(tt, _mm256_maskload_ps(b + 8 * nv, tm), acc);
    return acc;
}

/* the lanes' sum as ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)): the order the
   eight-output reduction below gives each output */
static inline float tree8(const float *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

LK_AVX2_TARGET static void up_avx2(const float *t, const float *b, int64_t r, int64_t o0,
                                   int64_t o1, float *y) {
    enum { TV_MAX = 32 }; /* ranks up to 256 keep t in registers / L1 as vectors */
    const int64_t nv = r / 8, rt = r % 8;
    if (nv > TV_MAX) {
        for (int64_t o = o0; o < o1; o++) y[o] += dot_avx2(t, b + o * r, r);
        return;
    }
    __m256 tv[TV_MAX];
    for (int64_t v = 0; v < nv; v++) tv[v] = _mm256_loadu_ps(t + 8 * v);
    const __m256i tm = tail_mask(rt);
    const __m256 tt = rt ? _mm256_maskload_ps(t + 8 * nv, tm) : _mm256_setzero_ps();
    int64_t o = o0;
    for (; o + 8 <= o1; o += 8) {
        const float *bo = b + o * r;
        for (int64_t c = 0; c < 8 * r; c += 16) _mm_prefetch((const char *)(bo + c + PF_FLOATS), _MM_HINT_T0);
        __m256 a0 = up_acc(tv, nv, tt, tm, rt, bo), a1 = up_acc(tv, nv, tt, tm, rt, bo + r);
        __m256 a2 = up_acc(tv, nv, tt, tm, rt, bo + 2 * r), a3 = up_acc(tv, nv, tt, tm, rt, bo + 3 * r);
        __m256 a4 = up_acc(tv, nv, tt, tm, rt, bo + 4 * r), a5 = up_acc(tv, nv, tt, tm, rt, bo + 5 * r);
        __m256 a6 = up_acc(tv, nv, tt, tm, rt, bo + 6 * r), a7 = up_acc(tv, nv, tt, tm, rt, bo + 7 * r);
        /* hadd pairs lanes (0+1, 2+3) then (01+23); the halves' sum finishes each output */
        const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
        const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                       _mm256_permute2f128_ps(h0, h1, 0x31));
        _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), s));
    }
    for (; o < o1; o++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, up_acc(tv, nv, tt, tm, rt, b + o * r));
        y[o] += tree8(lanes);
    }
}
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) return dot_avx2(a, b, n);
#endif
    return dot_generic(a, b, n);
}

static inline void up(const float *t, const float *b, int64_t r, int64_t o0, int64_t o1,
                      float *y) {
#if LK_X86
    if (lk_active_isa == LK_ISA_AVX2) {
        up_avx2(t, b, r, o0, o1, y);
        return;
    }
#endif
    up_generic(t, b, r, o0, o1, y);
}

/* ---- the plan ------------------------------------------------------------------------ */

/* the factors linear i uses for slot s, or NULL */
static inline const lk_lora_factor *slot_factor(const lk_lora *l, int32_t s) {
    if (!l || s < 0 || s >= l->n_slots || !l->slots[s].a || !l->slots[s].b) return NULL;
    return &l->slots[s];
}

static void plan_free(lk_lora_plan *p) {
    if (p->heap) free(p->heap);
    p->heap = NULL;
}

int lk_lora_plan_make(lk_lora_plan *p, int n, const lk_lora *const *l,
                      const float *const *bias, float *const *y, const int64_t *N,
                      const float *x, int64_t M, int64_t K) {
    memset(p, 0, sizeof *p);
    if (n < 0 || n > LK_MATMUL_MULTI_MAX) return -2;
    p->n = n;
    p->x = x;
    p->M = M;
    p->K = K;
    const lk_lora_rows *rows = NULL;
    for (int i = 0; i < n; i++) {
        p->bias[i] = bias ? bias[i] : NULL;
        p->y[i] = y[i];
        p->N[i] = N[i];
        if (!l[i] || l[i]->n_slots <= 0) continue;
        if (!l[i]->rows) return -2;
        rows = l[i]->rows; /* one selection per model: every table shares it */
        for (int64_t s = 0; s < l[i]->n_slots; s++) {
            if (!l[i]->slots[s].a) continue;
            if (l[i]->slots[s].r <= 0) return -2;
            if (l[i]->slots[s].r > p->rmax[i]) p->rmax[i] = l[i]->slots[s].r;
        }
        if (p->rmax[i]) p->l[i] = l[i];
    }
    if (!rows || M <= 0) return 0;
    if (rows->slot && rows->n != M) return -2;
    if (!rows->slot && rows->uniform < 0) return 0;
    /* storage: t per linear [M, rmax], the groups and their rows, the (linear, group) units */
    int64_t tsum = 0;
    for (int i = 0; i < n; i++) tsum += M * p->rmax[i];
    if (tsum == 0) return 0;
    /* up tasks: windows of UP_CHUNK outputs of each linear with factors */
    p->upstart[0] = 0;
    for (int i = 0; i < n; i++)
        p->upstart[i + 1] = p->upstart[i] + (p->l[i] ? (N[i] + UP_CHUNK - 1) / UP_CHUNK : 0);
    p->nup = p->upstart[n];
    p->pstart[0] = 0;
    for (int i = 0; i < n; i++)
        p->pstart[i + 1] = p->pstart[i] + (p->l[i] ? ((N[i] + GRANULE - 1) / GRANULE + 63) / 64 : 0);
    const int64_t gmax = rows->slot ? M : 1;
    const size_t bytes = (size_t)p->pstart[n] * sizeof(uint64_t) + (size_t)tsum * sizeof(float) +
                         (size_t)(2 * gmax + 1 + M) * sizeof(int64_t) +
                         (size_t)(n * gmax + 1) * sizeof(int64_t);
    char *mem;
    if (bytes <= sizeof p->stack) mem = (char *)p->stack;
    else {
        mem = (char *)malloc(bytes);
        if (!mem) return -5;
        p->heap = mem;
    }
    p->pending = (_Atomic uint64_t *)mem;
    for (int64_t w = 0; w < p->pstart[n]; w++) atomic_init(&p->pending[w], 0);
    float *tp = (float *)(mem + (size_t)p->pstart[n] * sizeof(uint64_t));
    for (int i = 0; i < n; i++) {
        p->t[i] = tp;
        tp += M * p->rmax[i];
    }
    int64_t *ip = (int64_t *)tp;
    p->gslot = ip;
    p->gstart = ip + gmax;
    p->grow = ip + 2 * gmax + 1;
    p->ustart = ip + 2 * gmax + 1 + M;
    /* groups in order of first appearance; rows of a group in row order */
    int64_t ng = 0, nr = 0;
    if (!rows->slot) {
        p->gslot[0] = rows->uniform;
        p->gstart[0] = 0;
        for (int64_t m = 0; m < M; m++) p->grow[m] = m;
        ng = 1;
        nr = M;
    } else {
        for (int64_t m = 0; m < M; m++) {
            const int32_t s = rows->slot[m];
            if (s < 0) continue;
            int64_t g = 0;
            while (g < ng && p->gslot[g] != s) g++;
            if (g < ng) continue; /* its group was gathered when first seen */
            p->gslot[ng] = s;
            p->gstart[ng] = nr;
            for (int64_t m2 = m; m2 < M; m2++)
                if (rows->slot[m2] == s) p->grow[nr++] = m2;
            ng++;
        }
    }
    p->gstart[ng] = nr;
    p->ngroups = ng;
    /* down units: (linear i, group g, factor row j), numbered i-major then g */
    int64_t u = 0, cost = 0;
    for (int i = 0; i < n; i++)
        for (int64_t g = 0; g < ng; g++) {
            p->ustart[i * ng + g] = u;
            const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
            if (!f) continue;
            u += f->r;
            cost += f->r * K * (p->gstart[g + 1] - p->gstart[g]);
        }
    p->ustart[n * ng] = u;
    p->nunits = u;
    if (u == 0) {
        plan_free(p);
        p->ngroups = 0;
        return 0;
    }
    int64_t nt = (cost + DOWN_COST - 1) / DOWN_COST;
    p->ndown = nt < 1 ? 1 : nt > u ? u : nt;
    p->active = 1;
    return 0;
}

void lk_lora_plan_free(lk_lora_plan *p) { plan_free(p); }

/* down task d: units [nunits * d / ndown, nunits * (d + 1) / ndown) */
void lk_lora_plan_down(void *ctx, int64_t d, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    const int64_t u0 = p->nunits * d / p->ndown, u1 = p->nunits * (d + 1) / p->ndown;
    const int64_t ng = p->ngroups, K = p->K;
    int64_t pair = 0; /* i * ng + g, the unit range it covers holds u0 */
    while (p->ustart[pair + 1] <= u0) pair++;
    for (int64_t u = u0; u < u1; u++) {
        while (p->ustart[pair + 1] <= u) pair++;
        const int i = (int)(pair / ng);
        const int64_t g = pair % ng, j = u - p->ustart[pair];
        const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
        const float *a = f->a + j * K;
        for (int64_t q = p->gstart[g]; q < p->gstart[g + 1]; q++) {
            const int64_t m = p->grow[q];
            p->t[i][m * p->rmax[i] + j] = f->scale * dot(p->x + m * K, a, K);
        }
    }
    atomic_fetch_add_explicit(&p->down_done, 1, memory_order_release);
}

/* every group's up pass over outputs [r0, r1) of linear i */
static void up_range(const lk_lora_plan *p, int i, int64_t r0, int64_t r1) {
    const int64_t N = p->N[i];
    float *y = p->y[i];
    for (int64_t g = 0; g < p->ngroups; g++) {
        const lk_lora_factor *f = slot_factor(p->l[i], p->gslot[g]);
        if (!f) continue;
        /* a block of B's rows stays in L1 while every row of the group passes over it */
        for (int64_t o0 = r0; o0 < r1; o0 += OUT_BLOCK) {
            const int64_t o1 = o0 + OUT_BLOCK < r1 ? o0 + OUT_BLOCK : r1;
            for (int64_t q = p->gstart[g]; q < p->gstart[g + 1]; q++) {
                const int64_t m = p->grow[q];
                up(p->t[i] + m * p->rmax[i], f->b, f->r, o0, o1, y + m * N);
            }
        }
    }
}

/* outputs [r0, r1) of linear i are written, every row: + bias, then the up pass right
   away when the down pass is complete, else the outputs are left pending (by granules of
   GRANULE outputs) for lk_lora_plan_run_up */
void lk_lora_plan_post(void *ctx, int i, int64_t r0, int64_t r1, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    const int64_t N = p->N[i];
    float *y = p->y[i];
    if (p->bias[i])
        for (int64_t m = 0; m < p->M; m++)
            lk_add(y + m * N + r0, p->bias[i] + r0, r1 - r0, y + m * N + r0);
    if (!p->active || !p->l[i]) return;
    if (atomic_load_explicit(&p->down_done, memory_order_acquire) == p->ndown ||
        r0 % GRANULE || (r1 % GRANULE && r1 != N)) {
        /* (a chunk not on granules, which the matmul never makes, waits instead) */
        while (atomic_load_explicit(&p->down_done, memory_order_acquire) < p->ndown) relax();
        up_range(p, i, r0, r1);
        return;
    }
    _Atomic uint64_t *bits = p->pending + p->pstart[i];
    for (int64_t gr = r0 / GRANULE; gr * GRANULE < r1; gr++)
        atomic_fetch_or_explicit(&bits[gr / 64], (uint64_t)1 << (gr % 64), memory_order_relaxed);
    atomic_store_explicit(&p->any_pending, 1, memory_order_relaxed);
}

/* up task c: the pending outputs (all of them: p->all) among [r0, r1) of one linear, the
   c-th window of UP_CHUNK counted over the linears with factors */
void lk_lora_plan_up(void *ctx, int64_t c, int ith) {
    (void)ith;
    lk_lora_plan *p = (lk_lora_plan *)ctx;
    int i = 0;
    while (c >= p->upstart[i + 1]) i++;
    c -= p->upstart[i];
    const int64_t N = p->N[i];
    const int64_t r0 = c * UP_CHUNK, r1 = r0 + UP_CHUNK < N ? r0 + UP_CHUNK : N;
    if (p->all) {
        up_range(p, i, r0, r1);
        return;
    }
    const _Atomic uint64_t *bits = p->pending + p->pstart[i];
    int64_t run = -1; /* first output of the current run of pending granules */
    for (int64_t o = r0; o < r1; o += GRANULE) {
        const int64_t gr = o / GRANULE;
        const int set = (atomic_load_explicit(&bits[gr / 64], memory_order_relaxed) >> (gr % 64)) & 1;
        if (set && run < 0) run = o;
        if (!set && run >= 0) {
            up_range(p, i, run, o);
            run = -1;
        }
    }
    if (run >= 0) up_range(p, i, run, r1);
}

void lk_lora_plan_run_up(lk_lora_plan *p) {
    if (!p->active || !atomic_load(&p->any_pending)) return;
    lk_lock();
    lk_parallel(lk_lora_plan_up, p, p->nup);
    lk_unlock();
}

/* ---- lk_lora_apply: one linear, the plan alone -------------------------------------- */

int lk_lora_apply(const lk_lora *l, const float *x, int64_t M, int64_t K, int64_t N,
                  float *y) {
    if (!l || l->n_slots <= 0 || M <= 0) return 0;
    lk_init();
    lk_lora_plan p;
    const int rc = lk_lora_plan_make(&p, 1, &l, NULL, &y, &N, x, M, K);
    if (rc || !p.active) return rc;
    p.all = 1; /* y is written already: every output's up pass in the up job */
    lk_lock();
    lk_parallel(lk_lora_plan_down, &p, p.ndown);
    lk_parallel(lk_lora_plan_up, &p, p.nup);
    lk_unlock();
    lk_lora_plan_free(&p);
    return 0;
}
