"""The 4-bit block formats, as numpy reference implementations.

Per group of G values (G = 32, 64, 128) along a row, with the scale (and offset) in f16:

    q4_sym : scale = absmax / 7,          q = round(w / scale) + 8 (clamped to 0..15),
             w ~ scale * (q - 8);          block = [scale f16][G/2 bytes]
    q4_asym: scale = (max - min) / 15,    offset = min, q = round((w - min) / scale),
             w ~ scale * q + offset;       block = [scale f16][offset f16][G/2 bytes]

Nibbles are stored in sub-blocks of 32 values (16 bytes): byte i holds value i in its low
nibble and value 16 + i in its high nibble. At G = 32 the blocks are byte for byte GGUF's
Q4_0 and Q4_1 (same dequantization, x = d * (q - 8) and x = d * q + m), so such GGUF
tensors load without a float round trip (`gguf_type`). The quantizers follow ggml's
reference arithmetic (float32 scale, multiply by its inverse, round half away from zero),
so q4_asym_g32 reproduces llama.cpp's Q4_1 bytes from the same float32 weights; q4_sym
differs from ggml's Q4_0 by design (absmax / 7 instead of signed max / -8).

A GGUF file's Q4_K blocks (a Q4_K_M file's main type) are asymmetric 4-bit sub-blocks of 32
values too (x = d * sc * q - dmin * m, sc and m 6-bit per sub-block), so q4_asym_g32 takes
them by re-encoding (`from_stored`, `q4_k_to_q4_asym_g32`): the codes as they are, the
sub-block's scale d * sc and offset -dmin * m each rounded once to f16. Quantizing the
dequantized values again would instead move every sub-block whose codes do not span 0..15
(21% of Qwen2.5-Coder-0.5B's Q4_K sub-blocks) to another grid.

Each format has an `_r16` twin (q4_sym_g32_r16, ..., q4_0_r16): the same blocks with 16
rows interleaved, the layout the decode kernels read without transposing anything. Per
16 rows and weight group one record of 16 blocks' bytes: the 16 scales (f16), the 16
offsets (asym), then per 32-value sub-block [dword i = 0..3][row 0..15][4 nibble bytes],
so one 512-bit load is dword i of the 16 rows. A model is converted to it once at load
for the native backend where it pays (`kernels.r16_pays`); files keep the plain layout.

    q4_0   : ggml's Q4_0 rule, d = m / -8 where m is the value of largest magnitude (sign
             kept), q = min(15, trunc(w / d + 8.5)); stored and decoded exactly as
             q4_sym_g32. It exists to reproduce llama.cpp's Q4_0 files block for block.

The two symmetric rules trade differently: absmax / 7 keeps both ends of the block on the
grid (q 1..15) and wastes code 0; signed max / -8 uses all 16 codes, puts the block's
largest value on -8 exactly but leaves the other side one step shorter. On weights that
were themselves rounded to a 5-bit grid many values land exactly half-way between two
codes under the /-8 scale, and ggml's "+ 8.5 then truncate" sends every such tie the same
way; absmax / 7 measured 2.2 perplexity better on Qwen2.5-Coder-0.5B (README).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lattice_engine.quant.formats import WeightFormat

GROUP_SIZES = (32, 64, 128)
SUB = 32  # values per nibble sub-block
GGML_TYPE_Q4_0 = 2
GGML_TYPE_Q4_1 = 3
FAMILIES = ("q4_sym", "q4_asym")
GGML_Q4_0 = "q4_0"  # the q4_sym_g32 layout with ggml's rounding rule (group 32 only)


def format_name(family: str, group: int) -> str:
    return GGML_Q4_0 if family == GGML_Q4_0 else f"{family}_g{group}"


R16_SUFFIX = "_r16"


def layout_of(name: str) -> tuple[str, int]:
    """A format name -> (the family whose blocks and kernels it uses, group size); an _r16
    twin gives its plain format's."""
    name = name[:-len(R16_SUFFIX)] if name.endswith(R16_SUFFIX) else name
    if name == GGML_Q4_0:
        return "q4_sym", 32
    family, _, group = name.rpartition("_g")
    if family not in FAMILIES or not group.isdigit():
        raise KeyError(f"{name!r} is not a lattice-quant-q4 format")
    return family, int(group)


def header_bytes(family: str) -> int:
    return 4 if family == "q4_asym" else 2


def bytes_per_block(family: str, group: int) -> int:
    return header_bytes(family) + group // 2


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf (ggml's reference quantizers), not numpy's half-to-even."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, nblocks, G] (0..15) -> nibble bytes [rows, nblocks, G/2]."""
    rows, nb, g = q.shape
    sub = q.reshape(rows, nb, g // SUB, 2, SUB // 2)
    return (sub[:, :, :, 0, :] | (sub[:, :, :, 1, :] << 4)).reshape(rows, nb, g // 2)


def unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """nibble bytes [rows, nblocks, G/2] -> uint8 codes [rows, nblocks, G]."""
    rows, nb, half = b.shape
    sub = b.reshape(rows, nb, half // (SUB // 2), 1, SUB // 2)
    return np.concatenate([sub & 0x0F, sub >> 4], axis=3).reshape(rows, nb, half * 2)


def quantize(family: str, group: int, w: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] -> packed uint8 [rows, cols / group * bytes_per_block]."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    nb = cols // group
    blocks = w.reshape(rows, nb, group)
    hdr = header_bytes(family)
    out = np.empty((rows, nb, bytes_per_block(family, group)), dtype=np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        if family == GGML_Q4_0:
            # ggml's quantize_row_q4_0_ref in float32: id = 1 / d, min(15, (int8)(x * id + 8.5))
            idx = np.abs(blocks).argmax(axis=-1)[..., None]
            d = np.take_along_axis(blocks, idx, axis=-1) / np.float32(-8)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)
            out[..., :2] = d.astype(np.float16).view(np.uint8)
        elif family == "q4_sym":
            amax = np.abs(blocks).max(axis=-1, keepdims=True)
            d = amax / np.float32(7)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = np.clip(round_half_away(blocks * inv) + 8, 0, 15).astype(np.uint8)
            out[..., :2] = d.astype(np.float16).view(np.uint8)
        else:
            lo = blocks.min(axis=-1, keepdims=True)
            hi = blocks.max(axis=-1, keepdims=True)
            d = (hi - lo) / np.float32(15)
            inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            # ggml: min(15, (int8)((x - min) * id + 0.5)); the argument is >= 0, so the
            # truncation is round half up, i.e. round half away from zero
            q = np.minimum(np.floor((blocks - lo) * inv + np.float32(0.5)), 15).astype(np.uint8)
            out[..., :2] = d.astype(np.float16).view(np.uint8)
            out[..., 2:4] = lo.astype(np.float16).view(np.uint8)
    out[..., hdr:] = pack_nibbles(q)
    return out.reshape(rows, -1)


def to_float(family: str, group: int, data: np.ndarray, cols: int) -> np.ndarray:
    """packed uint8 [rows, row_bytes] -> float32 [rows, cols]."""
    rows = data.shape[0]
    nb = cols // group
    blocks = np.ascontiguousarray(data).reshape(rows, nb, bytes_per_block(family, group))
    hdr = header_bytes(family)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).astype(np.float32)
    q = unpack_nibbles(blocks[..., hdr:]).astype(np.float32)
    if family in ("q4_sym", GGML_Q4_0):
        return (d * (q - np.float32(8))).reshape(rows, cols)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, cols)


R16_ROWS = 16


def _r16_shape(family: str, group: int, data: np.ndarray) -> tuple[int, int, int]:
    rows, nbytes = data.shape
    bpb = bytes_per_block(family, group)
    if rows % R16_ROWS or nbytes % bpb:
        raise ValueError(f"the _r16 layout needs rows % 16 == 0 and whole {bpb}-byte blocks, "
                         f"got {data.shape}")
    return rows, nbytes // bpb, header_bytes(family)


def to_r16(family: str, group: int, data: np.ndarray) -> np.ndarray:
    """Plain blocks uint8 [rows, row_bytes] -> the _r16 layout of the same shape (the
    numpy reference of q4_relayout in native/q4_kernels.c)."""
    rows, ng, hdr = _r16_shape(family, group, data)
    subs = group // SUB
    blk = np.ascontiguousarray(data).reshape(rows // R16_ROWS, R16_ROWS, ng, -1)
    heads = blk[..., :hdr].reshape(rows // R16_ROWS, R16_ROWS, ng, hdr // 2, 2)
    # [chunk, group, scale/offset, row, 2 bytes]
    heads = heads.transpose(0, 2, 3, 1, 4).reshape(rows // R16_ROWS, ng, R16_ROWS * hdr)
    nib = blk[..., hdr:].reshape(rows // R16_ROWS, R16_ROWS, ng, subs, 4, 4)
    # [chunk, group, sub-block, dword, row, 4 bytes]
    nib = nib.transpose(0, 2, 3, 4, 1, 5).reshape(rows // R16_ROWS, ng, subs * 256)
    return np.concatenate([heads, nib], axis=-1).reshape(rows, -1)


def from_r16(family: str, group: int, data: np.ndarray) -> np.ndarray:
    """The inverse of `to_r16`."""
    rows, ng, hdr = _r16_shape(family, group, data)
    subs = group // SUB
    rec = np.ascontiguousarray(data).reshape(rows // R16_ROWS, ng, -1)
    heads = rec[..., :R16_ROWS * hdr].reshape(rows // R16_ROWS, ng, hdr // 2, R16_ROWS, 2)
    heads = heads.transpose(0, 3, 1, 2, 4).reshape(rows // R16_ROWS, R16_ROWS, ng, hdr)
    nib = rec[..., R16_ROWS * hdr:].reshape(rows // R16_ROWS, ng, subs, 4, R16_ROWS, 4)
    nib = nib.transpose(0, 4, 1, 2, 3, 5).reshape(rows // R16_ROWS, R16_ROWS, ng, subs * 16)
    return np.concatenate([heads, nib], axis=-1).reshape(rows, -1)


Q4_K_BLOCK, Q4_K_BYTES = 256, 144  # ggml's Q4_K: 256 values, f16 d, f16 dmin, 12 + 128 bytes


def q4_k_to_q4_asym_g32(raw: np.ndarray, cols: int) -> np.ndarray:
    """GGUF Q4_K rows (uint8 [rows, cols / 256 * 144]) -> q4_asym_g32 rows (Q4_1 blocks),
    one block per 32-value sub-block: scale = f16(d * sc), offset = f16(-(dmin * m)) with
    ggml's float32 products (dequantize_row_q4_K, get_scale_min_k4), the 4-bit codes as
    they are. A value moves by at most 15 |d*sc - scale| + |dmin*m + offset| (the two f16
    roundings). A scale past f16's range is a ValueError (the loader then re-quantizes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    rows = raw.shape[0]
    if cols % Q4_K_BLOCK or raw.shape[1] != cols // Q4_K_BLOCK * Q4_K_BYTES:
        raise ValueError(f"{raw.shape[1]} bytes per row are not Q4_K blocks of {cols} values")
    b = raw.reshape(-1, Q4_K_BYTES)
    n = b.shape[0]
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)  # [n, 1]
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    k = b[:, 4:16]
    sc = np.empty((n, 8), np.uint8)
    mn = np.empty((n, 8), np.uint8)
    sc[:, :4], mn[:, :4] = k[:, 0:4] & 63, k[:, 4:8] & 63
    sc[:, 4:] = (k[:, 8:12] & 0xF) | ((k[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (k[:, 8:12] >> 4) | ((k[:, 4:8] >> 6) << 4)
    with np.errstate(over="ignore"):
        scale = (d * sc.astype(np.float32)).astype(np.float16)
        offset = (-(dmin * mn.astype(np.float32))).astype(np.float16)
    if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
        raise ValueError("a Q4_K sub-block's scale or minimum exceeds float16's range")
    # 64 values per 32 bytes: sub-block 2c in the low nibbles of bytes c*32 .. c*32 + 31,
    # sub-block 2c + 1 in their high nibbles
    qs = b[:, 16:].reshape(n, 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, SUB)
    out = np.empty((n, 8, bytes_per_block("q4_asym", SUB)), np.uint8)
    out[..., 0:2] = scale.view(np.uint8).reshape(n, 8, 2)
    out[..., 2:4] = offset.view(np.uint8).reshape(n, 8, 2)
    out[..., 4:] = pack_nibbles(codes)
    return out.reshape(rows, -1)


def make_format(family: str, group: int) -> WeightFormat:
    gguf = None
    if group == 32:
        gguf = GGML_TYPE_Q4_0 if family == "q4_sym" else GGML_TYPE_Q4_1
    from_stored = {"q4_k": q4_k_to_q4_asym_g32} if (family, group) == ("q4_asym", 32) \
        else None
    return WeightFormat(
        format_name(family, group), group, bytes_per_block(family, group),
        quantize=lambda w, f=family, g=group: quantize(f, g, w),
        to_float=lambda data, cols, f=family, g=group: to_float(f, g, data, cols),
        gguf_type=gguf, from_stored=from_stored)


def make_r16_format(plain: WeightFormat) -> WeightFormat:
    """The _r16 twin of a plain format: same blocks, 16 rows interleaved (`to_r16`)."""
    family, group = layout_of(plain.name)
    return WeightFormat(
        plain.name + R16_SUFFIX, group, plain.bytes_per_block,
        quantize=lambda w, q=plain.quantize, f=family, g=group: to_r16(f, g, q(w)),
        to_float=lambda data, cols, f=family, g=group: to_float(f, g, from_r16(f, g, data),
                                                                cols),
        row_group=R16_ROWS)


Q4_FORMATS = tuple(make_format(f, g) for f in FAMILIES for g in GROUP_SIZES) + (
    # no gguf_type: GGUF Q4_0 tensors load as q4_sym_g32, which decodes them identically
    dataclasses.replace(make_format(GGML_Q4_0, 32), gguf_type=None),)
# converted to at load (never chosen by a quant method, never written to a file)
Q4_R16_FORMATS = tuple(make_r16_format(f) for f in Q4_FORMATS)
