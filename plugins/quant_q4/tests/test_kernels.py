"""The C kernels against the numpy reference: every format, decode and prefill shapes,
every ISA variant this CPU has, the embedding lookup, bad ids, threads."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_quant_q4 import formats as F
from lattice_quant_q4 import kernels as K
from lattice_engine.testing.pytest_plugin import KERNEL_VARIANTS, variant_skip_reason
from lattice_engine.testing.pytest_plugin import require as require_core
from lattice_engine.testing.tolerance import assert_matmul_close

# skipped when the plugin's C module is missing; a failure under LATTICE_REQUIRE_NATIVE=1
pytestmark = pytest.mark.native(probe=lambda: None if K.available() else K.LOAD_ERROR,
                                what="lattice_quant_q4._q4_native (the plugin's C kernels)")
rng = np.random.default_rng(1)
FORMATS = {f"{fam}_g{g}": (fam, g) for fam in F.FAMILIES for g in F.GROUP_SIZES}


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """x as the kernel sees it: int8 per 32 values, scale amax / 127, round half even."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1, keepdims=True)
    d = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    return (np.rint(b * inv) * d).reshape(x.shape)


@pytest.fixture(params=KERNEL_VARIANTS)
def isa(request):
    """Each kernel variant: one this CPU lacks is a skip naming the missing flag; one it
    has must be selectable."""
    reason = variant_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    before = K.isa()
    assert K.set_isa(request.param) == request.param, \
        f"the CPU has the flags of {request.param} but the q4 kernels refused it"
    yield request.param
    K.set_isa(before)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("M", [1, 2, 4, 7, 33])
def test_matmul_matches_reference(isa, name, M):
    family, group = FORMATS[name]
    N, Kd = 37, 384
    w = rng.standard_normal((N, Kd)).astype(np.float32)
    data = F.quantize(family, group, w)
    x = rng.standard_normal((M, Kd)).astype(np.float32)
    y = K.make_matmul(family, group, F.bytes_per_block(family, group))(x, data)
    wf = F.to_float(family, group, data, Kd)
    xq = quantize_activations(x)
    exact = xq.astype(np.float64) @ wf.T.astype(np.float64)
    # exact integer dots per block, then a float32 chain over the blocks: within the
    # float32 dot-product bound at |x_q| . |W|
    assert_matmul_close(y, exact, xq, wf)
    # and close to the float product: only activation rounding separates them
    ref = x @ wf.T
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def exact_product(family, group, data, x, Kd):
    """float64 product of x as the kernel rounds it and the dequantized weights."""
    wf = F.to_float(family, group, data, Kd).astype(np.float64)
    return quantize_activations(x).astype(np.float64) @ wf.T


@pytest.mark.parametrize("name", FORMATS)
def test_a_row_does_not_depend_on_how_many_rows_came_with_it(isa, name):
    """Row i of an M-row product is bit for bit the 1-row product of x row i, for the
    few-rows kernel (M <= 16) and the tiled prefill kernel alike. K = 1536 is two K slices
    of the prefill tile (the second partial); N = 45 leaves partial row groups."""
    family, group = FORMATS[name]
    N, Kd = 45, 1536
    data = F.quantize(family, group, rng.standard_normal((N, Kd)).astype(np.float32))
    mm = K.make_matmul(family, group, F.bytes_per_block(family, group))
    x = rng.standard_normal((33, Kd)).astype(np.float32)
    one = np.concatenate([mm(x[i:i + 1], data) for i in range(33)])
    exact = exact_product(family, group, data, x, Kd)
    assert_matmul_close(one, exact, quantize_activations(x), F.to_float(family, group, data, Kd))
    for M in [*range(2, 10), 16, 17, 33]:
        np.testing.assert_array_equal(mm(x[:M], data), one[:M], err_msg=f"M = {M}")


@pytest.mark.parametrize("name", FORMATS)
def test_the_x86_variants_agree_to_the_bit(name):
    """AVX2 (maddubs), AVX-VNNI and AVX512-VNNI compute the same integer dots and the same
    float chain, so they give the same bits, decode and prefill."""
    simd = [v for v in K.isas() if v != "generic"]
    if len(simd) < 2:
        pytest.skip("fewer than two x86 variants on this CPU")
    family, group = FORMATS[name]
    N, Kd = 29, 1152
    data = F.quantize(family, group, rng.standard_normal((N, Kd)).astype(np.float32))
    mm = K.make_matmul(family, group, F.bytes_per_block(family, group))
    x = rng.standard_normal((21, Kd)).astype(np.float32)
    before = K.isa()
    try:
        for M in (1, 5, 21):
            results = {}
            for v in simd:
                K.set_isa(v)
                results[v] = mm(x[:M], data)
            for v in simd[1:]:
                np.testing.assert_array_equal(results[v], results[simd[0]], err_msg=f"{v}, M = {M}")
    finally:
        K.set_isa(before)


@pytest.mark.parametrize("name", FORMATS)
def test_embed_equals_to_float_rows(isa, name):
    family, group = FORMATS[name]
    w = rng.standard_normal((50, 256)).astype(np.float32)
    data = F.quantize(family, group, w)
    ids = np.array([0, 49, 7, 7])
    out = K.make_embed(family, group, F.bytes_per_block(family, group))(data, ids)
    np.testing.assert_array_equal(out, F.to_float(family, group, data, 256)[ids])


def test_embed_rejects_ids_outside_the_vocabulary():
    data = F.quantize("q4_asym", 32, np.ones((4, 32), np.float32))
    embed = K.make_embed("q4_asym", 32, 20)
    with pytest.raises(IndexError, match=r"token id 4 is outside the vocabulary \[0, 4\)"):
        embed(data, np.array([1, 4]))


def test_matmul_rejects_a_mismatched_row_length():
    data = F.quantize("q4_sym", 32, np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="x has 96 features"):
        K.make_matmul("q4_sym", 32, 18)(np.ones((1, 96), np.float32), data)


def test_threads_of_the_core_pool_give_the_same_result():
    from lattice_engine import kernels as core
    require_core()
    assert K.attach_core_pool()
    w = rng.standard_normal((301, 512)).astype(np.float32)
    data = F.quantize("q4_asym", 32, w)
    mm = K.make_matmul("q4_asym", 32, 20)
    before = core.threads()
    try:
        for M in (1, 5, 9, 17):  # the few-rows kernel, then the prefill tiles
            x = rng.standard_normal((M, 512)).astype(np.float32)
            core.set_threads(1)
            one = mm(x, data)
            core.set_threads(2)
            np.testing.assert_array_equal(mm(x, data), one, err_msg=f"M = {M}")
    finally:
        core.set_threads(before)


@pytest.mark.parametrize("name", FORMATS)
def test_r16_layout_gives_the_plain_kernels_bits(isa, name):
    """The _r16 twin (16 rows interleaved, converted once) runs its own decode kernels and
    the prefill tiles copied out of it: every row bit for bit the plain layout's, for every
    variant, few rows (M <= 16: the 4-row and 8-row passes) and prefill (M = 33; N = 48 is
    a 32-row chunk and a 16-row one, K = 1536 two K slices)."""
    family, group = FORMATS[name]
    N, Kd = 48, 1536
    bpb = F.bytes_per_block(family, group)
    data = F.quantize(family, group, rng.standard_normal((N, Kd)).astype(np.float32))
    r16 = K.relayout(family, group, data.copy(), Kd, True)
    np.testing.assert_array_equal(r16, F.to_r16(family, group, data))  # C == numpy
    np.testing.assert_array_equal(K.relayout(family, group, r16.copy(), Kd, False), data)
    plain, inter = K.make_matmul(family, group, bpb), K.make_matmul(family, group, bpb, True)
    x = rng.standard_normal((33, Kd)).astype(np.float32)
    for M in (1, 2, 3, 4, 5, 8, 9, 16, 17, 33):
        np.testing.assert_array_equal(inter(x[:M], r16), plain(x[:M], data), err_msg=f"M = {M}")
    ids = np.array([0, 47, 16, 15, 16])
    np.testing.assert_array_equal(K.make_embed(family, group, bpb, True)(r16, ids),
                                  F.to_float(family, group, data, Kd)[ids])


def test_r16_layout_rejects_rows_not_a_multiple_of_16():
    data = F.quantize("q4_asym", 32, np.ones((24, 64), np.float32))
    with pytest.raises(ValueError, match="rows % 16 == 0"):
        K.relayout("q4_asym", 32, data, 64, True)
    with pytest.raises(ValueError, match="needs a multiple of 16 rows, got 24"):
        K.make_matmul("q4_asym", 32, 20, True)(np.ones((1, 64), np.float32), data)


def test_native_layout_converts_in_place_where_it_pays(monkeypatch):
    """The plain formats' WeightFormat.native_layout: a writable matrix with a multiple of
    16 rows becomes the _r16 twin in its own buffer (no second copy of the weights); other
    matrices, and LATTICE_Q4_R16=0, stay as they are."""
    from lattice_engine.quant.formats import PackedMatrix
    fmts = {f.name: f for f in F.Q4_FORMATS + F.Q4_R16_FORMATS}
    K.attach(F.Q4_FORMATS, F.Q4_R16_FORMATS)
    plain = fmts["q4_asym_g64"]
    data = F.quantize("q4_asym", 64, rng.standard_normal((32, 128)).astype(np.float32))
    expected = F.to_r16("q4_asym", 64, data)
    monkeypatch.setenv("LATTICE_Q4_R16", "0")
    m = PackedMatrix(plain, 32, 128, data)
    assert plain.native_layout(m) is m
    monkeypatch.setenv("LATTICE_Q4_R16", "1")
    r = plain.native_layout(m)
    assert r.format is fmts["q4_asym_g64_r16"] and r.data is data
    np.testing.assert_array_equal(data, expected)
    odd = PackedMatrix(plain, 24, 128, F.quantize("q4_asym", 64, np.ones((24, 128), np.float32)))
    assert plain.native_layout(odd) is odd


@pytest.mark.parametrize("name", ["q4_sym_g32", "q4_asym_g64"])
@pytest.mark.parametrize("r16", [False, True])
def test_grouped_matmul_gives_each_matrix_the_bits_of_its_own_matmul(isa, name, r16):
    """q4_matmul_grouped (what the core's expert dispatch calls through
    lk_extern_matmul_grouped): every matrix over its own rows of one x, x quantized once,
    the few-rows matrices in one pool job, gives each matrix q4_matmul's bits over the same
    rows, whatever the row count (0 skipped, few rows, and 40 > the few-rows limit: the
    prefill tiles) and whatever else is in the group."""
    family, group = FORMATS[name]
    Kd, counts = 512, [1, 0, 3, 9, 40, 2, 1]
    bpb = F.bytes_per_block(family, group)
    mats = []
    for i in range(len(counts)):
        data = F.quantize(family, group,
                          rng.standard_normal((32 + 16 * (i % 3), Kd)).astype(np.float32))
        mats.append(K.relayout(family, group, data, Kd, True) if r16 else data)
    x = rng.standard_normal((sum(counts), Kd)).astype(np.float32)
    row0 = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    outs = [np.full((c, m.shape[0]), np.nan, np.float32) for c, m in zip(counts, mats)]
    ffi, lib = K._ffi, K._lib
    rc = lib.q4_matmul_grouped(
        int(family == "q4_asym"), group, int(r16), ffi.from_buffer("float[]", x), Kd,
        len(mats), ffi.new("int64_t[]", row0.tolist()), ffi.new("int64_t[]", counts),
        ffi.new("const void *[]", [ffi.from_buffer(m) for m in mats]),
        ffi.new("int64_t[]", [m.strides[0] for m in mats]),
        ffi.new("int64_t[]", [m.shape[0] for m in mats]),
        ffi.new("float *[]", [ffi.from_buffer("float[]", o, require_writable=True)
                              if o.size else ffi.NULL for o in outs]))
    assert rc == 0
    mm = K.make_matmul(family, group, bpb, r16)
    for r, c, m, o in zip(row0, counts, mats, outs):
        if c:
            np.testing.assert_array_equal(o, mm(x[r:r + c], m), err_msg=f"{c} rows")
