"""A GGUF file's Q4_K blocks kept in q4_asym_g32 by re-encoding (`from_stored`), not by
quantizing their dequantized values again: the file's 4-bit codes stay, each 32-value
sub-block's scale and minimum are rounded once to f16."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_quant_q4.formats import Q4_K_BYTES, q4_k_to_q4_asym_g32, quantize, to_float

gguf = pytest.importorskip("gguf")


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Q4_K rows of random codes, scales and minimums, with d and dmin of weight size."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // 256 * Q4_K_BYTES), dtype=np.uint8)
    blocks = raw.reshape(-1, Q4_K_BYTES)
    for lo in (0, 2):  # d, dmin
        blocks[:, lo:lo + 2] = rng.uniform(1e-4, 2e-3, (len(blocks), 1)).astype(
            np.float16).view(np.uint8)
    return raw


def sub_block_terms(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per 32-value sub-block, ggml's float32 scale d * sc and minimum dmin * m, and its
    codes [n, 8, 32] (dequantize_row_q4_K's arithmetic, written out independently)."""
    b = raw.reshape(-1, Q4_K_BYTES)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = np.empty((len(b), 8), np.float32), np.empty((len(b), 8), np.float32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = b[:, 4 + j] & 63, b[:, 8 + j] & 63
        else:
            sc[:, j] = (b[:, 8 + j] & 0xF) | ((b[:, j] >> 6) << 4)
            mn[:, j] = (b[:, 8 + j] >> 4) | ((b[:, 4 + j] >> 6) << 4)
    qs = b[:, 16:].reshape(-1, 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)
    return d * sc, dmin * mn, codes


def test_reencoding_moves_each_value_by_two_f16_roundings_at_most():
    rows, cols = 16, 512
    raw = random_q4_k(rows, cols)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K).reshape(rows, cols)
    ours = to_float("q4_asym", 32, q4_k_to_q4_asym_g32(raw, cols), cols)
    scale, minimum, codes = sub_block_terms(raw)
    # the two f16 roundings, then float32 rounding of d*q + m on both sides
    bound = 15 * np.abs(scale - scale.astype(np.float16).astype(np.float32)) + \
        np.abs(minimum - minimum.astype(np.float16).astype(np.float32)) + \
        4 * np.finfo(np.float32).eps * (15 * scale + minimum)
    err = np.abs(ours - ref).reshape(-1, 8, 32)
    assert (err <= bound[..., None]).all()
    # quantizing the values again would move the sub-blocks whose codes miss 0 or 15
    partial = (codes.min(-1) > 0) | (codes.max(-1) < 15)
    assert partial.any()
    again = to_float("q4_asym", 32, quantize("q4_asym", 32, ref), cols)
    moved = np.abs(again - ref).reshape(-1, 8, 32).max(-1)
    assert (moved[partial] > bound[partial]).any()


def test_a_scale_past_float16_is_a_value_error():
    raw = random_q4_k(1, 256)
    raw[0, 0:2] = np.array([np.float16(60000.0)]).view(np.uint8)  # d * sc > 65504
    raw[0, 4:8] = 63
    with pytest.raises(ValueError, match="float16"):
        q4_k_to_q4_asym_g32(raw, 256)


def write_q4_k_llama(path) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF (hidden 256) whose matrices are random Q4_K blocks; returns
    each matrix's raw rows by GGUF name."""
    h, ffn, vocab, heads, kv = 256, 512, 256, 4, 2
    wr = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((wr.add_block_count, 1), (wr.add_context_length, 128),
                       (wr.add_embedding_length, h), (wr.add_feed_forward_length, ffn),
                       (wr.add_head_count, heads), (wr.add_head_count_kv, kv)):
        add(value)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_rope_freq_base(10000.0)
    head = h // heads
    shapes = {"token_embd.weight": (vocab, h), "output.weight": (vocab, h),
              "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (kv * head, h),
              "blk.0.attn_v.weight": (kv * head, h), "blk.0.attn_output.weight": (h, h),
              "blk.0.ffn_gate.weight": (ffn, h), "blk.0.ffn_up.weight": (ffn, h),
              "blk.0.ffn_down.weight": (h, ffn)}
    raws = {}
    for i, (name, (r, c)) in enumerate(shapes.items()):
        raws[name] = random_q4_k(r, c, seed=i)
        wr.add_tensor(name, raws[name], raw_shape=(r, c // 256 * Q4_K_BYTES),
                      raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        wr.add_tensor(name, np.ones(h, np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return raws


def test_a_q4_k_gguf_under_q4_asym_keeps_the_files_codes(tmp_path):
    raws = write_q4_k_llama(tmp_path / "q4_k.gguf")
    model = load(tmp_path / "q4_k.gguf", quant=QuantSpec("q4_asym"), backend="numpy").model
    for name, linear in (("blk.0.ffn_up.weight", model.layers[0].mlp.up_proj),
                         ("blk.0.ffn_down.weight", model.layers[0].mlp.down_proj)):
        w = linear.weight
        assert w.format.name == "q4_asym_g32"
        np.testing.assert_array_equal(w.data, q4_k_to_q4_asym_g32(raws[name], w.cols))


def write_q4_k_qwen3moe(path) -> dict[str, np.ndarray]:
    """A one-layer qwen3moe GGUF (hidden 256, 4 experts of 256, top 2) whose experts are
    random Q4_K blocks [E, rows, row_bytes]; returns them by GGUF name. The rest is F32."""
    h, experts, inter, vocab, heads, kv, head = 256, 4, 256, 256, 4, 2, 64
    rng = np.random.default_rng(5)
    wr = gguf.GGUFWriter(str(path), "qwen3moe")
    for add, value in ((wr.add_block_count, 1), (wr.add_context_length, 128),
                       (wr.add_embedding_length, h), (wr.add_feed_forward_length, inter),
                       (wr.add_head_count, heads), (wr.add_head_count_kv, kv),
                       (wr.add_key_length, head), (wr.add_value_length, head),
                       (wr.add_expert_count, experts), (wr.add_expert_used_count, 2),
                       (wr.add_expert_feed_forward_length, inter)):
        add(value)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_freq_base(10000.0)
    floats = {"token_embd.weight": (vocab, h), "output.weight": (vocab, h),
              "blk.0.attn_q.weight": (heads * head, h), "blk.0.attn_k.weight": (kv * head, h),
              "blk.0.attn_v.weight": (kv * head, h), "blk.0.attn_output.weight": (h, heads * head),
              "blk.0.ffn_gate_inp.weight": (experts, h)}
    for name, shape in floats.items():
        wr.add_tensor(name, rng.normal(0, 0.05, shape).astype(np.float32))
    for name, n in (("blk.0.attn_norm.weight", h), ("blk.0.ffn_norm.weight", h),
                    ("output_norm.weight", h), ("blk.0.attn_q_norm.weight", head),
                    ("blk.0.attn_k_norm.weight", head)):
        wr.add_tensor(name, np.ones(n, np.float32))
    raws = {}
    for i, (name, (r, c)) in enumerate((("blk.0.ffn_gate_exps.weight", (inter, h)),
                                        ("blk.0.ffn_up_exps.weight", (inter, h)),
                                        ("blk.0.ffn_down_exps.weight", (h, inter)))):
        raws[name] = np.stack([random_q4_k(r, c, seed=10 * i + e) for e in range(experts)])
        wr.add_tensor(name, raws[name], raw_shape=raws[name].shape,
                      raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return raws


def test_q4_k_experts_under_q4_asym_keep_the_files_codes(tmp_path):
    """A Q4_K_M MoE file's experts (3-D, memory-mapped) are re-encoded expert by expert."""
    from lattice_engine.models.moe import SparseMoE
    raws = write_q4_k_qwen3moe(tmp_path / "moe_q4_k.gguf")
    model = load(tmp_path / "moe_q4_k.gguf", quant=QuantSpec("q4_asym"), backend="numpy").model
    moe = model.layers[0].mlp
    assert isinstance(moe, SparseMoE)
    for name, mats in (("blk.0.ffn_gate_exps.weight", moe.gate),
                       ("blk.0.ffn_up_exps.weight", moe.up),
                       ("blk.0.ffn_down_exps.weight", moe.down)):
        for e, m in enumerate(mats):
            assert m.format.name == "q4_asym_g32"
            np.testing.assert_array_equal(m.data, q4_k_to_q4_asym_g32(raws[name][e], m.cols))
    ids = np.array([[1, 2, 3, 4]])
    assert np.isfinite(model.forward(ids, model.make_cache(batch=1))).all()
