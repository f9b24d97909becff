/*
 * lattice_kernels.h: the C kernels behind lattice_engine.kernels.
 * (One header for every kernel's declaration and contract, by design: it is the C API the
 * Python glue and the cffi declarations are generated from, so it is long.)
 *
 * Every kernel has a generic scalar version and, on x86-64, an AVX2/FMA/F16C version.
 * The variant is picked once at run time (lk_init) from what the CPU reports, so the
 * library is built without -mavx2 and still runs on older CPUs.
 *
 * Conventions
 *   - Activations are float32, row-major, contiguous unless a stride argument says
 *     otherwise (strides are counted in elements, not bytes).
 *   - A weight matrix W [N, K] is N rows of `ldw` bytes each; a row is K/block_size
 *     blocks of its format (f32: 4 bytes per value, f16: 2, q8_0: 34 bytes per 32);
 *     q8_0_r16 holds the same blocks with 16 rows interleaved (see below).
 *   - matmul computes y[M, N] = x[M, K] @ W^T. Up to 8 rows of x (decode, small batches)
 *     stream the weights four rows at a time with software prefetch, memory bound; more
 *     rows (prefill) are tiled so each weight block is read once per tile of x rows.
 *   - Kernels that use threads split output rows across a persistent pool (the caller
 *     is thread 0); they serialize on one internal lock, so calls from several host
 *     threads are safe but do not overlap.
 *   - Scratch memory is persistent and grows on demand; hot paths do not allocate once
 *     warm.
 *
 * Environment (read once, at first use)
 *   LATTICE_THREADS  threads including the caller (default 2); lk_set_threads overrides
 *   LATTICE_SPIN_US  how long idle workers spin before sleeping (default 2000)
 *   LATTICE_ISA      "generic" forces the scalar kernels
 *   LATTICE_Q8       q8_0 kernel at the AVX2 level: avx2, avxvnni or avx512vnni
 *   LATTICE_PF       matvec software-prefetch distance (tuning; see matmul_internal.h)
 *   LATTICE_CHUNKS   decode row chunks per thread and matrix (tuning; default 4)
 *   LATTICE_MV_QUARTERS  0: the f32 / f16 matvec reads four adjacent rows at a time instead
 *                    of four quarters of its chunk (tuning; see matvec_float)
 *   LATTICE_PANELS   0: encoders keep the float32 kernels (lk_f32_panels_ready; read per
 *                    call, at weight packing)
 *
 * Public functions (declared below; native/build_native.py generates the cffi cdef from the
 * LK_CDEF_BEGIN / LK_CDEF_END regions of this header and of lattice_plugin.h, so adding a
 * function here is all it takes to bind it)
 *   plugin ABI lk_plugin_api_get, lk_plugin_abi_version, lk_cpu_features
 *              (lattice_engine/include/lattice_plugin.h: the only header plugins include)
 *   runtime    lk_init, lk_isa, lk_isa_name, lk_set_isa, lk_cpu_is_amd, lk_set_threads,
 *              lk_get_threads
 *   matmul     lk_matmul_f32, lk_matmul_f16, lk_matmul_q8_0,
 *              lk_matmul_q8_0_r16                                    (lk_matmul_fn)
 *              lk_matmul_multi (several matrices sharing x, one parallel job)
 *              lk_q8_variant, lk_q8_variant_name
 *   embed      lk_embed_f32, lk_embed_f16, lk_embed_q8_0, lk_embed_q8_0_r16 (lk_embed_fn)
 *   quantize   lk_quantize_q8_0, lk_quantize_row_q16_act, lk_q8_0_to_r16, lk_r16_to_q8_0
 *   ggml       lk_ggml_block_shape, lk_dequantize_ggml (GGUF block types to float32)
 *   elementwise lk_rms_norm, lk_rope, lk_silu, lk_silu_mul, lk_softmax, lk_log_sum_exp, lk_add
 *   attention  lk_attention (causal grouped-query, prefill and decode over a KV cache)
 *              lk_paged_attention (the same over a paged block pool, a flat batch of sequences)
 *   decoder    lk_decoder_work_size, lk_decoder_step (a whole decode step of the
 *              llama-family decoder in one call)
 *   deltanet   lk_causal_conv1d, lk_gated_delta_rule, lk_gated_rms_norm, lk_sigmoid,
 *              lk_softplus (Qwen3.5's Gated DeltaNet layers and gates)
 *   qwen35     lk_qwen35_work_size, lk_qwen35_step (a whole Qwen3.5 decode step in one
 *              call), lk_qwen35_step_paged (the same over a paged batch),
 *              lk_qwen35_step_paged_trail (and verify rows that can be replayed)
 *   moe        lk_moe_ok, lk_moe_forward (a mixture-of-experts MLP, experts grouped by
 *              row), lk_matmul_grouped (matrices each over their own rows, one job)
 *   rotate     lk_block_rotate (online Hadamard rotation, QuaRot)
 *   lora       lk_lora_apply (low-rank adapter updates, per-row adapter selection, rows
 *              grouped by adapter; the fused steps run the same plan for every lk_linear
 *              with a lora table inside their matmul job)
 *   panels     lk_f32_panels_ready, lk_f32_panels_size, lk_f32_panels_pack,
 *              lk_matmul_f32_panels (float32 encoder matmuls, outer-product form, AVX2)
 *   bench      lk_bench_read (multi-threaded streaming read of a buffer)
 */
#ifndef LATTICE_KERNELS_H
#define LATTICE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* the plugin ABI: lk_plugin_api, lk_range_fn, lk_extern_matmul[_grouped], LK_CPU_* (shipped
   in the package, lattice_engine/include/) */
#include "lattice_plugin.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- block formats ------------------------------------------------------------- */

#define LK_QK8_0 32

/* GGUF Q8_0 weight block: x[i] = d * qs[i], d stored as IEEE half. */
typedef struct {
    uint16_t d;
    int8_t qs[LK_QK8_0];
} lk_block_q8_0;
_Static_assert(sizeof(lk_block_q8_0) == 34, "lk_block_q8_0 must match GGUF Q8_0 (34 bytes)");

/* The q8_0 matmul quantizes activations per block of LK_QK8_0 to int16 with a float32
   scale (amax / 32767), kept as two arrays: q int16 [K] and d float [K / LK_QK8_0]. */

/* q8_0_r16: the same blocks as q8_0, 16 rows interleaved, the layout the batched kernels
   multiply from directly (q8_0 has them re-packed on every call). Rows come in groups of
   16 (rows % 16 == 0); group g is nb = K / 32 records of LK_R16_RECORD bytes, one per
   block: 16 dwords of 16 rows x 2 int8 (dword i, row l at byte 32 i + 2 l: the weights of
   values lk_r16_value(i, 0) and (i, 1) of the block, the pair the activations' int16
   dword i meets), then the 16 rows' f16 scales. A group is 16 x the q8_0 row bytes, so
   the matrix has exactly q8_0's size and ldw (its row stride) is the q8_0 row's. */
#define LK_R16_ROWS 16
#define LK_R16_RECORD (LK_R16_ROWS * 34)
static inline int lk_r16_value(int i, int e) { return i < 8 ? 4 * i + 2 * e : 4 * (i - 8) + 1 + 2 * e; }

/* LK_CDEF_BEGIN: from here to LK_CDEF_END the declarations are also the cffi cdef of
   lattice_engine._native (native/build_native.py extracts them): keep them plain C that
   cffi parses (no inline bodies, no macros other than integer #defines). */

/* ---- runtime ------------------------------------------------------------------- */

enum { LK_ISA_GENERIC = 0, LK_ISA_AVX2 = 1 };

/* Detect the CPU and pick kernel variants; idempotent. Returns the active LK_ISA_*. */
int lk_init(void);
int lk_isa(void);
const char *lk_isa_name(void);
/* Force a variant (tests compare them); a variant the CPU lacks is refused.
   Returns the active LK_ISA_* afterwards. */
int lk_set_isa(int isa);
/* 1 when the CPU is an AMD one (a layout choice depends on its two shuffle pipes:
   core_formats.r16_pays), else 0. */
int lk_cpu_is_amd(void);
/* Threads used by parallel kernels, including the caller; n < 1 means 1. */
void lk_set_threads(int n);
int lk_get_threads(void);

/* ---- matmul: y[M, N] = x[M, K] @ W[N, K]^T ------------------------------------ */

/* Weight formats with native kernels (the `fmt` argument of the multi-matrix calls). */
enum { LK_FMT_F32 = 0, LK_FMT_F16 = 1, LK_FMT_Q8_0 = 2, LK_FMT_Q8_0_R16 = 3 };
#define LK_MATMUL_MULTI_MAX 8

typedef void (*lk_matmul_fn)(const float *x, int64_t M, int64_t K,
                             const void *w, int64_t ldw, int64_t N, float *y);
void lk_matmul_f32(const float *x, int64_t M, int64_t K,
                   const void *w, int64_t ldw, int64_t N, float *y);
void lk_matmul_f16(const float *x, int64_t M, int64_t K,
                   const void *w, int64_t ldw, int64_t N, float *y);
/* K must be a multiple of LK_QK8_0. x is quantized internally, per block of 32, to int16
   with a float32 scale (lk_quantize_row_q16_act); each block's dot with the int8 weights
   is exact in int32, then scaled by d_w * d_x in float32. */
void lk_matmul_q8_0(const float *x, int64_t M, int64_t K,
                    const void *w, int64_t ldw, int64_t N, float *y);
/* Which q8_0 kernel the AVX2 level uses: 0 avx2 (madd), 1 avxvnni (256-bit vpdpwssd),
   2 avx512vnni (256-bit decode, 512-bit prefill). By default the best the CPU has
   (LATTICE_Q8=<name> overrides). v >= 0 selects v if the CPU has it (tests compare
   them); returns the variant now in use. lk_q8_variant_name(v) is NULL past the last. */
int lk_q8_variant(int v);
/* q8_0_r16 weights (N % 16 == 0; ldw = K / 32 * 34): the same bits as lk_matmul_q8_0 on
   the q8_0 matrix they were converted from, for every M. */
void lk_matmul_q8_0_r16(const float *x, int64_t M, int64_t K,
                        const void *w, int64_t ldw, int64_t N, float *y);
const char *lk_q8_variant_name(int v);
/* y_i[M, N_i] = x[M, K] @ W_i^T for n <= LK_MATMUL_MULTI_MAX matrices of format fmt that
   read the same x (q/k/v, gate/up): x is converted once and all rows of all n matrices
   are split across the threads as one job. Returns 0, or -1 for a bad fmt / n / K. */
int lk_matmul_multi(int fmt, const float *x, int64_t M, int64_t K, int n,
                    const void *const *w, const int64_t *ldw, const int64_t *N,
                    float *const *y);

/* ---- embed: out[i, :] = float(W[ids[i], :]) ----------------------------------- */

/* Returns 0, or -1 (writing nothing) if some id is outside [0, rows). */
typedef int (*lk_embed_fn)(const void *w, int64_t ldw, int64_t rows, int64_t K,
                           const int64_t *ids, int64_t n, float *out);
int lk_embed_f32(const void *w, int64_t ldw, int64_t rows, int64_t K,
                 const int64_t *ids, int64_t n, float *out);
int lk_embed_f16(const void *w, int64_t ldw, int64_t rows, int64_t K,
                 const int64_t *ids, int64_t n, float *out);
int lk_embed_q8_0(const void *w, int64_t ldw, int64_t rows, int64_t K,
                  const int64_t *ids, int64_t n, float *out);
int lk_embed_q8_0_r16(const void *w, int64_t ldw, int64_t rows, int64_t K,
                      const int64_t *ids, int64_t n, float *out);

/* ---- quantize ------------------------------------------------------------------ */

/* Weights: x [rows, K] -> GGUF Q8_0 rows (K/32 blocks each), rounding half away from
   zero like ggml's reference quantizer; scale = amax / 127 stored as half. */
void lk_quantize_q8_0(const float *x, int64_t rows, int64_t K, void *dst);
/* q8_0 rows [rows, K/32 blocks] <-> q8_0_r16 (rows % 16 == 0, K % 32 == 0); dst may be
   src (in place) but must not overlap it otherwise. Returns 0, or -1 for a shape the
   layout cannot hold (or out of memory). */
int lk_q8_0_to_r16(const void *src, int64_t rows, int64_t K, void *dst);
int lk_r16_to_q8_0(const void *src, int64_t rows, int64_t K, void *dst);
/* One activation row x [K] -> q int16 [K] and d float [K/32] as the q8_0 matmul uses it:
   per block d = amax / 32767 (0 when amax < 1e-30), q = round-half-even(x * (1 / d))
   clamped to +-32767. */
void lk_quantize_row_q16_act(const float *x, int64_t K, int16_t *q, float *d);

/* ---- GGUF block types to float32 (ggml_dequant.c) ---------------------------------- */

/* Values and bytes per block of ggml type `ggml_type` (the GGUF tensor type id); 0, or -1
   when lk_dequantize_ggml does not take that type. Taken: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
   Q4_K, Q5_K, Q6_K (2, 3, 6, 7, 8, 12, 13, 14). */
int lk_ggml_block_shape(int ggml_type, int64_t *block_values, int64_t *block_bytes);
/* rows of K values stored as `ggml_type` blocks (rows * K / block_values * block_bytes
   bytes at src) -> dst float32 [rows, K], bit for bit the values of the gguf package's
   dequantizers. Returns 0, or -1 for a type it does not take or a K that is not a whole
   number of blocks. */
int lk_dequantize_ggml(int ggml_type, const void *src, int64_t rows, int64_t K, float *dst);
/* rows of K values stored as ggml type `type` -> dst GGUF Q8_0 rows: a block type
   lk_dequantize_ggml takes, or the float types F32 (0), F16 (1) and BF16 (30); the bytes
   of dequantizing (or widening) then lk_quantize_q8_0, one block at a time (no float32
   copy of the matrix). Returns 0, or -1 for another type, or a K that is not whole blocks
   of the type and of q8_0. */
int lk_to_q8_0(int type, const void *src, int64_t rows, int64_t K, void *dst);

/* ---- GGUF block types run as stored (matmul_ggml.c) -------------------------------- */

/* y[M, N] = x[M, K] @ W^T for W's N rows of ggml type `type` (Q5_0 6, Q4_K 12, Q6_K 14:
   a Q4_K_M file's), ldw bytes apart, from the file's own blocks: x quantized per block of
   32 to int16 as for q8_0, exact integer block dots, a fixed float order per output (the
   same bits on every path and at every M). Returns 0, -1 for another type, a K that is not
   whole blocks or an ldw shorter than a row, -5 out of memory. */
int lk_matmul_ggml(int type, const float *x, int64_t M, int64_t K, const void *w, int64_t ldw,
                   int64_t N, float *y);
/* y_i = x @ W_i^T for n (<= LK_MATMUL_MULTI_MAX) matrices of one ggml type reading the
   same x (q / k / v, gate / up): x quantized once, one parallel job; each y_i has the bits
   lk_matmul_ggml gives it alone. Same returns. */
int lk_matmul_ggml_multi(int type, const float *x, int64_t M, int64_t K, int n,
                         const void *const *w, const int64_t *ldw, const int64_t *N,
                         float *const *y);
/* lk_matmul_ggml as an lk_extern_matmul: ctx is lk_ggml_matmul_ctx(type) (static, never
   freed), so the fused steps run these matrices like a plugin format's */
int lk_matmul_ggml_extern(const void *ctx, const float *x, int64_t M, int64_t K, const void *w,
                          int64_t ldw, int64_t N, float *y);
const void *lk_ggml_matmul_ctx(int type);
/* the type of a ctx lk_ggml_matmul_ctx gave, 0 for any other pointer */
int lk_ggml_ctx_type(const void *ctx);
/* tuning only (bench/ A/B): rows the decode streams prefetch ahead (>= 0) and interleaved
   streams per chunk (1..16); a negative / out-of-range value leaves a knob alone */
void lk_ggml_tune(int pf_rows, int streams);
/* rows ids[0..n) of a [rows, cols] matrix of ggml type `type` -> out float32 [n, cols]
   (lk_dequantize_ggml's values). Returns 0, -1 for another type or shape, -2 for an id
   out of range (nothing written then). */
int lk_embed_ggml(int type, const void *w, int64_t ldw, int64_t rows, int64_t cols,
                  const int64_t *ids, int64_t n, float *out);

/* ---- elementwise (float32) ------------------------------------------------------ */

/* out = x / sqrt(mean(x^2) + eps) * (offset + w), per row of length D. */
void lk_rms_norm(const float *x, int64_t rows, int64_t D, const float *w,
                 float eps, float offset, float *out);
/* Rotary embedding of x [B, T, H, Dh] (strides sb, st, sh; unit stride inside a head)
   into contiguous out [B, T, H, Dh] (out may equal x when x is contiguous).
   cos/sin are [T, half]; the first 2*half features rotate, the rest are copied.
   interleaved = 0: pairs (i, half+i) (HF rotate_half); 1: pairs (2i, 2i+1) (GPT-J). */
void lk_rope(const float *x, int64_t B, int64_t T, int64_t H, int64_t Dh,
             int64_t sb, int64_t st, int64_t sh,
             const float *cos_t, const float *sin_t, int64_t half, int interleaved,
             float *out);
void lk_silu(const float *x, int64_t n, float *out);
/* out[r, i] = silu(gate[r, i]) * up[r, i]; gate/up rows are ldg/ldu elements apart,
   out is contiguous [rows, n]. */
void lk_silu_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu,
                 int64_t rows, int64_t n, float *out);
/* Softmax over each contiguous row of length n. */
void lk_softmax(const float *x, int64_t rows, int64_t n, float *out);
/* out[r] = log(sum_i exp(x[r, i])) over each contiguous row of length n (a log softmax's
   normaliser: logprob of token t = x[r, t] - out[r]). */
void lk_log_sum_exp(const float *x, int64_t rows, int64_t n, float *out);
void lk_add(const float *a, const float *b, int64_t n, float *out);
/* BERT's LayerNorm per row of length D: (x - mean) / sqrt(biased var + eps) * w + b. */
void lk_layer_norm(const float *x, int64_t rows, int64_t D, const float *w, const float *b,
                   float eps, float *out);
/* out = x * Phi(x): erf form (tanh_form = 0, "gelu") or tanh form ("gelu_new"). */
void lk_gelu(const float *x, int64_t n, int tanh_form, float *out);

/* ---- attention ------------------------------------------------------------------ */

/* Causal grouped-query attention.
   q [B, T, Hq, D] with strides (qsb, qst, qsh), for absolute positions
   start_pos .. start_pos + T - 1; k, v [B, S, Hkv, D] with their own strides, positions
   0 .. S - 1 (a KV cache may be longer than used: pass S = valid length). Query t
   attends keys s <= start_pos + t. Hq % Hkv == 0. out is contiguous [B, T, Hq, D].
   Returns 0, or -1 if the shapes are inconsistent. */
int lk_attention(const float *q, int64_t B, int64_t T, int64_t Hq, int64_t D,
                 int64_t qsb, int64_t qst, int64_t qsh,
                 const float *k, int64_t ksb, int64_t kst, int64_t ksh,
                 const float *v, int64_t vsb, int64_t vst, int64_t vsh,
                 int64_t S, int64_t Hkv, int64_t start_pos, float scale, float *out);

/* How a KV cache stores each head vector of D values (`[model] kv_cache`):
   LK_KV_F32 D floats; LK_KV_F16 D IEEE halves; LK_KV_Q8_0 D / 32 GGUF Q8_0 blocks (an f16
   scale then 32 int8, 34 bytes), D a multiple of 32. */
enum { LK_KV_F32 = 0, LK_KV_F16 = 1, LK_KV_Q8_0 = 2 };
/* Bytes of one stored head vector; -1 for an unknown dtype or a D q8_0 cannot hold. */
int64_t lk_kv_row_bytes(int32_t dtype, int64_t D);
/* Store n head vectors x [n, D] (contiguous floats) as dtype at dst (rows row_bytes
   apart). k_shift / k_scale [D] (NULL: none) store (x - k_shift) / k_scale instead: the
   keys' transform of q8_0 caches (cache/dense.py), attention being invariant to a shift
   of every key and reading the scale back (lk_kv_load). */
void lk_kv_store(int32_t dtype, const float *x, int64_t n, int64_t D, const float *k_shift,
                 const float *k_scale, void *dst);
/* Decode n stored head vectors (src, rows row_bytes apart) into out [n, D] floats, each
   value times k_scale[d] when k_scale is given. */
void lk_kv_load(int32_t dtype, const void *src, int64_t n, int64_t D, const float *k_scale,
                float *out);
/* lk_attention over keys and values stored as dtype (LK_KV_*): k, v point at the stored
   rows, strides counted in the storage's units (floats for f32, halves for f16, bytes for
   q8_0); k_scale [Hkv, D] (NULL: none) multiplies the decoded keys (q8_0 caches' key
   scaling). Keys and values are read in their dtype and widened in tiles as they are
   used, so a step reads f16 / q8_0 bytes from memory, not floats. */
int lk_attention_kv(const float *q, int64_t B, int64_t T, int64_t Hq, int64_t D,
                    int64_t qsb, int64_t qst, int64_t qsh, int32_t dtype,
                    const void *k, int64_t ksb, int64_t kst, int64_t ksh,
                    const void *v, int64_t vsb, int64_t vst, int64_t vsh,
                    const float *k_scale, int64_t S, int64_t Hkv, int64_t start_pos,
                    float scale, float *out);

/* ---- decoder: one decode step of a llama-family model ------------------------------ */

/* A weight format's matmul from a plugin (lk_extern_matmul, declared with the plugin
   ABI in lattice_plugin.h) runs a linear whose fmt is LK_FMT_EXTERN. */
enum { LK_FMT_EXTERN = 100 };

/* ---- lora: low-rank adapter updates (native/src/lora.c) --------------------------- */

/* One adapter's factors for one module: y += scale * (x . a^T) . b^T, a [r, cols] and
   b [rows, r], stored as `dtype` (LK_LORA_F32, or LK_LORA_F16 for a base that is not float32:
   half the bytes a step streams; the factors are then divided by a power of two, which
   `scale` carries, so their largest values are normal halves). b is packed by blocks of
   LK_LORA_BLOCK outputs: block i holds b[16 i + l][j] at bp[i * r * 16 + j * 16 + l] (rows
   padded with zeros to a whole block), so the up pass reads one contiguous stream with
   each column's 16 outputs in two vectors; a == NULL: this slot does not touch the module. */
enum { LK_LORA_BLOCK = 16, LK_LORA_F32 = 0, LK_LORA_F16 = 1 };
typedef struct {
    const void *a, *bp;
    int64_t r;
    float scale;
    int32_t dtype;
} lk_lora_factor;

/* Which slot each row of a call uses: slot[n] per row (-1: none), or, when slot is NULL,
   `uniform` for every row (-1: none). One per model, shared by its modules' tables. */
typedef struct {
    const int32_t *slot;
    int64_t n;
    int32_t uniform;
} lk_lora_rows;

/* A module's resident adapters: slots[n_slots] and the model's row selection. */
typedef struct {
    int64_t n_slots;
    const lk_lora_factor *slots;
    const lk_lora_rows *rows;
} lk_lora;

/* y [M, N] += each row's slot update for x [M, K]. Returns 0, -2 when the row selection
   does not cover M rows (or a slot has rank <= 0), -5 out of memory. */
int lk_lora_apply(const lk_lora *l, const float *x, int64_t M, int64_t K, int64_t N,
                  float *y);

/* A weight matrix [rows, cols] in format fmt (LK_FMT_*, or LK_FMT_EXTERN with its matmul
   in ext / ext_ctx, and optionally its grouped matmul for expert dispatch in ext_grouped,
   same ctx), rows ldw bytes apart, with an optional float32 bias [rows] and the resident
   adapters' low-rank updates (lora, NULL: none), added after the bias. */
typedef struct {
    int32_t fmt;
    const void *w;
    int64_t ldw, rows, cols;
    const float *bias;
    lk_extern_matmul ext;
    const void *ext_ctx;
    const lk_lora *lora;
    lk_extern_matmul_grouped ext_grouped;
} lk_linear;

/* An online rotation of a linear's input (QuaRot): lk_block_rotate(x, rows, m, block,
   mix) over rows of m * block floats; block = 0: none. */
typedef struct {
    const float *mix;
    int64_t m, block;
} lk_rotation;

typedef struct {
    const float *attn_norm, *mlp_norm; /* [hidden] */
    const float *q_norm, *k_norm;      /* [head_dim] per-head RMSNorm (qwen3), or NULL */
    lk_linear q, k, v, o, gate, up, down;
    /* QuaRot's online rotations of linears' inputs: the MLP activations before down (both
       bases), and for the inputs basis the normed stream before q/k/v and before gate/up
       and the attention output before o */
    lk_rotation down_in, attn_in, mlp_in, o_in;
    void *k_cache, *v_cache; /* [batch, cache_cap, n_kv_heads, row] in the model's kv_dtype */
    /* a mixture-of-experts MLP in place of gate / up / down (lk_moe_forward), or NULL */
    const struct lk_moe *moe;
    /* the keys' transform of a q8_0 cache ([n_kv_heads, head_dim] each, see lk_kv_store),
       or NULL */
    const float *k_shift, *k_scale;
} lk_decoder_layer;

/* Pre-norm decoder: x += o(attn(rope(q), rope(k), v)); x += down(silu(gate) * up). */
typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate;
    int64_t rope_half;        /* rotated pairs per head (head_dim / 2 for full rotary) */
    int32_t rope_interleaved; /* 0: pairs (i, half + i) as HF; 1: (2i, 2i + 1) */
    float eps;                /* RMSNorm epsilon */
    float norm_offset;        /* norms scale by (norm_offset + w) */
    lk_linear embed;          /* [vocab, hidden] */
    const float *final_norm;  /* [hidden] */
    lk_decoder_layer *layers; /* [n_layers] */
    int64_t cache_cap;        /* positions each sequence's cache rows hold */
    int32_t kv_dtype;         /* LK_KV_*: how the caches / pools store keys and values */
} lk_decoder;

/* Floats of workspace lk_decoder_step needs for `batch` sequences. */
int64_t lk_decoder_work_size(const lk_decoder *m, int64_t batch);
/* One decode step for `batch` sequences that all have `pos` tokens cached: embeds
   tokens[batch], runs every layer (writing k, v at position pos of each layer's cache),
   and writes the final-norm hidden states to hidden_out [batch, hidden]. cos/sin are the
   rotary tables for pos ([rope_half] each). Returns 0; -1 if a token is outside the
   embedding, -2 if pos >= cache_cap, -3 if work_len is too small, -4 for a weight
   format or shape the step cannot run (nothing is written then). */
int lk_decoder_step(const lk_decoder *m, const int64_t *tokens, int64_t batch, int64_t pos,
                    const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                    float *hidden_out);

/* The same step over a flat batch of n rows in a paged KV pool (continuous batching):
   row r is at the position its cos/sin rows ([n, rope_half]) were made for and writes its
   key and value to pool row slots[r] of every layer's k_pools[i] / v_pools[i]
   ([num_blocks, block_size, n_kv_heads, head_dim]); attention is lk_paged_attention over
   sequences q_start / pos_start / tables (as there). Prefill chunks and decode rows mix.
   Returns 0, -1 (token), -2 (rows, slots or tables outside the pool), -3 (work_len),
   -4 (weights), -5 (out of memory). */
/* Several rows of one sequence in a single step over the dense cache (sequence 0 of the
   bound cache; a speculative verify, a draft model catching up): row r embeds tokens[r]
   at position pos + r (cos / sin [T, rope_half], a row per row), writes its key and value
   there and attends causally to the cache and the rows before it. The matmuls read each
   weight once for all T rows; every row gets the bits lk_decoder_step gives it alone.
   Returns as lk_decoder_step (-2: pos + T > cache_cap). */
int lk_decoder_step_rows(const lk_decoder *m, const int64_t *tokens, int64_t T, int64_t pos,
                         const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                         float *hidden_out);
int lk_decoder_step_paged(const lk_decoder *m, const int64_t *tokens, int64_t n,
                          const float *cos_t, const float *sin_t, const int64_t *slots,
                          void *const *k_pools, void *const *v_pools, int64_t num_blocks,
                          int64_t block_size, int64_t nseq, const int64_t *q_start,
                          const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                          float *work, int64_t work_len, float *hidden_out);

/* ---- Gated DeltaNet (gated_deltanet.c) ------------------------------------------- */

/* Depthwise causal conv over time, in place: x [B, T, C] (strides sbx, stx; channels
   contiguous) becomes silu?(sum_tap w[tap, c] * x_ext[t + tap, c]) where x_ext is the
   K-1 rows of state [B, K-1, C] followed by x; state becomes the last K-1 rows of x_ext.
   w is [K, C] (tap K-1 multiplies the newest input). Returns 0, or -1 if K > 8 or a
   size is negative. */
int lk_causal_conv1d(float *x, int64_t B, int64_t T, int64_t C, int64_t sbx, int64_t stx,
                     const float *w, int64_t K, float *state, int silu);
/* The gated delta rule over T tokens of B sequences, updating state [B, Hv, Dk, Dv]
   (float32) in place. q, k [B, T, Hk, Dk] and v [B, T, Hv, Dv] share the batch / token
   strides sb, st (views into one fused qkv row); heads are contiguous. q and k are
   L2-normalised here (eps 1e-6) and q scaled by 1/sqrt(Dk); value head h reads key head
   h / (Hv / Hk). g (log decay) and beta are contiguous [B, T, Hv]. Per token:
   S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q. chunk = 0 runs that recurrence;
   chunk = C > 0 the equivalent chunked form, C tokens at a time. out is contiguous
   [B, T, Hv, Dv]. Returns 0, or -1 if the shapes are inconsistent. */
int lk_gated_delta_rule(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                        int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int64_t sb, int64_t st,
                        const float *g, const float *beta, float *state, int64_t chunk,
                        float *out);
/* lk_gated_delta_rule's token-by-token form (chunk = 0) that leaves state as it is: the
   outputs of T tokens ahead of it, each token's bits those of a decode step of it (a
   speculative verify; its accepted tokens are then replayed on the state, so rejected ones
   cost no state traffic). Returns 0, or -1 if the shapes are inconsistent. */
int lk_gated_delta_rule_ahead(const float *q, const float *k, const float *v, int64_t B,
                              int64_t T, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv,
                              int64_t sb, int64_t st, const float *g, const float *beta,
                              const float *state, float *out);
/* out = x / sqrt(mean(x^2) + eps) * w * silu(z) per row of length D (x, z, out
   contiguous [rows, D]). */
void lk_gated_rms_norm(const float *x, const float *z, int64_t rows, int64_t D,
                       const float *w, float eps, float *out);
/* out = 1 / (1 + e^-x) and out = log(1 + e^x) (x itself above 20), elementwise over n
   floats; out may be x. Scalar on every ISA (the gates are a few dozen values). */
void lk_sigmoid(const float *x, int64_t n, float *out);
void lk_softplus(const float *x, int64_t n, float *out);

/* ---- Qwen3.5 decode step (qwen35_decoder.c) ----------------------------------------- */

enum { LK_QWEN35_LINEAR = 0, LK_QWEN35_FULL = 1 };

typedef struct {
    int32_t kind;                      /* LK_QWEN35_LINEAR or LK_QWEN35_FULL */
    const float *attn_norm, *mlp_norm; /* [hidden], scaled by (1 + w) */
    /* Gated DeltaNet (LINEAR): in_qkv [2 key + value, hidden], in_z [value, hidden],
       in_b, in_a [v_heads, hidden], out [hidden, value] (key = k_heads * k_dim, value =
       v_heads * v_dim) */
    lk_linear in_qkv, in_z, in_b, in_a, out;
    const float *conv_w;        /* [conv_kernel, 2 key + value], tap K-1 the newest input */
    const float *neg_a;         /* [v_heads]: -exp(A_log) */
    const float *dt_bias;       /* [v_heads] */
    const float *head_norm;     /* [v_dim]: the gated RMSNorm's weight (scaled by w) */
    float *conv_state;          /* [batch, conv_kernel - 1, 2 key + value] */
    float *delta_state;         /* [batch, v_heads, k_dim, v_dim] */
    /* gated full attention (FULL): q [2 heads head_dim, hidden] (per head head_dim query
       rows then head_dim gate rows), k, v [kv_heads head_dim, hidden], o [hidden, heads
       head_dim]; q_norm, k_norm [head_dim] scaled by (1 + w) */
    lk_linear q, k, v, o;
    const float *q_norm, *k_norm;
    void *k_cache, *v_cache;    /* [batch, cache_cap, kv_heads, row] in the model's kv_dtype */
    const float *k_shift, *k_scale; /* a q8_0 cache's key transform (lk_decoder_layer) */
    /* SwiGLU MLP, with the optional online rotation before down as in lk_decoder_layer */
    lk_linear gate, up, down;
    lk_rotation down_in; /* the MLP activations before down (QuaRot) */
    /* a mixture-of-experts MLP in place of gate / up / down (lk_moe_forward), or NULL */
    const struct lk_moe *moe;
} lk_qwen35_layer;

typedef struct {
    int64_t n_layers, hidden, intermediate;
    int64_t n_heads, n_kv_heads, head_dim, rope_half; /* rope_half: rotated pairs per head */
    int64_t lin_k_heads, lin_v_heads, lin_k_dim, lin_v_dim, conv_kernel;
    float eps;                /* every RMSNorm's epsilon */
    lk_linear embed;          /* [vocab, hidden] */
    const float *final_norm;  /* [hidden], scaled by (1 + w) */
    lk_qwen35_layer *layers;  /* [n_layers] */
    int64_t cache_cap;        /* positions each sequence's KV rows hold */
    int32_t kv_dtype;         /* LK_KV_*: how the caches / pools store keys and values */
} lk_qwen35;

/* Floats of workspace lk_qwen35_step needs for `batch` sequences. */
int64_t lk_qwen35_work_size(const lk_qwen35 *m, int64_t batch);
/* One decode step for `batch` sequences that all have `pos` tokens cached: embeds
   tokens[batch]; runs every layer, updating the DeltaNet layers' conv and delta states
   and writing k, v at position pos of the attention layers' caches; writes the
   final-norm hidden states to hidden_out [batch, hidden]. cos/sin are the rotary tables
   for pos ([rope_half] each; rotate-half pairing). Returns 0; -1 if a token is outside
   the embedding, -2 if pos >= cache_cap, -3 if work_len is too small, -4 for a weight
   format or shape the step cannot run (nothing is written then). */
int lk_qwen35_step(const lk_qwen35 *m, const int64_t *tokens, int64_t batch, int64_t pos,
                   const float *cos_t, const float *sin_t, float *work, int64_t work_len,
                   float *hidden_out);
/* Several rows of one sequence over the bound dense hybrid cache (sequence 0), as
   lk_decoder_step_rows: row r at position pos + r; the DeltaNet layers run their
   recurrence token by token (each row's bits are a decode step's). trails: NULL, or per
   layer i at [2 * i] the conv window after each row ([T, K-1, conv]) and at [2 * i + 1]
   each row's delta-rule inputs ([T, conv + 2 Hv]: the conv's output row (q, k, v), then
   g and beta; NULL for attention layers); with trails the delta states are left as they
   were (lk_gated_delta_rule_ahead), so that a partial accept rolls back exactly by
   replaying the kept rows' inputs on them (lk_gated_delta_rule, chunk 0). Returns as lk_qwen35_step (-2: pos + T > cache_cap). */
int lk_qwen35_step_rows(const lk_qwen35 *m, const int64_t *tokens, int64_t T, int64_t pos,
                        const float *cos_t, const float *sin_t, float *const *trails,
                        float *work, int64_t work_len, float *hidden_out);
/* The same step over a flat batch of n rows of sequences in paged pools (continuous
   batching), as lk_decoder_step_paged: row r at the position its cos / sin rows
   ([n, rope_half]) were made for, its key and value written to pool row slots[r] of the
   attention layers' k_pools[i] / v_pools[i] ([num_blocks, block_size, n_kv_heads,
   head_dim]); sequence s (rows q_start[s] .. q_start[s + 1], positions from pos_start[s],
   block table tables[s]) keeps its DeltaNet states in slot state_slots[s] of the linear
   layers' conv_pools[i] ([num_state_slots, conv_kernel - 1, 2 key + value]) and
   delta_pools[i] ([num_state_slots, v_heads, k_dim, v_dim]). Pools are indexed by layer
   (the other kind's entries unused). A sequence's rows run the conv and the delta rule
   together (chunks of block_size), so prefill chunks and decode rows mix. Returns 0, -1
   (token), -2 (rows, slots, tables or state slots outside the pools), -3 (work_len), -4
   (weights, pools), -5 (out of memory). */
int lk_qwen35_step_paged(const lk_qwen35 *m, const int64_t *tokens, int64_t n,
                         const float *cos_t, const float *sin_t, const int64_t *slots,
                         void *const *k_pools, void *const *v_pools, int64_t num_blocks,
                         int64_t block_size, float *const *conv_pools,
                         float *const *delta_pools, int64_t num_state_slots,
                         const int64_t *state_slots, int64_t nseq, const int64_t *q_start,
                         const int64_t *pos_start, const int32_t *tables, int64_t max_blocks,
                         float *work, int64_t work_len, float *hidden_out);
/* lk_qwen35_step_paged with verified sequences (speculative decoding): trails is NULL
   (none) or holds 2 * nseq * n_layers pointers, at [2 * (s * n_layers + i)] sequence s's
   conv window after each of its rows in linear layer i ([rows, K-1, conv], conv =
   2 key + value) and at [... + 1] each row's delta-rule inputs ([rows, conv + 2 v_heads]:
   the conv's output row, then g and beta), NULL for sequences (and layers) not verified.
   A verified sequence's rows run the delta rule token by token without writing its delta
   state (lk_gated_delta_rule_ahead): replaying the kept rows' inputs on it
   (lk_gated_delta_rule, chunk 0) leaves bit for bit what decode steps of them leave. */
int lk_qwen35_step_paged_trail(const lk_qwen35 *m, const int64_t *tokens, int64_t n,
                               const float *cos_t, const float *sin_t, const int64_t *slots,
                               void *const *k_pools, void *const *v_pools,
                               int64_t num_blocks, int64_t block_size,
                               float *const *conv_pools, float *const *delta_pools,
                               int64_t num_state_slots, const int64_t *state_slots,
                               int64_t nseq, const int64_t *q_start, const int64_t *pos_start,
                               const int32_t *tables, int64_t max_blocks,
                               float *const *trails, float *work, int64_t work_len,
                               float *hidden_out);
/* Causal GQA for a flat batch of sequences over a paged KV pool (paged_attention.c).
   q and out: contiguous [N, Hq, D], sequence i owning rows q_start[i] .. q_start[i+1]-1
   (q_start has nseq + 1 entries) at positions pos_start[i] + t; k_pool, v_pool:
   contiguous [num_blocks, block_size, Hkv, D]; block_tables: int32 [nseq, max_blocks].
   Returns 0, -1 on inconsistent shapes, -2 out of memory. */
int lk_paged_attention(const float *q, int64_t Hq, int64_t D, const float *k_pool,
                       const float *v_pool, int64_t block_size, int64_t Hkv, int64_t nseq,
                       const int64_t *q_start, const int64_t *pos_start,
                       const int32_t *block_tables, int64_t max_blocks, float scale,
                       float *out);
/* lk_paged_attention over pools stored as dtype (LK_KV_*, see lk_attention_kv): pools
   [num_blocks, block_size, Hkv, row] of lk_kv_row_bytes(dtype, D) bytes per row; k_scale
   [Hkv, D] or NULL. */
int lk_paged_attention_kv(const float *q, int64_t Hq, int64_t D, int32_t dtype,
                          const void *k_pool, const void *v_pool, const float *k_scale,
                          int64_t block_size, int64_t Hkv, int64_t nseq,
                          const int64_t *q_start, const int64_t *pos_start,
                          const int32_t *block_tables, int64_t max_blocks, float scale,
                          float *out);
/* ---- mixture of experts (moe.c) ------------------------------------------------- */

#define LK_MOE_EXPERTS_MAX 1024
#define LK_MOE_TOPK_MAX 64

/* A sparse MoE MLP: router [n_experts, hidden]; per expert gate, up [inter, hidden] and
   down [hidden, inter] (arrays of n_experts; every gate / up one format, every down one
   format, no biases); optionally (shared_inter > 0) a shared expert sh_gate, sh_up
   [shared_inter, hidden], sh_down [hidden, shared_inter] scaled by sigmoid(sh_score . x),
   sh_score [1, hidden]. */
typedef struct lk_moe {
    int64_t hidden, n_experts, top_k, inter, shared_inter;
    int32_t normalize; /* divide the top-k probabilities by their sum */
    lk_linear router;
    const lk_linear *gate, *up, *down;
    lk_linear sh_gate, sh_up, sh_down, sh_score;
} lk_moe;

/* Whether the description is complete and consistent (1) or not (0). */
int lk_moe_ok(const lk_moe *m);
/* out [n, hidden] = the MoE MLP of x [n, hidden]: per row softmax(router . x) over all
   experts, the top_k by router logit (ties to the lower id), weights renormalised when
   `normalize`; the rows are grouped by expert and each selected expert multiplies its rows
   in one few-row matmul (every expert read once per call); each row sums its experts in
   ascending expert order, then adds the shared expert. Returns 0, -4 (description), -5
   (out of memory, or a plugin matmul failed). */
int lk_moe_forward(const lk_moe *m, const float *x, int64_t n, float *out);
/* y_i [M_i, N_i] = x[row0_i : row0_i + M_i] @ W_i^T for n matrices of one core format
   (LK_FMT_*) and one K, each reading its own rows of the contiguous x [*, K], as one
   parallel job (x quantized once for q8_0). Returns 0, -1 (format, K or shapes), -2 (out
   of memory). */
int lk_matmul_grouped(int fmt, const float *x, int64_t K, int64_t n, const int64_t *row0,
                      const int64_t *M, const void *const *w, const int64_t *ldw,
                      const int64_t *N, float *const *y);

/* ---- rotate --------------------------------------------------------------------- */

/* out[r] = x[r] @ (mix kron H_block) / sqrt(block) for rows r of m * block floats, with
   mix [m, m] row-major (mix[i * m + j] weights group i into output group j) and block a
   power of two (H_block the Sylvester Hadamard matrix). out may equal x only when m == 1.
   Returns 0, or -1 for a bad shape. */
int lk_block_rotate(const float *x, int64_t rows, int64_t m, int64_t block, const float *mix,
                    float *out);

/* ---- bench ---------------------------------------------------------------------- */

/* Sum of the buffer read as float32 with all threads (AVX2 loads when available), each
   thread streaming contiguous 4 MiB pieces; prefetch != 0 adds a software prefetch 4 KiB
   ahead. nbytes is rounded down to a multiple of 32. */
double lk_bench_read(const void *buf, int64_t nbytes, int prefetch);

/* ---- encoder attention (encoder_attention.c) ---------------------------------------- */

/* Bidirectional attention of a right-padded batch: q, k, v, out [B, T, H, D] contiguous;
   keys s < lengths[b] (1..T) are real, the rest padding nobody attends to. Returns 0, -1
   on bad sizes or lengths, -5 out of memory. */
int lk_encoder_attention(const float *q, const float *k, const float *v, int64_t B, int64_t T,
                         int64_t H, int64_t D, const int64_t *lengths, float scale,
                         float *out);
/* The same over packed sequences: q, k, v, out [N, H, D] contiguous, sequence b the rows
   offsets[b] .. offsets[b + 1] (offsets[0] = 0, each at least one row), every row attending
   to every row of its sequence. Returns 0, -1 on bad offsets or sizes, -5 out of memory. */
int lk_encoder_attention_packed(const float *q, const float *k, const float *v, int64_t B,
                                const int64_t *offsets, int64_t H, int64_t D, float scale,
                                float *out);

/* ---- float32 weights on AMX-BF16, bf16x3 (matmul_amx.c) ----------------------------- */

/* Whether this process can run lk_matmul_bf16x3: the CPU has AMX-BF16 and AVX512-BF16,
   LATTICE_ISA is not generic, LATTICE_AMX is not 0, and Linux granted the tile state. */
int lk_amx_bf16x3_ready(void);
/* uint16 values of W [N, K] packed for lk_matmul_bf16x3 (its high and low bf16 parts). */
int64_t lk_bf16x3_packed_size(int64_t N, int64_t K);
/* Pack float32 W [N, K] (N and K multiples of 32) into out. Returns 0, -1 on bad sizes. */
int lk_bf16x3_pack(const float *w, int64_t N, int64_t K, uint16_t *out);
/* y[M, N] = x[M, K] @ W^T from W packed by lk_bf16x3_pack, as float32 sums of the bf16x3
   products (relative error ~4e-6; not the float32 kernels' bits). Returns 0, -1 on bad
   sizes, -2 when AMX is not ready, -5 out of memory. */
int lk_matmul_bf16x3(const float *x, int64_t M, int64_t K, const uint16_t *packed, int64_t N,
                     float *y);

/* ---- float32 weights in column panels, for encoders on AVX2 (matmul_panels.c) ------- */

/* Whether this process runs lk_matmul_f32_panels: an AVX2 CPU without AVX-512 (those run
   their float32 passes on 512-bit kernels), LATTICE_ISA not generic, LATTICE_PANELS not 0. */
int lk_f32_panels_ready(void);
/* Floats of W [N, K] packed for lk_matmul_f32_panels (-1 on bad sizes). */
int64_t lk_f32_panels_size(int64_t N, int64_t K);
/* Pack float32 W [N, K] (N a multiple of 16) into out, panels of 16 weight rows with the
   16 values of each k together. Returns 0, -1 on bad sizes. */
int lk_f32_panels_pack(const float *w, int64_t N, int64_t K, float *out);
/* y[M, N] = x[M, K] @ W^T from W packed by lk_f32_panels_pack (32-byte aligned): each
   output one float32 FMA chain along K (not the float32 kernels' lane-and-tree sums, so
   not their bits; the same bits for a row in any batch). Returns 0, -1 on bad sizes or
   alignment, -2 when lk_f32_panels_ready() is 0, -5 out of memory. */
int lk_matmul_f32_panels(const float *x, int64_t M, int64_t K, const float *packed, int64_t N,
                         float *y);

/* ---- vector distances and top-k search (distance.c) -------------------------------- */

#define LK_METRIC_DOT 0
#define LK_METRIC_COSINE 1
#define LK_METRIC_L2 2
/* One pair of n-vectors: dot, cosine similarity or squared L2 distance (metric). int8 sums
   are exact (returned as double). */
float lk_distance_f32(const float *a, const float *b, int64_t n, int metric);
double lk_distance_i8(const int8_t *a, const int8_t *b, int64_t n, int metric);
/* Exact top-k of each of nq queries [nq, d] against n stored vectors db [n, d]: ids and
   scores [nq, k], best first (highest dot / cosine, lowest squared L2; ties: lower id
   first). db_norms: |row| of each stored row for cosine (NULL: computed). Returns 0, -1
   on bad sizes (k must lie in 1..n), -5 out of memory. */
int lk_topk_f32(const float *q, int64_t nq, const float *db, int64_t n, int64_t d, int metric,
                int64_t k, const float *db_norms, int64_t *ids, float *scores);
int lk_topk_i8(const int8_t *q, int64_t nq, const int8_t *db, int64_t n, int64_t d, int metric,
               int64_t k, const float *db_norms, int64_t *ids, float *scores);
/* The rows that can be in the exact top k of each query, from an approximate pass with an
   error bound: approximate score s = A[qi, i] m[i] p[qi] + o[i] (A [nq, n]), true score
   within (alpha[qi] r[i] + beta[qi] xn[i]) |m[i] p[qi]| + e[i] of s. cand [nq, cap]: the rows with
   s + bound >= the k-th largest s - bound, in id order; counts[qi]: how many (more than cap:
   only the first cap written). Returns 0, -1 on bad sizes (cap >= k), -5 out of memory. */
int lk_topk_candidates(const float *A, int64_t nq, int64_t n, int64_t k, const float *m,
                       const float *o, const float *r, const float *xn, const float *e,
                       const float *p, const float *alpha, const float *beta, int64_t cap,
                       int64_t *cand, int64_t *counts);
/* Every score [nq, n] (metric as above, L2 unnegated). Returns 0 or -1. */
int lk_scores_f32(const float *q, int64_t nq, const float *db, int64_t n, int64_t d, int metric,
                  float *out);
int lk_scores_i8(const int8_t *q, int64_t nq, const int8_t *db, int64_t n, int64_t d, int metric,
                 float *out);
/* The distance kernels' variant: 0 generic, 1 avx2, 2 avx512; v = -1 asks, -2 resets to
   the best, another v forces it if the CPU runs it. Returns the active one. */
int lk_distance_variant(int v);
const char *lk_distance_variant_name(int v);
/* Bit v set: the CPU runs variant v. */
int lk_distance_variants(void);

/* LK_CDEF_END */

/* ---- internal: shared between the native sources, not part of the binding ------------ */
#ifdef LK_INTERNAL

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LK_X86 1
#else
#define LK_X86 0
#endif

#include <math.h>

#define LK_MAX_THREADS 64
#define LK_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

/* fn(ctx, task, ith) for every task in [0, ntasks): tasks are claimed one at a time by
   the caller (ith = 0) and by the workers that join (ith = 1 ..); ith names the thread
   for lk_scratch. Must be called with lk_lock held. */
typedef void (*lk_task_fn)(void *ctx, int64_t task, int ith);
void lk_parallel(lk_task_fn fn, void *ctx, int64_t ntasks);
void lk_lock(void);
void lk_unlock(void);
/* Thread count (including the caller); call with lk_lock held. */
int lk_threads_locked(void);
/* Per-thread scratch of at least `bytes` (64-byte aligned), kept between calls. Only
   thread `ith` may use slot `ith`; callers must hold lk_lock. NULL on out-of-memory. */
void *lk_scratch(int ith, size_t bytes);
/* Shared scratch for data produced before lk_parallel and read by all tasks. */
void *lk_shared_scratch(size_t bytes);
/* A buffer of at least `bytes` (64-byte aligned) owned by the calling host thread, grown on
   demand and kept (a fresh allocation per call page-faults on every call): *buf and *cap
   are the caller's __thread variables, so threads never share one and no lock is needed.
   NULL on out-of-memory (the old buffer stays). */
void *lk_thread_buffer(void **buf, size_t *cap, size_t bytes);
extern int lk_active_isa;

/* matmul.c: lk_matmul_multi with more work in its parallel job: n_pre independent tasks
   pre(ctx, t, ith) claimed before any chunk of rows (the adapters' down pass), and
   post(ctx, i, r0, r1, ith) run on output rows [r0, r1) of matrix i (its index in the
   call) by the thread that just computed them (NULL: none; the bias). Same checks and
   returns as lk_matmul_multi. */
typedef struct {
    int64_t n_pre;
    lk_task_fn pre;
    void (*post)(void *ctx, int i, int64_t r0, int64_t r1, int ith);
    void *ctx;
} lk_mm_hooks;
int lk_matmul_multi_hooked(int fmt, const float *x, int64_t M, int64_t K, int n,
                           const void *const *w, const int64_t *ldw, const int64_t *N,
                           float *const *y, const lk_mm_hooks *hooks);

/* lora.c: the adapters' updates (and the biases) of up to LK_MATMUL_MULTI_MAX linears
   reading one x [M, K], rows grouped by slot (see lora.c). lk_lora_plan_make returns 0
   (active: there is a down pass to run), -2 when the row selection does not cover M rows
   or a slot has rank <= 0, -5 out of memory; lk_lora_plan_free after the jobs. The down
   pass is ndown independent tasks lk_lora_plan_down(plan, t, ith), to claim before any
   matmul chunk; lk_lora_plan_post(plan, i, r0, r1, ith), once outputs [r0, r1) of linear
   i are written, adds their bias and their up pass if the down pass is finished, else
   leaves them pending; lk_lora_plan_run_up (after the job; takes lk_lock) runs the
   pending ones as nup tasks lk_lora_plan_up. */
typedef struct {
    int n, active;
    const lk_lora *l[LK_MATMUL_MULTI_MAX];     /* NULL: no factors in any slot */
    const float *bias[LK_MATMUL_MULTI_MAX];
    float *y[LK_MATMUL_MULTI_MAX];
    float *t[LK_MATMUL_MULTI_MAX];             /* [M, rmax] each: scale * x . A^T */
    int64_t N[LK_MATMUL_MULTI_MAX], rmax[LK_MATMUL_MULTI_MAX];
    const float *x;
    int64_t M, K;
    int64_t ngroups, *gslot, *gstart, *grow;   /* rows by slot: grow[gstart[g] ..] */
    int64_t nunits, *ustart, ndown;            /* down units by (linear, group) */
    int64_t upstart[LK_MATMUL_MULTI_MAX + 1], nup; /* up tasks by linear */
    int64_t pstart[LK_MATMUL_MULTI_MAX + 1];   /* pending bitmap words by linear */
    _Atomic uint64_t *pending;
    _Atomic int any_pending, all;
    _Atomic int64_t down_done;
    void *heap;
    int64_t stack[1024];
} lk_lora_plan;
int lk_lora_plan_make(lk_lora_plan *p, int n, const lk_lora *const *l,
                      const float *const *bias, float *const *y, const int64_t *N,
                      const float *x, int64_t M, int64_t K);
void lk_lora_plan_down(void *ctx, int64_t t, int ith);
void lk_lora_plan_up(void *ctx, int64_t t, int ith);
void lk_lora_plan_run_up(lk_lora_plan *p);
void lk_lora_plan_post(void *ctx, int i, int64_t r0, int64_t r1, int ith);
void lk_lora_plan_free(lk_lora_plan *p);

/* step_linear.c: shared by the fused decode steps */
int lk_step_linear_ok(const lk_linear *l, int64_t rows, int64_t cols);
int lk_step_linears(const lk_linear *const *l, float *const *y, int n, const float *x,
                    int64_t M);
/* Whether lk_step_embed can look rows up in e: a core format, or a GGUF block type the
   core runs as stored (lk_matmul_ggml_extern), with `cols` columns. */
int lk_step_embed_ok(const lk_linear *e, int64_t cols);
int lk_step_embed(const lk_linear *e, const int64_t *ids, int64_t n, float *out);
/* Where a fused step's keys and values go and how attention reads them: each layer's
   contiguous cache at one position for every row (dense steps), or the layers' paged pools
   with a position per row (the paged steps). */
typedef struct {
    int paged;
    int64_t pos; /* dense */
    /* dense, one sequence: 0, or the rows of sequence 0 (> 1 for a multi-row step: row r
       at position pos + r, causal among them; the rope tables have a row per row) */
    int64_t rows;
    /* paged: rows [n] at slots, sequences [nseq] by q_start / pos_start / tables */
    const int64_t *slots, *q_start, *pos_start;
    const int32_t *tables;
    int64_t nseq, max_blocks, block_size;
    void *const *k_pools, *const *v_pools; /* per layer */
} lk_step_kv;
/* t for a paged batch of n rows, as lk_decoder_step_paged takes it; -2 (nothing set) when
   a row, slot or table lies outside the pool of num_blocks x block_size rows, else 0. */
int lk_step_kv_paged(lk_step_kv *t, int64_t n, int64_t num_blocks, int64_t block_size,
                     int64_t nseq, const int64_t *q_start, const int64_t *pos_start,
                     const int32_t *tables, int64_t max_blocks, const int64_t *slots,
                     void *const *k_pools, void *const *v_pools);
/* Layer `layer`'s keys and values of B rows (k, v [B, Hkv * D]) stored where t says (dense:
   k_cache / v_cache [B, cache_cap, Hkv, D] at t->pos), then attention of q [B, Hq * D]
   over them into attn. Returns 0, or -5 out of scratch memory. */
int lk_step_attend(const lk_step_kv *t, int64_t layer, int32_t dtype, void *k_cache,
                   void *v_cache, const float *k_shift, const float *k_scale,
                   int64_t cache_cap, const float *q, const float *k, const float *v,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, float scale, float *attn);
/* Whether r is none or fits rows of `width` floats; x rotated into out when r is set
   (returns out), else x itself. */
int lk_step_rotation_ok(const lk_rotation *r, int64_t width);
const float *lk_step_rotated(const lk_rotation *r, const float *x, int64_t rows, float *out);

/* fn(ctx, i0, i1, ith) over [0, n) in contiguous ranges, a few per thread; runs inline
   (no lock, no pool) when n < 2 * grain. Takes lk_lock itself otherwise: do not call
   it with the lock held. Plugins reach it as lk_plugin_api.parallel_for. */
void lk_parallel_for(lk_range_fn fn, void *ctx, int64_t n, int64_t grain);

float lk_f16_to_f32(uint16_t h);
uint16_t lk_f32_to_f16(float f);

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
/* e^x for 8 floats: Cody-Waite range reduction to r in [-ln2/2, ln2/2], a degree-7
   polynomial for e^r, then the exponent added back; about 2 ulp. Saturates to +inf above
   88.38, flushes to 0 below -87.33 (where results would be subnormal), keeps NaN. */
LK_AVX2_TARGET static inline __m256 lk_exp8_avx2(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 lo = _mm256_set1_ps(-87.3365447505531f);
    __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(hi, _mm256_max_ps(lo, x)); /* operand order keeps NaN */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    p = _mm256_blendv_ps(p, _mm256_set1_ps(__builtin_inff()), over);
    return _mm256_andnot_ps(under, p);
}

LK_AVX2_TARGET static inline float lk_hsum8_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* o[i] = exp(x[i] - m) for i < n (o may be x); returns their sum. The shared core of
   softmax and of attention's online softmax. */
LK_AVX2_TARGET static inline float lk_exp_sum_avx2(const float *x, int64_t n, float m,
                                                   float *o) {
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = lk_exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        vs = _mm256_add_ps(vs, e);
        _mm256_storeu_ps(o + i, e);
    }
    float sum = lk_hsum8_avx2(vs);
    for (; i < n; i++) {
        o[i] = expf(x[i] - m);
        sum += o[i];
    }
    return sum;
}

/* In-place transpose of an 8 x 8 block of 32-bit lanes: r[i] lane e -> r[e] lane i. */
LK_AVX2_TARGET static inline void lk_transpose8x8_avx2(__m256i r[8]) {
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    r[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
    r[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
    r[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
    r[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
    r[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
    r[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
    r[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
    r[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
}

/* Attention's weighted sum of values: o[0..D) = o * corr + sum_{s < n} p[s] v_s, the rows
   v_s given by pointer (strided or paged alike); one FMA chain per output lane in s order. */
LK_AVX2_TARGET static inline void lk_pv_rows_avx2(float *o, float corr, const float *p,
                                                  const float *const *vrows, int64_t n,
                                                  int64_t D) {
    const __m256 c = _mm256_set1_ps(corr);
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) {
        __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(o + d0), c);
        __m256 c1 = _mm256_mul_ps(_mm256_loadu_ps(o + d0 + 8), c);
        __m256 c2 = _mm256_mul_ps(_mm256_loadu_ps(o + d0 + 16), c);
        __m256 c3 = _mm256_mul_ps(_mm256_loadu_ps(o + d0 + 24), c);
        for (int64_t s = 0; s < n; s++) {
            const float *vr = vrows[s] + d0;
            const __m256 ps = _mm256_broadcast_ss(p + s);
            c0 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr), c0);
            c1 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + 8), c1);
            c2 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + 16), c2);
            c3 = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vr + 24), c3);
        }
        _mm256_storeu_ps(o + d0, c0);
        _mm256_storeu_ps(o + d0 + 8, c1);
        _mm256_storeu_ps(o + d0 + 16, c2);
        _mm256_storeu_ps(o + d0 + 24, c3);
    }
    for (; d0 + 8 <= D; d0 += 8) {
        __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(o + d0), c);
        for (int64_t s = 0; s < n; s++)
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + s), _mm256_loadu_ps(vrows[s] + d0), c0);
        _mm256_storeu_ps(o + d0, c0);
    }
    for (; d0 < D; d0++) {
        float a = o[d0] * corr;
        for (int64_t s = 0; s < n; s++) a += p[s] * vrows[s][d0];
        o[d0] = a;
    }
}

LK_AVX2_TARGET static inline float lk_hmax8_avx2(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ggml_dequant.c: one block of a type lk_ggml_block_shape takes -> its values at y (at
   most LK_GGML_MAX_BLOCK) */
#define LK_GGML_MAX_BLOCK 256
void lk_ggml_block_to_f32(int type, const uint8_t *blk, float *y);
/* rows of K values stored as ggml type `type` at src: what the converters walk, a block
   (block_values values, block_bytes bytes) at a time */
typedef struct {
    int type;
    const uint8_t *src;
    int64_t K, row_bytes, block_values, block_bytes;
} lk_ggml_rows;

#endif /* LK_INTERNAL */

#ifdef __cplusplus
}
#endif
#endif /* LATTICE_KERNELS_H */
