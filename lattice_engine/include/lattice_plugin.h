/*
 * lattice_plugin.h: the C ABI lattice-engine's core offers to plugins' native code.
 *
 * This is the only core header a plugin's C code includes. It is shipped inside the
 * installed package (lattice_engine/include/, see lattice_engine.native_include()), so a
 * plugin builds against the core it will run with, without the core's sources. The core's
 * own header, native/include/lattice_kernels.h, includes it.
 *
 * How a plugin gets the API (no linking against the core, no dlopen): the core's cffi
 * module exports lk_plugin_api_get(); the plugin's Python passes the returned address as
 * an integer to the plugin's C attach function,
 *
 *     from lattice_engine._native import ffi, lib
 *     address = int(ffi.cast("uintptr_t", lib.lk_plugin_api_get()))
 *     my_c_lib.my_plugin_attach(address)
 *
 * and the attach function checks the version before it keeps the pointer:
 *
 *     const lk_plugin_api *api = (const lk_plugin_api *)address;
 *     if (api->abi_version != LK_PLUGIN_ABI_VERSION) return MY_ERR_ABI;  (report both)
 *     if (api->size < sizeof(lk_plugin_api)) return MY_ERR_ABI;
 *
 * Versioning. LK_PLUGIN_ABI_VERSION is a major number, bumped on any incompatible change
 * (a field removed, reordered or retyped, a function's signature or contract changed). A
 * compatible addition appends a field at the end of lk_plugin_api and leaves the version
 * alone: `size` tells a plugin built against a newer header whether the core it runs with
 * has the field. The first two fields (abi_version, size) are frozen across all versions,
 * so any plugin can read them from any core. This number is separate from the Python hook
 * contract's PLUGIN_API_VERSION (lattice_engine/hookspecs.py).
 *
 * Everything here is plain C99 (stdint types, function pointers); the struct is owned by
 * the core, static, valid for the life of the process, and read-only for plugins.
 */
#ifndef LATTICE_PLUGIN_H
#define LATTICE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* LK_CDEF_BEGIN: from here to LK_CDEF_END the declarations are also the cffi cdef of
   lattice_engine._native (native/build_native.py extracts them): keep them plain C that
   cffi parses (no inline bodies, no macros other than integer #defines). */

#define LK_PLUGIN_ABI_VERSION 1

/* CPU features, as lk_plugin_api.cpu_features reports them: what the CPU and the OS
   (saved register state) support, detected once by the core. Policy such as
   LATTICE_ISA=generic is not applied here: a plugin applies its own. */
#define LK_CPU_AVX2 1
#define LK_CPU_FMA 2
#define LK_CPU_F16C 4
#define LK_CPU_AVXVNNI 8
#define LK_CPU_AVX512F 16
#define LK_CPU_AVX512BW 32
#define LK_CPU_AVX512VL 64
#define LK_CPU_AVX512VNNI 128

/* A range task: process items [i0, i1) of a job; ith (0 = the calling thread, 1.. the
   pool's workers) names the thread, e.g. to pick a per-thread scratch buffer. */
typedef void (*lk_range_fn)(void *ctx, int64_t i0, int64_t i1, int ith);

/* A matmul a plugin's weight format provides, for the core's fused decode steps
   (lk_linear.fmt = LK_FMT_EXTERN, .ext = the function, .ext_ctx = its ctx):
   y[M, N] = x[M, K] @ w^T for w's N rows of ldw bytes each; x float32 [M, K] and y float32
   [M, N] contiguous. ctx is the format's own description, owned by the plugin, which keeps
   it (and the function) alive as long as any model uses it. Called on the thread that runs
   the step, not inside a pool task and without the core's lock held, so it may split its
   work with lk_plugin_api.parallel_for. Returns 0, or nonzero on failure (out of memory):
   the step then fails. */
typedef int (*lk_extern_matmul)(const void *ctx, const float *x, int64_t M, int64_t K,
                                const void *w, int64_t ldw, int64_t N, float *y);

/* Optional, next to a format's lk_extern_matmul and with the same ctx: n matrices of that
   format, each over its own rows of one x (a mixture-of-experts layer's selected experts):
   for i in [0, n), y[i][M[i], N[i]] = x[row0[i] .. row0[i] + M[i], :K] @ w[i]^T, w[i]'s
   N[i] rows ldw[i] bytes apart; x float32 [rows, K] contiguous, where rows is the largest
   row0[i] + M[i]; M[i] == 0 skips matrix i. One call for all of them lets the plugin
   quantize x once and give every matrix to the pool as one job, instead of n hand-offs.
   Each y[i] must equal, bit for bit, what lk_extern_matmul gives for the same rows and
   matrix (the core uses either). Same threading contract and return codes as
   lk_extern_matmul. (A compatible addition: the table and the version are unchanged.) */
typedef int (*lk_extern_matmul_grouped)(const void *ctx, const float *x, int64_t K,
                                        int64_t n, const int64_t *row0, const int64_t *M,
                                        const void *const *w, const int64_t *ldw,
                                        const int64_t *N, float *const *y);

typedef struct lk_plugin_api {
    /* LK_PLUGIN_ABI_VERSION of the core (frozen: always the first field) */
    int32_t abi_version;
    /* sizeof(lk_plugin_api) in the core (frozen: always the second field) */
    uint32_t size;

    /* fn(ctx, i0, i1, ith) over [0, n) in contiguous ranges on the core's thread pool
       (the caller runs ranges too, as ith 0); returns when all ranges are done. Runs
       inline on the caller, fn(ctx, 0, n, 0), when n < 2 * grain (grain < 1 counts as 1).
       Jobs from several host threads are serialized on the core's lock, which it takes
       itself: do not call it from inside a range task, nor from a core kernel. Sharing the
       core's pool keeps one set of spinning workers on the machine and obeys
       lattice_engine.kernels.set_threads / LATTICE_THREADS. */
    void (*parallel_for)(lk_range_fn fn, void *ctx, int64_t n, int64_t grain);

    /* Threads parallel_for uses, the caller included (>= 1). Takes the core's lock: not
       from inside a range task. */
    int (*threads)(void);

    /* LK_CPU_* bits of the CPU this process runs on; constant, cheap, thread-safe. */
    uint32_t (*cpu_features)(void);
} lk_plugin_api;

/* The core's API table: static, never NULL, valid for the life of the process. */
const lk_plugin_api *lk_plugin_api_get(void);
/* LK_PLUGIN_ABI_VERSION the core was built with (for Python: `lattice --version`). */
int lk_plugin_abi_version(void);
/* The same bits as lk_plugin_api.cpu_features. */
uint32_t lk_cpu_features(void);

/* LK_CDEF_END */

#ifdef __cplusplus
}
#endif
#endif /* LATTICE_PLUGIN_H */
