"""Table-driven checks over every registered weight format and quant method."""

import numpy as np
import pytest

from conftest import FIXTURES
from lattice_engine import ops
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.core_formats import quantize_q8_0
from lattice_engine.quant.formats import pack
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import dot_bound, matmul_magnitude

REGISTRY = PluginManager(allowlist=[]).registry
FORMATS = REGISTRY.items["weight_formats"]


def q8_0_value_bound(w: np.ndarray) -> np.ndarray:
    """q8_0 stores each 32-block as int8 steps of d = amax / 127, d rounded to f16: a value
    is off by at most d / 2 (rounding to a step) plus 127 |d - f16(d)| <= 127 d 2^-11 (the
    scale's own rounding), a little over 0.56 d."""
    rows, cols = w.shape
    step = np.abs(w.reshape(rows, cols // 32, 32)).max(-1, keepdims=True) / 127.0
    return np.broadcast_to(step * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-6), (rows, cols // 32, 32)
                           ).reshape(rows, cols)


# Per value, the largest round-trip error each core format's definition allows. A format
# added to the core without an entry fails test_round_trip_error until it gets one.
ROUND_TRIP_BOUND = {
    "f32": lambda w: np.zeros_like(w),
    "f16": lambda w: np.abs(w) * 2.0 ** -11,   # 11 significant bits, round to nearest
    "q8_0": q8_0_value_bound,
    "q8_0_r16": q8_0_value_bound,              # the same blocks, rows interleaved
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_error(name):
    fmt = FORMATS[name]
    assert name in ROUND_TRIP_BOUND, f"no round-trip bound for core format {name!r}: add one"
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7 * fmt.row_group, 4 * 32)).astype(np.float32)
    packed = pack(fmt, "w", w)
    assert packed.data.dtype == np.uint8
    assert packed.data.shape == (w.shape[0], fmt.row_bytes(w.shape[1]))
    back = packed.to_float()
    excess = np.abs(back.astype(np.float64) - w) - ROUND_TRIP_BOUND[name](w)
    assert excess.max() <= 0, f"{name}: a value is off by {excess.max():.3g} beyond its bound"


def activation_step_bound(name: str, x: np.ndarray) -> np.ndarray:
    """How far the activations a format's kernel multiplies may be from x: the q8_0 kernels
    round x to int16 per 32 values (step amax / 32767, off by at most half a step); the
    float formats use x as it is."""
    if not name.startswith("q8_0"):
        return np.zeros_like(x, dtype=np.float64)
    blocks = np.abs(x.astype(np.float64)).reshape(x.shape[0], -1, 32)
    half_step = blocks.max(-1, keepdims=True) / 32767 / 2
    return np.broadcast_to(half_step, blocks.shape).reshape(x.shape)


@pytest.mark.native
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_kernels_agree_with_dequantized(name, kernel_variant):
    # the format's own matmul and embed (the C kernels the native backend calls) against
    # float64 arithmetic on the dequantized weights: the float32 dot-product bound, plus
    # the activation rounding the format's kernel does, at |W|'s scale
    fmt = FORMATS[name]
    assert fmt.matmul is not None and fmt.embed is not None, f"{name} has no native kernel"
    rng = np.random.default_rng(1)
    w = pack(fmt, "w", rng.standard_normal((5 * fmt.row_group, 64)).astype(np.float32))
    dense = w.to_float()
    for m in (1, 3, 9):
        x = rng.standard_normal((m, 64)).astype(np.float32)
        got = fmt.matmul(x, w.data)
        exact = x.astype(np.float64) @ dense.astype(np.float64).T
        bound = dot_bound(64, matmul_magnitude(x, dense)) + \
            activation_step_bound(name, x) @ np.abs(dense.astype(np.float64)).T
        assert (np.abs(got - exact) <= bound).all(), f"{name} M={m}: {np.abs(got - exact).max():.3g}"
    ids = np.array([4, 0, w.rows - 1])
    np.testing.assert_array_equal(fmt.embed(w.data, ids), dense[ids])
    np.testing.assert_array_equal(ops.embed(w, ids), dense[ids])


def test_q8_0_bytes_equal_gguf_reference_quantizer():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    w = np.random.default_rng(2).standard_normal((4, 96)).astype(np.float32)
    ours = quantize_q8_0(w)
    theirs = quantize(w, GGMLQuantizationType.Q8_0)
    np.testing.assert_array_equal(ours, theirs.reshape(ours.shape))


def test_block_mismatch_is_a_clear_error():
    from lattice_engine.errors import CheckpointError
    with pytest.raises(CheckpointError, match="multiple of 32"):
        pack(FORMATS["q8_0"], "layer.w", np.zeros((2, 33), np.float32))


@pytest.mark.parametrize("method,limit", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_quantized_model_stays_close_to_f32(method, limit):
    from safetensors.numpy import load_file
    golden = load_file(str(FIXTURES / "qwen2" / "golden.safetensors"))
    model = load(FIXTURES / "qwen2", quant=QuantSpec(method), backend="numpy").model
    logits = model.forward(golden["prompt_ids"], model.make_cache(batch=2))
    assert np.abs(logits - golden["prefill_logits"]).max() <= limit


def test_tied_lm_head_stays_f16_under_q8_0():
    model = load(FIXTURES / "llama", quant=QuantSpec("q8_0"), backend="numpy").model
    assert model.layers[0].mlp.up_proj.weight.format.name == "q8_0"
    assert model.lm_head is model.embed_tokens
    assert model.lm_head.format.name == "f16"


def test_override_pins_a_tensor_format():
    spec = QuantSpec("q8_0", {"model.layers.0.mlp.*": "f32"})
    model = load(FIXTURES / "llama", quant=spec, backend="numpy").model
    assert model.layers[0].mlp.up_proj.weight.format.name == "f32"
    assert model.layers[1].mlp.up_proj.weight.format.name == "q8_0"
