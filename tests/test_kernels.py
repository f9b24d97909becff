"""Native kernels vs the numpy reference (lattice_engine.ops), table-driven over every core
weight format and every kernel variant (generic scalar, AVX2, AVX-VNNI, AVX512-VNNI): a
variant this CPU lacks shows as a skip naming the missing flag.

Skips when the native module is not built, and fails under LATTICE_REQUIRE_NATIVE=1 (CI).
"""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import kernels, ops
from lattice_engine.quant import core_formats
from lattice_engine.quant.core_formats import CORE_FORMATS
from lattice_engine.quant.formats import PackedMatrix, pack
from lattice_engine.testing.pytest_plugin import KERNEL_VARIANTS, core_variant, variant_skip_reason
from lattice_engine.testing.tolerance import attention_bound

# The native marker skips these when the module was never built and fails them when it
# was built but does not load, or under LATTICE_REQUIRE_NATIVE=1 (CI).
pytestmark = pytest.mark.native


def test_native_module_loads():
    assert kernels.available(), f"lattice_engine._native does not load: {kernels.LOAD_ERROR}"


def test_every_variant_this_cpu_has_is_selectable():
    # the kernels' own detection against /proc/cpuinfo: a variant the CPU has but the
    # kernels do not offer would otherwise leave its code untested without a word
    for name in KERNEL_VARIANTS:
        if variant_skip_reason(name) is None:
            with core_variant(name):
                pass


@pytest.fixture(params=["generic", "avx2"])
def isa(request):
    """The ISA levels of the elementwise kernels (they have no VNNI variants)."""
    with core_variant(request.param) as name:
        yield name


@pytest.fixture(params=KERNEL_VARIANTS)
def variant(request):
    """Every kernel variant: generic, and each q8_0 kernel at the avx2 level (which also
    picks the AVX-512 f32 / f16 few-rows kernels with avx512vnni)."""
    with core_variant(request.param) as name:
        yield name


# Per-format thresholds, in the spirit of ggml's test-quantize-fns:
#   roundtrip: relative RMS error of to_float(quantize(w)) on Gaussian weights;
#   matmul:    error of the native matmul vs ops.matmul (dequantized W, float x; q8_0
#              additionally rounds x to int16 blocks, ~1e-5 relative per value),
#              relative to |x| @ |W|^T so that outputs that cancel to near zero do not
#              inflate it;
#   exact:     the same error vs a float64 emulation of exactly what the kernel computes.
THRESHOLDS = {
    "f32": {"roundtrip": 0.0, "matmul": 1e-6, "exact": 1e-6},
    "f16": {"roundtrip": 5e-4, "matmul": 1e-6, "exact": 1e-6},
    "q8_0": {"roundtrip": 8e-3, "matmul": 1e-5, "exact": 1e-7},
}


def test_every_core_format_has_thresholds_and_kernels():
    for fmt in CORE_FORMATS:
        assert fmt.name in THRESHOLDS, f"add thresholds for {fmt.name}"
        assert kernels.supports(fmt)
        assert kernels.format_matmul(fmt.name) is not None
        assert kernels.format_embed(fmt.name) is not None


def rel(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (den if den else 1.0)


def matmul_error(got: np.ndarray, ref: np.ndarray, x: np.ndarray, w: PackedMatrix) -> float:
    scale = np.abs(x.astype(np.float64)) @ np.abs(w.to_float().astype(np.float64)).T
    return float(np.linalg.norm(got.astype(np.float64) - ref)) / max(float(np.linalg.norm(scale)), 1e-30)


def q16_act_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the kernel does to activations: per 32 values d = amax / 32767 in float32
    (0 when amax < 1e-30), q = round-half-even(x * (1 / d)) clamped to +-32767, int16."""
    m, k = x.shape
    blocks = x.reshape(m, k // 32, 32).astype(np.float32)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    d = np.where(amax < np.float32(1e-30), np.float32(0), amax / np.float32(32767)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -32767, 32767).astype(np.int16)
    return q, d[..., 0]


def exact_reference(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """float64 emulation of the kernel's arithmetic (integer dots for q8_0)."""
    if w.format.name != "q8_0":
        return (x.astype(np.float64) @ w.to_float().astype(np.float64).T)
    n, k = w.shape
    blocks = w.data.reshape(n, k // 32, 34)
    wd = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0].astype(np.float64)
    wq = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.int64)
    xq, xd = q16_act_reference(x)
    dots = np.einsum("mbi,nbi->mnb", xq.astype(np.int64), wq)  # exact integers
    return np.einsum("mnb,mb,nb->mn", dots.astype(np.float64), xd.astype(np.float64), wd)


def make_weight(fmt, n: int, k: int, rng) -> PackedMatrix:
    return pack(fmt, "w", rng.standard_normal((n, k)).astype(np.float32))


# ---- formats: quantize round trip and native quantize --------------------------------------

@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_roundtrip_error(fmt):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((67, 256)).astype(np.float32)
    back = pack(fmt, "w", w).to_float()
    err = rel(back, w)
    assert err <= THRESHOLDS[fmt.name]["roundtrip"], f"{fmt.name}: round-trip error {err:.2e}"


def test_native_quantize_q8_0_is_bit_identical():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((45, 320)).astype(np.float32) * 3
    w[0, :32] = 0.0                                  # all-zero block: scale 0
    w[1, :32] = np.linspace(-1, 1, 32)               # exact ties at +-0.5 steps
    w[2, 32:64] = 1e-6 * rng.standard_normal(32)     # subnormal half scale
    w[3, :] = 65000.0                                # scale at the top of the half range
    ref = core_formats.quantize_q8_0(w)
    got = kernels.quantize_q8_0(w)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    # a matrix big enough to be split across threads
    big = rng.standard_normal((600, 1024)).astype(np.float32)
    np.testing.assert_array_equal(kernels.quantize_q8_0(big), core_formats.quantize_q8_0(big))


def test_native_quantize_q8_0_variants_agree_on_non_finite_blocks():
    """Blocks holding NaN or an infinity (the vector kernel hands them to the scalar one):
    every variant writes the same bytes, and the finite blocks beside them are untouched."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 128)).astype(np.float32)
    w[0, 3], w[1, 40], w[2, 70] = np.nan, np.inf, -np.inf
    w[3, :] = -0.0
    before = kernels.isa()
    try:
        kernels.set_isa("generic")
        generic = kernels.quantize_q8_0(w)
        kernels.set_isa("avx2")
        got = kernels.quantize_q8_0(w)
    finally:
        kernels.set_isa(before)
    np.testing.assert_array_equal(got, generic)
    finite = np.isfinite(w.reshape(4, 4, 32)).all(axis=2).reshape(-1)
    ref = core_formats.quantize_q8_0(np.where(np.isfinite(w), w, 0).astype(np.float32))
    np.testing.assert_array_equal(got.reshape(16, 34)[finite], ref.reshape(16, 34)[finite])


# ---- matmul --------------------------------------------------------------------------------

def _k_values(fmt) -> list[int]:
    # multiples of the block size; f32/f16 also get odd K (scalar tails) and the q8_0 set
    # crosses the prefill K-slice boundaries (256 values / 32 blocks)
    if fmt.block_size == 32:
        return [32, 96, 1056]
    return [7, 37, 96, 300]


MATMUL_CASES = [(fmt, k, n, m) for fmt in CORE_FORMATS for k in _k_values(fmt)
                for n in (1, 5, 37) for m in (1, 3, 17)]


@pytest.mark.parametrize("fmt,k,n,m", MATMUL_CASES,
                         ids=[f"{f.name}-K{k}-N{n}-M{m}" for f, k, n, m in MATMUL_CASES])
def test_matmul_matches_reference(variant, fmt, k, n, m):
    isa = variant
    rng = np.random.default_rng(k * 1000 + n * 10 + m)
    w = make_weight(fmt, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    got = kernels.matmul(x, w)
    assert got.shape == (m, n) and got.dtype == np.float32
    lim = THRESHOLDS[fmt.name]
    err = matmul_error(got, ops.matmul(x, w), x, w)
    assert err <= lim["matmul"], f"{isa} {fmt.name}: error vs ops.matmul {err:.2e}"
    err = matmul_error(got, exact_reference(x, w), x, w)
    assert err <= lim["exact"], f"{isa} {fmt.name}: error vs exact emulation {err:.2e}"


@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_matmul_many_chunks_and_threads(variant, fmt):
    # enough rows for several parallel chunks (decode and prefill), odd N, odd M
    rng = np.random.default_rng(3)
    w = make_weight(fmt, 1029, 128, rng)
    for m in (1, 5, 8, 9, 14):  # decode, the few-rows path and its edge, prefill (odd, MR tails)
        x = rng.standard_normal((m, 128)).astype(np.float32)
        ref = exact_reference(x, w)
        outs = []
        for t in (1, 2, 3):
            kernels.set_threads(t)
            outs.append(kernels.matmul(x, w))
        kernels.set_threads(2)
        for got in outs:
            assert matmul_error(got, ref, x, w) <= THRESHOLDS[fmt.name]["exact"]
        # the same arithmetic whatever the thread count
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_array_equal(outs[0], outs[2])


# batch invariance: the same x row gives the same bits whatever else is in the batch
BATCH_MS = list(range(1, 10)) + [16, 63, 64, 65, 70]  # q8_0 streams up to 64 rows


def _invariance_shapes(fmt) -> list[tuple[int, int]]:
    # [N, K]: odd N (row-group tails) and N over several chunks; K crossing the prefill K
    # slices (q8_0: 16 blocks; f32/f16: 256 values) and, for f32/f16, scalar tails and a
    # K whose x rows are 4 KiB apart (the AVX2 prefill copies those into a block first)
    if fmt.block_size == 32:
        return [(37, 96), (301, 1056)]
    return [(37, 37), (301, 520), (45, 1100), (70, 1024)]


@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_matmul_rows_are_batch_invariant(variant, fmt):
    """Row i of an M-row matmul equals, bit for bit, the 1-row matmul of x row i, for every
    M (decode, the few-rows path, prefill): batched decoding gives a request the bits it
    gets alone."""
    rng = np.random.default_rng(8)
    for n, k in _invariance_shapes(fmt):
        w = make_weight(fmt, n, k, rng)
        x = rng.standard_normal((max(BATCH_MS), k)).astype(np.float32)
        alone = np.stack([kernels.matmul(x[i:i + 1], w)[0] for i in range(len(x))])
        for m in BATCH_MS:
            got = kernels.matmul(x[:m], w)
            for i in range(m):
                assert np.array_equal(got[i], alone[i]), \
                    f"{variant} {fmt.name} N={n} K={k}: row {i} of M={m} differs from M=1 " \
                    f"(max |diff| {np.abs(got[i] - alone[i]).max():.3g})"


@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_matmul_leading_dims_out_and_noncontiguous(fmt):
    rng = np.random.default_rng(4)
    w = make_weight(fmt, 19, 64, rng)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    ref = kernels.matmul(x.reshape(6, 64), w).reshape(2, 3, 19)
    out = np.full((2, 3, 19), np.nan, dtype=np.float32)
    got = kernels.matmul(x, w, out=out)
    assert got is out
    np.testing.assert_array_equal(got, ref)
    xt = np.asfortranarray(x.reshape(6, 64))                   # non-contiguous input
    np.testing.assert_array_equal(kernels.matmul(xt, w), ref.reshape(6, 19))
    np.testing.assert_array_equal(kernels.matmul(x.astype(np.float64), w), ref)
    with pytest.raises(ValueError):
        kernels.matmul(np.zeros((1, 32), np.float32), w)
    with pytest.raises(ValueError):
        kernels.matmul(x, w, out=np.empty((6, 19), np.float32))


@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_format_table_kernels(fmt):
    """The functions attach_native puts into the WeightFormat table."""
    rng = np.random.default_rng(5)
    w = make_weight(fmt, 13, 64, rng)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    mm = kernels.format_matmul(fmt.name)
    np.testing.assert_array_equal(mm(x, w.data), kernels.matmul(x, w))
    em = kernels.format_embed(fmt.name)
    ids = np.array([0, 12, 5])
    np.testing.assert_array_equal(em(w.data, ids), ops.embed(w, ids))


def test_attach_native_sets_core_format_kernels():
    import dataclasses

    # work on copies so the shared core formats stay as other tests expect
    copies = tuple(dataclasses.replace(f) for f in CORE_FORMATS)
    assert core_formats.attach_native(copies)
    for f in copies:
        assert f.matmul is not None and f.embed is not None
    q8 = [f for f in copies if f.name == "q8_0"][0]
    w = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(q8.quantize(w), core_formats.quantize_q8_0(w))


# ---- embed ------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", CORE_FORMATS, ids=lambda f: f.name)
def test_embed_matches_reference(isa, fmt):
    rng = np.random.default_rng(7)
    w = make_weight(fmt, 50, 96, rng)
    for ids in (np.array([3]), np.array([[0, 49, 7], [7, 7, 1]]), np.array(12)):
        got = kernels.embed(w, ids)
        np.testing.assert_array_equal(got, ops.embed(w, ids))
    with pytest.raises(IndexError):
        kernels.embed(w, np.array([1, 50]))
    with pytest.raises(IndexError):
        kernels.embed(w, np.array([-1]))


# ---- elementwise ------------------------------------------------------------------------------

SIZES = [1, 7, 64, 896, 1000]


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(isa, d, offset):
    rng = np.random.default_rng(d)
    for rows in (1, 3, 70):
        x = rng.standard_normal((rows, d)).astype(np.float32) * 3
        w = rng.standard_normal(d).astype(np.float32)
        ref = ops.rms_norm(x, w, 1e-6, offset)
        np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-6, offset), ref, rtol=2e-5, atol=2e-6)


def tables(positions, rot: int, theta: float):
    inv_freq = 1.0 / (theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    return ops.rope_tables(np.asarray(positions), inv_freq)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dh,rot", [(64, 64), (64, 32), (20, 20), (20, 12), (128, 64), (6, 2)])
def test_rope(isa, interleaved, dh, rot):
    rng = np.random.default_rng(dh + rot)
    B, T, H = 2, 5, 3
    x = rng.standard_normal((B, T, H, dh)).astype(np.float32)
    cos, sin = tables(np.arange(7, 7 + T), rot, 10000.0)
    ref = ops.rope(x, cos, sin, interleaved)
    np.testing.assert_allclose(kernels.rope(x, cos, sin, interleaved), ref, rtol=1e-5, atol=1e-6)
    # in place, and from a strided view (the q part of a fused qkv output)
    y = x.copy()
    assert kernels.rope(y, cos, sin, interleaved, out=y) is y
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    fused = rng.standard_normal((B, T, H + 2, dh)).astype(np.float32)
    view = fused[:, :, 1:1 + H]
    np.testing.assert_allclose(kernels.rope(view, cos, sin, interleaved),
                               ops.rope(np.ascontiguousarray(view), cos, sin, interleaved),
                               rtol=1e-5, atol=1e-6)


def test_rope_large_parallel(isa):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 300, 14, 64)).astype(np.float32)
    cos, sin = tables(np.arange(300), 64, 1e6)
    for inter in (False, True):
        np.testing.assert_allclose(kernels.rope(x, cos, sin, inter), ops.rope(x, cos, sin, inter),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", SIZES + [40000])
def test_silu_and_silu_mul(isa, n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal((3, n)) * 6).astype(np.float32)
    u = rng.standard_normal((3, n)).astype(np.float32)
    g[0, 0] = -100.0  # exp overflow in the reference: silu -> -0
    with np.errstate(over="ignore"):
        ref, ref_mul = ops.silu(g), ops.silu_mul(g, u)
    np.testing.assert_allclose(kernels.silu(g), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kernels.silu_mul(g, u), ref_mul, rtol=1e-5, atol=1e-6)


def test_silu_mul_fused_halves(isa):
    rng = np.random.default_rng(10)
    gu = rng.standard_normal((2, 5, 2 * 37)).astype(np.float32)
    gate, up = gu[..., :37], gu[..., 37:]
    np.testing.assert_allclose(kernels.silu_mul(gate, up), ops.silu_mul(gate, up), rtol=1e-5, atol=1e-6)


def test_silu_special_values(isa):
    x = np.array([0.0, -0.0, 88.0, -88.0, 89.0, -89.0, 1e30, -1e30, np.inf, -np.inf, np.nan],
                 dtype=np.float32)
    x = np.concatenate([x, x[:5]])  # 16 values: the vector path sees them all
    with np.errstate(over="ignore", invalid="ignore"):
        ref = ops.silu(x)
    got = kernels.silu(x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("n", SIZES)
def test_softmax(isa, n):
    rng = np.random.default_rng(n + 1)
    x = (rng.standard_normal((4, n)) * 10).astype(np.float32)
    if n > 1:
        x[1, : n // 2] = -np.inf  # masked entries
    np.testing.assert_allclose(kernels.softmax(x), ops.softmax(x), rtol=1e-5, atol=1e-7)
    # other axes fall back to the reference
    np.testing.assert_allclose(kernels.softmax(x, axis=0), ops.softmax(x, axis=0), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 1000, 300000])
def test_add(isa, n):
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_array_equal(kernels.add(a, b), a + b)
    out = a.copy()
    kernels.add(out, b, out=out)
    np.testing.assert_array_equal(out, a + b)


# ---- attention --------------------------------------------------------------------------------

ATTN_CASES = [
    # B, T, start_pos, Hq, Hkv, D
    (1, 1, 0, 2, 1, 64),      # first decode step
    (1, 1, 36, 14, 2, 64),    # decode over a cache, GQA group 7
    (2, 9, 0, 4, 2, 16),      # prefill, batch 2
    (1, 17, 5, 6, 6, 20),     # chunked prefill after a cached prefix, MHA, odd D
    (1, 33, 0, 9, 3, 64),     # SmolLM2-like heads, several query blocks
    (1, 3, 2, 2, 1, 128),
    (1, 2, 4, 4, 1, 7),
    (1, 1, 700, 14, 2, 64),   # decode past several key blocks (online softmax)
    (1, 300, 0, 9, 3, 64),    # prefill longer than a key block
    (2, 5, 520, 4, 1, 24),    # chunked prefill past a key block, MQA
]


@pytest.mark.parametrize("B,T,start,hq,hkv,d", ATTN_CASES,
                         ids=[f"B{b}-T{t}-p{p}-{h}x{k}-D{d}" for b, t, p, h, k, d in ATTN_CASES])
def test_attention(isa, B, T, start, hq, hkv, d):
    rng = np.random.default_rng(B * 100 + T * 10 + d)
    S = start + T
    q = rng.standard_normal((B, T, hq, d)).astype(np.float32)
    k = rng.standard_normal((B, S, hkv, d)).astype(np.float32)
    v = rng.standard_normal((B, S, hkv, d)).astype(np.float32)
    scale = 1.0 / np.sqrt(d)
    ref = ops.attention(q, k, v, start, scale)
    bound = attention_bound(q, k, v, start, scale)
    assert (np.abs(kernels.attention(q, k, v, start, scale) - ref) <= bound).all()
    # k/v as views of a longer cache: positions past S must be ignored, nothing copied
    cache_k = rng.standard_normal((B, S + 11, hkv, d)).astype(np.float32)
    cache_v = rng.standard_normal((B, S + 11, hkv, d)).astype(np.float32)
    cache_k[:, :S], cache_v[:, :S] = k, v
    got = kernels.attention(q, cache_k[:, :S], cache_v[:, :S], start, scale)
    assert (np.abs(got - ref) <= bound).all()


@pytest.mark.parametrize("hq,hkv,d", [(14, 2, 64), (8, 2, 256), (4, 4, 24), (6, 6, 20)])
def test_attention_rows_do_not_depend_on_the_chunking(isa, hq, hkv, d):
    """A prompt prefilled whole, in chunks starting mid-tile, or decoded row by row: the
    same bits for every row (batch invariance: what makes speculative verify rows equal to
    decoding them); across several of the kernel's 64-key tiles and with gsplit at decode."""
    rng = np.random.default_rng(7)
    n = 203
    q = rng.standard_normal((1, n, hq, d)).astype(np.float32)
    k = rng.standard_normal((1, n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((1, n, hkv, d)).astype(np.float32)
    whole = kernels.attention(q, k, v, 0, 0.2)
    assert (np.abs(whole - ops.attention(q, k, v, 0, 0.2)) <= attention_bound(q, k, v, 0, 0.2)).all()
    for cuts in ([0, 1, 70, 77, 150, 203], [0, 5, 128, 129, 200, 203]):
        for a, b in zip(cuts, cuts[1:]):
            part = kernels.attention(q[:, a:b], k[:, :b], v[:, :b], a, 0.2)
            np.testing.assert_array_equal(part, whole[:, a:b])
    for t in (0, 63, 64, 150, 202):  # decode rows
        np.testing.assert_array_equal(kernels.attention(q[:, t:t + 1], k[:, :t + 1],
                                                        v[:, :t + 1], t, 0.2), whole[:, t:t + 1])
    if isa == "avx2" and d % 8 == 0 and hq // hkv >= 2:  # dense and paged share the tiled core
        table = np.arange(-(-n // 16), dtype=np.int32)[None]
        pad = table.shape[1] * 16 - n
        kp = np.concatenate([k[0], np.zeros((pad, hkv, d), np.float32)]).reshape(-1, 16, hkv, d)
        vp = np.concatenate([v[0], np.zeros((pad, hkv, d), np.float32)]).reshape(-1, 16, hkv, d)
        paged = kernels.paged_attention(q[0], kp, vp, np.array([0, n]), np.array([0]), table, 0.2)
        np.testing.assert_array_equal(paged, whole[0])


def test_attention_head_major_cache_view(isa):
    # a cache laid out [B, Hkv, S_max, D] and handed over transposed: strided, no copy
    rng = np.random.default_rng(11)
    B, T, start, hq, hkv, d = 1, 4, 6, 4, 2, 32
    S = start + T
    q = rng.standard_normal((B, T, hq, d)).astype(np.float32)
    kc = rng.standard_normal((B, hkv, 20, d)).astype(np.float32)
    vc = rng.standard_normal((B, hkv, 20, d)).astype(np.float32)
    k = kc[:, :, :S].transpose(0, 2, 1, 3)
    v = vc[:, :, :S].transpose(0, 2, 1, 3)
    ref = ops.attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), start, 0.2)
    assert (np.abs(kernels.attention(q, k, v, start, 0.2) - ref) <= attention_bound(q, k, v, start, 0.2)).all()


def test_attention_shape_errors():
    q = np.zeros((1, 2, 3, 8), np.float32)
    k = np.zeros((1, 2, 2, 8), np.float32)
    with pytest.raises(ValueError):
        kernels.attention(q, k, k, 0, 1.0)  # 3 % 2 != 0


# ---- runtime ----------------------------------------------------------------------------------

def test_runtime_controls():
    assert kernels.isa() in ("generic", "avx2")
    with pytest.raises(ValueError):
        kernels.set_isa("neon9")
    with pytest.raises(ValueError):
        kernels.set_threads(0)
    before = kernels.threads()
    kernels.set_threads(3)
    assert kernels.threads() == 3
    kernels.set_threads(before)
    buf = np.arange(4096, dtype=np.float32)
    assert kernels.bench_read(buf) == pytest.approx(float(buf.sum()), rel=1e-6)


def _matmul_in_child(conn, x, w):
    conn.send(kernels.matmul(x, w))
    conn.close()


def test_pool_survives_fork():
    import multiprocessing as mp

    rng = np.random.default_rng(12)
    w = make_weight(core_formats.F16, 301, 64, rng)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    ref = kernels.matmul(x, w)  # the parent's pool is running now
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_matmul_in_child, args=(child, x, w))
    p.start()
    assert parent.poll(60), "child hung: the worker pool did not restart after fork"
    got = parent.recv()
    p.join(10)
    np.testing.assert_array_equal(got, ref)


def test_q8_0_activation_blocks_edge_cases(variant):
    """int16 activation blocks: an all-zero block, one flushed to zero (amax < 1e-30),
    exact ties, and blocks of very different magnitude, through decode and prefill."""
    rng = np.random.default_rng(13)
    w = make_weight(core_formats.Q8_0, 45, 256, rng)
    for m in (1, 3, 12):
        x = rng.standard_normal((m, 256)).astype(np.float32)
        x[0, :32] = 0.0
        x[0, 32:64] = 1e-31
        x[-1, 64:96] = np.arange(-16, 16, dtype=np.float32) * 0.5
        x[-1, 96:128] *= 1e4
        x[-1, 128:160] *= 1e-4
        got = kernels.matmul(x, w)
        assert np.isfinite(got).all()
        ref = exact_reference(x, w)
        assert matmul_error(got, ref, x, w) <= THRESHOLDS["q8_0"]["exact"]
        assert rel(got, ops.matmul(x, w)) <= 1e-4


def test_log_sum_exp_matches_numpy(isa):
    """The log-softmax normaliser (token logprobs): vocabulary-sized rows, a ragged tail,
    masked (-inf) entries, and rows with no finite maximum."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 151_937)) * 6).astype(np.float32)
    x[1, ::3] = -np.inf
    got = kernels.log_sum_exp(x)
    peak = x.max(-1, keepdims=True)
    want = (peak[:, 0] + np.log(np.exp((x - peak).astype(np.float64)).sum(-1)))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    special = np.array([[-np.inf, -np.inf], [np.inf, 0.0], [np.nan, 0.0]], np.float32)
    out = kernels.log_sum_exp(special)
    assert np.isnan(out[0]) and out[1] == np.inf and np.isnan(out[2])
    from lattice_engine.generate import token_logprob
    assert abs(token_logprob(x[0], 5) - (x[0, 5] - want[0])) < 2e-5
