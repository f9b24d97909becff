"""q8_0_r16: q8_0's blocks with 16 rows interleaved, what q8_0 models run from natively.

The layout exists for speed only, so everything here is about sameness: the C and numpy
conversions agree and invert each other, and every kernel (each q8_0 variant, the generic
ISA, every M from one row to prefill) gives the bits q8_0 gives on the same blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import kernels, ops
from lattice_engine.errors import CheckpointError
from lattice_engine.quant.core_formats import (Q8_0, Q8_0_R16, native_layout, q8_0_to_r16,
                                               r16_to_q8_0)
from lattice_engine.quant.formats import PackedMatrix, pack

pytestmark = pytest.mark.native

# (rows, cols): one group, an odd number of groups (the 512-bit kernel's lone last group),
# K of one block, K beyond the few-rows slices, and Qwen2.5-0.5B's down_proj width
SHAPES = [(16, 32), (48, 96), (80, 160), (128, 4864), (256, 896)]


def q8(rows: int, cols: int, seed: int = 0) -> PackedMatrix:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return pack(Q8_0, "w", w)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_conversions_agree_and_invert(rows, cols):
    m = q8(rows, cols)
    ref = q8_0_to_r16(m.data)
    assert not np.array_equal(ref, m.data)  # it does move bytes
    np.testing.assert_array_equal(r16_to_q8_0(ref), m.data)
    np.testing.assert_array_equal(kernels.q8_0_r16_convert(m.data.copy(), cols, True), ref)
    np.testing.assert_array_equal(kernels.q8_0_r16_convert(ref.copy(), cols, False), m.data)
    r = PackedMatrix(Q8_0_R16, rows, cols, ref)
    np.testing.assert_array_equal(r.to_float(), m.to_float())


def test_native_layout_converts_in_place_and_leaves_other_matrices_alone():
    m = q8(32, 64)
    expected = q8_0_to_r16(m.data)
    buf = m.data
    r = native_layout(m, force=True)
    assert r.format is Q8_0_R16 and r.data is buf  # no second copy of the weights
    np.testing.assert_array_equal(buf, expected)
    odd = q8(24, 64)  # not whole groups of 16: stays q8_0
    assert native_layout(odd, force=True) is odd
    readonly = q8(16, 64)
    readonly.data.flags.writeable = False
    r = native_layout(readonly, force=True)
    assert r.data is not readonly.data
    np.testing.assert_array_equal(r.data, q8_0_to_r16(readonly.data))


def test_rows_not_in_groups_of_16_are_a_clear_error():
    with pytest.raises(CheckpointError, match="groups of 16"):
        pack(Q8_0_R16, "layer.w", np.zeros((24, 32), np.float32))
    with pytest.raises(ValueError, match="rows % 16"):
        kernels.q8_0_r16_convert(q8(24, 32).data, 32, True)


@pytest.mark.parametrize("rows,cols", SHAPES)
def test_embed_gives_q8_0_rows(rows, cols):
    m = q8(rows, cols, seed=1)
    r = PackedMatrix(Q8_0_R16, rows, cols, q8_0_to_r16(m.data))
    ids = np.array([0, rows - 1, 17 % rows, 5, 5])
    assert same_bits(kernels.embed(r, ids), kernels.embed(m, ids))
    assert same_bits(ops.embed(r, ids), ops.embed(m, ids))
    with pytest.raises(IndexError, match="outside the vocabulary"):
        kernels.embed(r, np.array([rows]))


def test_matmul_is_q8_0_bit_for_bit_at_every_batch_size(kernel_variant):
    rng = np.random.default_rng(2)
    for rows, cols in SHAPES:
        m = q8(rows, cols, seed=3)
        r = PackedMatrix(Q8_0_R16, rows, cols, q8_0_to_r16(m.data))
        for M in (1, 2, 3, 4, 5, 8, 9, 16, 64, 65, 130):
            x = rng.standard_normal((M, cols)).astype(np.float32)
            got, want = kernels.matmul(x, r), kernels.matmul(x, m)
            assert same_bits(got, want), (kernel_variant, rows, cols, M)
            # and a row's bits do not depend on the batch it is in
            assert same_bits(kernels.matmul(x[-1:], r), got[-1:]), (kernel_variant, M)


def test_matmul_multi_mixes_q8_0_r16_with_other_weights():
    rng = np.random.default_rng(4)
    ws = [native_layout(q8(n, 96, seed=n), force=True) for n in (64, 32, 16)]
    assert all(w.format is Q8_0_R16 for w in ws)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    for w, y in zip(ws, kernels.matmul_multi(x, ws)):
        assert same_bits(y, kernels.matmul(x, w))


def test_a_tensor_asked_for_twice_is_converted_once(monkeypatch):
    """The loader converts in place; asking again for the same stored q8_0 tensor must not
    interleave its rows a second time."""
    monkeypatch.setenv("LATTICE_R16", "1")  # whatever this CPU's q8_0 kernel prefers
    from lattice_engine.io.checkpoint import PackedTensor
    from lattice_engine.models.base import WeightLoader
    from lattice_engine.plugins import get_plugin_manager

    registry = get_plugin_manager().registry
    formats = registry.items["weight_formats"]
    m = q8(32, 64, seed=5)
    stored = m.data.copy()

    class Ckpt:
        source = "memory"
        tensors = {"w": lambda: PackedTensor(format="q8_0", shape=(32, 64), data=stored)}
        shapes = {"w": (32, 64)}

    method = registry.get("quant_methods", "q8_0")
    loader = WeightLoader(Ckpt(), method, formats, native_layout=True)
    a = loader.matrix("w", (32, 64), "linear")
    b = loader.matrix("w", (32, 64), "linear")
    assert a is b and a.format is Q8_0_R16
    np.testing.assert_array_equal(a.to_float(), m.to_float())


def test_the_layout_follows_the_q8_0_kernel_and_the_vendor_unless_forced(monkeypatch):
    from lattice_engine.quant.core_formats import r16_pays

    before = kernels.q8_variant()
    monkeypatch.delenv("LATTICE_R16", raising=False)
    try:
        for variant in kernels.q8_variants():
            kernels.q8_variant(variant)
            # AVX512-VNNI kernels, or any x86 kernel on an AMD core (two shuffle pipes)
            want = kernels.isa() != "generic" and (variant == "avx512vnni" or kernels.cpu_is_amd())
            assert r16_pays() == want
            assert (native_layout(q8(16, 32)).format is Q8_0_R16) == want
        for forced in ("0", "1"):
            monkeypatch.setenv("LATTICE_R16", forced)
            assert r16_pays() == (forced == "1")
    finally:
        kernels.q8_variant(before)


def test_a_format_with_its_own_native_layout_decides_for_itself():
    """WeightFormat.native_layout (a plugin format's load-time layout) is what
    `native_layout` returns for its matrices; q8_0's own rule is not applied to them."""
    import dataclasses
    seen = []
    mine = dataclasses.replace(Q8_0, name="q8_mine",
                               native_layout=lambda m: seen.append(m) or "relaid")
    m = q8(16, 64)
    m = type(m)(mine, m.rows, m.cols, m.data)
    assert native_layout(m) == "relaid" and seen == [m]
