"""GGUF block types run as stored (Q4_K, Q5_0, Q6_K: a Q4_K_M file's): the quantizers'
bytes read back by the gguf package's reference decoder, the native matmul against the
dequantized weights within x's int8 rounding (the error model below), the same bits on the
scalar and AVX2 paths and at every M, embedding lookups, and the `gguf` quant method on a
tiny model file."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import kernels
from lattice_engine.plugins import get_plugin_manager
from lattice_engine.quant import ggml_formats
from lattice_engine.quant.ggml_formats import GGML_FORMATS, Q4_K, Q5_0, Q6_K
from lattice_engine.testing.gguf_header import add_transformer_header

gguf = pytest.importorskip("gguf")

get_plugin_manager().registry  # the built-in plugin attaches the native kernels to the formats
native = pytest.mark.skipif(not kernels.available() or Q4_K.c_matmul is None,
                            reason="the native kernels are not built")
TYPES = {"q5_0": 6, "q4_k": 12, "q6_k": 14}
# x is quantized to int8 per this many values (one scale each)
X_GROUP = {"q5_0": 32, "q4_k": 256, "q6_k": 256}


def random_weights(fmt, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[:, :3] *= 20  # a few large columns, as real weights have
    return fmt.quantize(w)


@pytest.mark.parametrize("fmt", GGML_FORMATS, ids=lambda f: f.name)
def test_quantizer_bytes_decode_with_the_gguf_reference(fmt):
    """Our encoders' blocks, decoded by the gguf package, give values within each format's
    own step of the input: the byte layout is ggml's."""
    from gguf.quants import dequantize
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 512)).astype(np.float32)
    data = fmt.quantize(w)
    assert data.shape == (6, fmt.row_bytes(512))
    ref = np.asarray(dequantize(data, gguf.GGMLQuantizationType(fmt.gguf_type)), np.float32)
    np.testing.assert_array_equal(fmt.to_float(data, 512), ref.reshape(6, 512))
    levels = {"q5_0": 16, "q4_k": 7, "q6_k": 31}[fmt.name]  # steps across half the range
    group = 16 if fmt.name == "q6_k" else 32
    amax = np.abs(w).reshape(6, -1, group).max(axis=-1, keepdims=True)
    err = np.abs(ref.reshape(6, 512) - w).reshape(6, -1, group)
    # half a step, plus the 6-bit / 8-bit rounding of the sub-block scales (Q4_K, Q6_K)
    slack = 1.0 if fmt.name == "q5_0" else 1.6
    assert np.all(err <= slack * amax / levels)


def x_rounding_bound(x: np.ndarray, w: np.ndarray, group: int) -> np.ndarray:
    """|y - x @ w.T| when x is rounded to int8 per `group` values (half a step, amax / 127,
    per value) and the products are summed in float32."""
    m, k = x.shape
    amax = np.abs(x).reshape(m, k // group, group).max(axis=-1)
    step = np.repeat(amax / 127.0, group, axis=1)
    aw = np.abs(w).astype(np.float64)
    return 0.5 * step @ aw.T + 1e-6 * (np.abs(x) @ aw.T) + 1e-6


@native
@pytest.mark.parametrize("fmt", GGML_FORMATS, ids=lambda f: f.name)
def test_matmul_is_the_dequantized_weights_times_rounded_x(fmt):
    data = random_weights(fmt, 40, 768)
    w = fmt.to_float(data, 768)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 768)).astype(np.float32)
    x[:, 10] *= 30  # an outlier feature
    y = fmt.matmul(x, data)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    err = np.abs(y - ref)
    assert np.all(err <= x_rounding_bound(x, w, X_GROUP[fmt.name]))
    assert err.max() > 0  # x was rounded: the kernel ran, not a float fallback


@native
@pytest.mark.parametrize("fmt", GGML_FORMATS, ids=lambda f: f.name)
def test_every_path_and_batch_size_gives_the_same_bits(fmt):
    """The scalar kernels (LATTICE_ISA=generic) and the AVX2 ones compute the same integer
    lanes and float steps; a row's result does not depend on how many rows run with it."""
    data = random_weights(fmt, 37, 512, seed=3)
    x = np.random.default_rng(4).standard_normal((17, 512)).astype(np.float32)
    before = kernels.isa()
    try:
        kernels.set_isa("generic")
        generic = fmt.matmul(x, data)
        kernels.set_isa("avx2")
        fast = fmt.matmul(x, data)
    finally:
        kernels.set_isa(before)
    np.testing.assert_array_equal(fast, generic)
    for m in (1, 2, 3, 4, 5, 8, 9):
        np.testing.assert_array_equal(fmt.matmul(x[:m], data), fast[:m])
    np.testing.assert_array_equal(fmt.matmul(x[7:8], data), fast[7:8])


@native
def test_extreme_blocks_do_not_overflow():
    """Largest codes and scales (Q6_K: |code - 32| x |scale| up to 32 x 128) against x at
    full scale: the integer sums stay exact."""
    rng = np.random.default_rng(5)
    rows, cols = 8, 512
    raw = rng.choice(np.array([0, 255], np.uint8), (rows, cols // 256, 210))
    raw[..., 192:208] = rng.choice(np.array([0x80, 0x7F], np.uint8), (rows, cols // 256, 16))
    half = np.array([0.01], np.float16).view(np.uint8)
    raw[..., 208:210] = half
    data = raw.reshape(rows, -1)
    w = Q6_K.to_float(data, cols)
    x = np.sign(rng.standard_normal((3, cols))).astype(np.float32)
    y = Q6_K.matmul(x, data)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.abs(y - ref) <= x_rounding_bound(x, w, 256))
    q4 = np.full((rows, cols // 256, 144), 0xFF, np.uint8)
    q4[..., 0:4] = np.tile(half, 2)
    data = q4.reshape(rows, -1)
    w = Q4_K.to_float(data, cols)
    y = Q4_K.matmul(x, data)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.abs(y - ref) <= x_rounding_bound(x, w, 256))


@native
@pytest.mark.parametrize("fmt", GGML_FORMATS, ids=lambda f: f.name)
def test_embedding_rows_are_the_dequantized_rows(fmt):
    data = random_weights(fmt, 20, 256, seed=6)
    ids = np.array([0, 19, 7, 7])
    np.testing.assert_array_equal(fmt.embed(data, ids), fmt.to_float(data, 256)[ids])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        fmt.embed(data, np.array([20]))


@native
def test_shapes_that_are_not_whole_blocks_are_refused():
    from lattice_engine.kernels import ggml
    data = random_weights(Q4_K, 4, 256)
    with pytest.raises(ValueError, match="not"):
        ggml.matmul(np.zeros((1, 128), np.float32), data, TYPES["q4_k"])
    with pytest.raises(ValueError, match="no native matmul"):
        ggml.matmul(np.zeros((1, 256), np.float32), data, 3)


# ---- the `gguf` quant method on a tiny model file ------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, VOCAB = 256, 4, 2, 512, 2, 300


def write_k_quant_gguf(path) -> dict:
    """A tiny qwen2 file typed like a Q4_K_M one: Q4_K matrices, Q6_K ffn_down and output,
    a Q5_0 embedding; returns the float weights its blocks were made from."""
    from lattice_engine.io.gguf_tokenizer import byte_alphabet
    rng = np.random.default_rng(7)
    f = lambda *s: (rng.standard_normal(s) * 0.08).astype(np.float32)  # noqa: E731
    tokens = [byte_alphabet()[b] for b in range(256)] + ["Ġt"]
    tokens += [f"t{i}" for i in range(VOCAB - len(tokens) - 2)]
    tokens += ["<|im_start|>", "<|im_end|>"]
    wr = gguf.GGUFWriter(str(path), "qwen2")
    add_transformer_header(wr, layers=LAYERS, hidden=HIDDEN, ffn=FFN, heads=HEADS,
                           kv_heads=KV_HEADS, eps=1e-6)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(tokens)
    wr.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    wr.add_token_merges(["Ġ t"])
    wr.add_bos_token_id(len(tokens) - 2)
    wr.add_eos_token_id(len(tokens) - 1)
    head = HIDDEN // HEADS
    mats = {"token_embd.weight": (Q5_0, f(VOCAB, HIDDEN)),
            "output.weight": (Q6_K, f(VOCAB, HIDDEN))}
    wr.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        p = f"blk.{i}."
        mats.update({p + "attn_q.weight": (Q4_K, f(HEADS * head, HIDDEN)),
                     p + "attn_k.weight": (Q4_K, f(KV_HEADS * head, HIDDEN)),
                     p + "attn_v.weight": (Q4_K, f(KV_HEADS * head, HIDDEN)),
                     p + "attn_output.weight": (Q4_K, f(HIDDEN, HEADS * head)),
                     p + "ffn_gate.weight": (Q4_K, f(FFN, HIDDEN)),
                     p + "ffn_up.weight": (Q4_K, f(FFN, HIDDEN)),
                     p + "ffn_down.weight": (Q6_K, f(HIDDEN, FFN))})
        for b, n in (("attn_q.bias", HEADS * head), ("attn_k.bias", KV_HEADS * head),
                     ("attn_v.bias", KV_HEADS * head)):
            wr.add_tensor(p + b, f(n))
        wr.add_tensor(p + "attn_norm.weight", np.ones(HIDDEN, np.float32))
        wr.add_tensor(p + "ffn_norm.weight", np.ones(HIDDEN, np.float32))
    for name, (fmt, w) in mats.items():
        qt = gguf.GGMLQuantizationType(fmt.gguf_type)
        wr.add_tensor(name, fmt.quantize(w), raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return mats


@native
def test_gguf_method_runs_the_files_blocks(tmp_path):
    """`--quant gguf` keeps every Q4_K / Q5_0 / Q6_K matrix in the file's bytes, runs the
    fused decode step on them (embedding lookups included), and its logits are the file's
    values times x rounded to int8; the default still loads q8_0."""
    from lattice_engine.generate import generate_step
    from lattice_engine.io.gguf_reader import load_gguf
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    from lattice_engine.sampling import SamplingParams, make_sampler
    path = tmp_path / "tiny-q4_k_m.gguf"
    write_k_quant_gguf(path)
    loaded = load(path, quant=QuantSpec("gguf"), backend="native")
    assert loaded.quant == "gguf"
    model = loaded.model
    up = model.layers[0].mlp.up_proj.weight
    down = model.layers[0].mlp.down_proj.weight
    assert (up.format.name, down.format.name, model.embed_tokens.format.name) == (
        "q4_k", "q6_k", "q5_0")
    raw = load_gguf(path, packed_formats={12: "q4_k"}).tensors[
        "model.layers.0.mlp.up_proj.weight"]().data
    np.testing.assert_array_equal(np.asarray(up.data), raw)  # the file's bytes
    assert model._decode_step() is not None  # the fused C step takes these formats

    exact = load(path, quant=QuantSpec("f32"), backend="numpy").model
    tokens = np.array([[5, 77, 120, 3, 250, 9]])
    got = model.forward(tokens, model.make_cache(capacity=16))
    ref = exact.forward(tokens, exact.make_cache(capacity=16))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    # x rounded to int8 per 256 values (amax ~ 2.8 sigma for Gaussian x): a relative error
    # of 2.8 / 127 / sqrt(12) ~ 0.64% per matmul, and the logits sit behind 9 matmuls in
    # sequence (q / k / v, o, gate / up, down per layer, the lm_head): at most ~5.8%
    assert 0 < rel < 9 * 2.8 / 127 / 12 ** 0.5, rel

    # decode through the fused step gives the per-kernel forward's logits
    cache = model.make_cache(capacity=16)
    model.forward(tokens[:, :-1], cache)
    step = model.forward(tokens[:, -1:], cache)
    np.testing.assert_allclose(step[0, -1], got[0, -1], rtol=0, atol=1e-4 * np.abs(got).max())
    out = list(generate_step(model, [5, 77, 120], make_sampler(SamplingParams(temperature=0)),
                             max_tokens=4))
    assert len(out) == 4
    # the default is unchanged: q8_0 where its kernels are vectorized, else float32
    assert load(path, backend="native").quant == ("f32" if kernels.isa() == "generic" else "q8_0")


def test_gguf_method_on_a_folder_is_a_clear_error(tmp_path):
    from lattice_engine.errors import ConfigError
    from lattice_engine.loading import load
    from lattice_engine.quant.methods import QuantSpec
    folder = next(p for p in __import__("pathlib").Path(__file__).parent.joinpath(
        "fixtures").iterdir() if (p / "config.json").exists() and
        (p / "tokenizer.json").exists())
    with pytest.raises(ConfigError, match="not a GGUF file"):
        load(folder, quant=QuantSpec("gguf"))


def test_formats_are_registered_with_their_ggml_ids():
    registry = get_plugin_manager().registry
    for name, ggml_id in TYPES.items():
        fmt = registry.get("weight_formats", name)
        assert fmt.gguf_type == ggml_id and fmt.block_size in (32, 256)
    assert ggml_formats.is_core_ggml(Q4_K) == (Q4_K.c_matmul is not None)
