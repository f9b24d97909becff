"""The numpy reference formats: the definitions of q4_sym / q4_asym, GGUF equivalence at
group 32, and reconstruction bounds."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_quant_q4 import formats as F

rng = np.random.default_rng(0)


def codes_and_scales(family, group, data, cols):
    rows = data.shape[0]
    blocks = data.reshape(rows, cols // group, F.bytes_per_block(family, group))
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
    q = F.unpack_nibbles(blocks[..., F.header_bytes(family):])
    return q, d, blocks


@pytest.mark.parametrize("group", F.GROUP_SIZES)
def test_sym_follows_its_definition(group):
    w = rng.standard_normal((8, 256)).astype(np.float32)
    data = F.quantize("q4_sym", group, w)
    assert data.shape == (8, 256 // group * (2 + group // 2))
    q, d, _ = codes_and_scales("q4_sym", group, data, 256)
    blocks = w.reshape(8, -1, group)
    amax = np.abs(blocks).max(-1)
    np.testing.assert_array_equal(d, (amax / 7).astype(np.float16).astype(np.float32))
    want = np.clip(np.round(blocks / (amax / 7)[..., None]) + 8, 0, 15)
    # round-half cases may differ from numpy's half-to-even; there are none in random data
    np.testing.assert_array_equal(q, want)
    assert q.min() >= 1 and q.max() <= 15


@pytest.mark.parametrize("group", F.GROUP_SIZES)
def test_asym_follows_its_definition(group):
    w = rng.standard_normal((8, 256)).astype(np.float32) + 0.5
    data = F.quantize("q4_asym", group, w)
    q, d, blocks = codes_and_scales("q4_asym", group, data, 256)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0]
    wb = w.reshape(8, -1, group)
    lo, hi = wb.min(-1), wb.max(-1)
    np.testing.assert_array_equal(m, lo.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(d, ((hi - lo) / 15).astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(q, np.round((wb - lo[..., None]) / ((hi - lo) / 15)[..., None]))


@pytest.mark.parametrize("group", F.GROUP_SIZES)
@pytest.mark.parametrize("family", F.FAMILIES)
def test_round_trip_error_is_bounded(family, group):
    w = rng.standard_normal((16, 512)).astype(np.float32)
    back = F.to_float(family, group, F.quantize(family, group, w), 512)
    blocks, err = w.reshape(16, -1, group), np.abs(back - w).reshape(16, -1, group)
    span = (np.abs(blocks).max(-1) / 7 if family == "q4_sym"
            else (blocks.max(-1) - blocks.min(-1)) / 15)
    # half a step, plus the f16 rounding of scale and offset
    assert np.all(err.max(-1) <= 0.5 * span * 1.01 + 1e-3 * np.abs(blocks).max(-1))


def test_constant_and_zero_blocks():
    w = np.zeros((2, 64), np.float32)
    w[1] = 3.0
    for family in F.FAMILIES:
        back = F.to_float(family, 32, F.quantize(family, 32, w), 64)
        np.testing.assert_array_equal(back[0], 0)
        np.testing.assert_allclose(back[1], 3.0, rtol=1e-3)


def test_q4_asym_g32_is_byte_identical_to_ggml_q4_1():
    gguf = pytest.importorskip("gguf")
    w = rng.standard_normal((32, 256)).astype(np.float32) * 0.05
    ours = F.quantize("q4_asym", 32, w)
    theirs = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(ours, theirs)


def test_q4_0_is_byte_identical_to_ggml_q4_0_ties_included():
    """ggml's rule, including its tie-breaking: weights on a coarse grid (like a 5-bit source
    checkpoint) put many values exactly half-way between two codes."""
    gguf = pytest.importorskip("gguf")
    w = rng.standard_normal((32, 256)).astype(np.float32) * 0.05
    grid = np.round(rng.standard_normal((32, 256)) * 15).clip(-16, 15).astype(np.float32)
    grid[:, ::32] = -16  # every block's largest magnitude: d = 2, ties at odd values
    for src in (w, grid / 16):
        ours = F.quantize(F.GGML_Q4_0, 32, src)
        theirs = gguf.quants.quantize(src, gguf.GGMLQuantizationType.Q4_0)
        np.testing.assert_array_equal(ours, theirs)
    q, _, _ = codes_and_scales("q4_sym", 32, F.quantize(F.GGML_Q4_0, 32, grid / 16), 256)
    assert (q == 0).any()  # all 16 codes in use, unlike q4_sym's absmax / 7


def test_q4_0_decodes_as_q4_sym_g32():
    w = rng.standard_normal((8, 128)).astype(np.float32)
    data = F.quantize(F.GGML_Q4_0, 32, w)
    np.testing.assert_array_equal(F.to_float(F.GGML_Q4_0, 32, data, 128),
                                  F.to_float("q4_sym", 32, data, 128))
    fmts = {f.name: f for f in F.Q4_FORMATS}
    assert fmts["q4_0"].gguf_type is None  # GGUF Q4_0 tensors keep loading as q4_sym_g32
    assert F.layout_of("q4_0") == ("q4_sym", 32)
    with pytest.raises(KeyError, match="not a lattice-quant-q4 format"):
        F.layout_of("q4_k")


@pytest.mark.parametrize("family,qtype", [("q4_sym", "Q4_0"), ("q4_asym", "Q4_1")])
def test_g32_reads_ggml_blocks_like_ggml(family, qtype):
    """GGUF Q4_0 / Q4_1 bytes dequantize identically through our format: the layouts are
    the same, so such tensors load without a float round trip."""
    gguf = pytest.importorskip("gguf")
    t = getattr(gguf.GGMLQuantizationType, qtype)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    raw = gguf.quants.quantize(w, t)
    np.testing.assert_array_equal(F.to_float(family, 32, raw, 128),
                                  gguf.quants.dequantize(raw, t).reshape(16, 128))
    fmt = {f.name: f for f in F.Q4_FORMATS}[f"{family}_g32"]
    assert fmt.gguf_type == int(t)


def test_heavy_tails_asym_beats_sym_at_every_group():
    w = rng.standard_t(3, size=(64, 512)).astype(np.float32)
    err = {}
    for family in F.FAMILIES:
        for g in F.GROUP_SIZES:
            back = F.to_float(family, g, F.quantize(family, g, w), 512)
            err[family, g] = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    for g in F.GROUP_SIZES:
        assert err["q4_asym", g] < err["q4_sym", g]
    assert err["q4_asym", 32] < err["q4_asym", 64] < err["q4_asym", 128]


@pytest.mark.parametrize("family", F.FAMILIES)
@pytest.mark.parametrize("group", F.GROUP_SIZES)
def test_r16_layout_follows_its_definition(family, group):
    """Per 16 rows and weight group one record: the 16 scales, the 16 offsets (asym), then
    per 32-value sub-block [dword i][row jj][4 bytes] = bytes 4i .. 4i + 3 of row jj's
    sub-block; the round trip restores the plain bytes."""
    rows, cols = 32, 2 * group
    data = F.quantize(family, group, rng.standard_normal((rows, cols)).astype(np.float32))
    r16 = F.to_r16(family, group, data)
    assert r16.shape == data.shape
    np.testing.assert_array_equal(F.from_r16(family, group, r16), data)
    hdr, bpb, subs = F.header_bytes(family), F.bytes_per_block(family, group), group // 32
    for row in (0, 7, 16, 31):
        for g in range(cols // group):
            plain = data[row, g * bpb:(g + 1) * bpb]
            rec = r16.reshape(rows // 16, -1)[row // 16, g * 16 * bpb:(g + 1) * 16 * bpb]
            jj = row % 16
            assert bytes(rec[2 * jj:2 * jj + 2]) == bytes(plain[:2])  # scale
            if family == "q4_asym":
                assert bytes(rec[32 + 2 * jj:34 + 2 * jj]) == bytes(plain[2:4])  # offset
            for j in range(subs):
                for i in range(4):
                    at = 16 * hdr + 256 * j + 64 * i + 4 * jj
                    assert bytes(rec[at:at + 4]) == bytes(plain[hdr + 16 * j + 4 * i:][:4])
    fmt = {f.name: f for f in F.Q4_R16_FORMATS}[f"{family}_g{group}_r16"]
    assert fmt.row_group == 16 and fmt.gguf_type is None
    np.testing.assert_array_equal(fmt.to_float(r16, cols), F.to_float(family, group, data, cols))
    with pytest.raises(ValueError, match="rows % 16 == 0"):
        F.to_r16(family, group, data[:8])


def q4_value_bound(name: str):
    """The q4 formats' own error definition, per value: half a quantization step of the
    value's block plus the f16 rounding of the block's scale (and offset). ggml's q4_0 rule
    (scale = the signed extreme / -8, codes clamped to 15) rounds the opposite extreme to a
    whole step: its bound is one step of amax / 8."""
    family, group = F.layout_of(name)
    name = name.removesuffix(F.R16_SUFFIX)  # the _r16 twins hold the same blocks

    def bound(w: np.ndarray) -> np.ndarray:
        blocks = w.astype(np.float64).reshape(w.shape[0], -1, group)
        amax = np.abs(blocks).max(-1, keepdims=True)
        if name == F.GGML_Q4_0:
            per_block = amax / 8 * 1.01 + 1e-3 * amax
        else:
            span = amax / 7 if family != "q4_asym" else \
                (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
            per_block = 0.5 * span * 1.01 + 1e-3 * amax
        return np.broadcast_to(per_block, blocks.shape).reshape(w.shape)
    return bound


def registered_q4_formats():
    from lattice_engine.plugins import PluginManager
    from lattice_quant_q4 import plugin
    pm = PluginManager(allowlist=[])
    pm.register(plugin, "quant_q4")
    owners = pm.registry.owners["weight_formats"]  # the core's q4_k (GGUF's Q4_K) is not ours
    return {n: f for n, f in pm.registry.items["weight_formats"].items()
            if owners[n] == "quant_q4"}


@pytest.mark.parametrize("name", sorted(registered_q4_formats()))
def test_format_honours_the_engine_contract(name):
    # lattice_engine.testing's table-driven check, as the core runs it on its own formats:
    # round trip, row independence, and the C matmul (int8 activations per 32 values)
    # against float64 on the dequantized weights
    from lattice_engine.testing.formats import check_weight_format, int_activation_bound
    fmt = registered_q4_formats()[name]
    check_weight_format(fmt, q4_value_bound(name), activation_bound=int_activation_bound(127))
