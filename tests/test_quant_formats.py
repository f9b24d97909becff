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
from lattice_engine.testing.formats import check_weight_format, int_activation_bound

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


def _super(w: np.ndarray, size: int) -> np.ndarray:
    """w as [rows, superblocks of 256, 256 / size, size]."""
    return np.abs(w).reshape(w.shape[0], -1, 256 // size, size)


def q5_0_value_bound(w: np.ndarray) -> np.ndarray:
    """ggml's Q5_0: d = (signed largest) / -16 and codes 0..31, so the value opposite the
    largest one clips at 15 d: off by up to d, plus d's f16 rounding over 16 steps."""
    d = np.abs(w.reshape(w.shape[0], -1, 32)).max(-1, keepdims=True) / 16.0
    return np.broadcast_to(d * (1 + 16 * 2.0 ** -10) * (1 + 1e-6),
                           (w.shape[0], w.shape[1] // 32, 32)).reshape(w.shape)


def q4_k_value_bound(w: np.ndarray) -> np.ndarray:
    """Q4_K by rounding (ggml_formats.quantize_q4_k): step s = range / 15 per 32 values,
    stored as a 6-bit multiple of d = max s / 63 (off by <= d / 2), the min likewise of dmin;
    half a step, plus up to 15 steps' worth of the scale's rounding where codes clip."""
    rows = w.shape[0]
    b = w.reshape(rows, -1, 8, 32)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), np.minimum(b.min(-1), 0))
    s = (hi - lo) / 15
    d = s.max(-1, keepdims=True) / 63
    dmin = (-lo).max(-1, keepdims=True) / 63
    bound = 0.5 * s + 8 * d + 0.5 * dmin + 2.0 ** -9 * (np.abs(hi) + np.abs(lo))
    return np.broadcast_to(bound[..., None] * (1 + 1e-5), b.shape).reshape(w.shape)


def q6_k_value_bound(w: np.ndarray) -> np.ndarray:
    """Q6_K by rounding: step s = amax / 31 per 16 values as an int8 multiple of d = max s /
    127; half a step plus up to 32 steps' worth of the scale's rounding (d / 2 each)."""
    b = _super(w, 16)
    s = b.max(-1) / 31
    d = s.max(-1, keepdims=True) / 127
    bound = 0.5 * s + 16.5 * d + 2.0 ** -9 * b.max(-1)
    return np.broadcast_to(bound[..., None] * (1 + 1e-5), b.shape).reshape(w.shape)


# Per value, the largest round-trip error each core format's definition allows. A format
# added to the core without an entry fails test_round_trip_error until it gets one.
ROUND_TRIP_BOUND = {
    "f32": lambda w: np.zeros_like(w),
    "f16": lambda w: np.abs(w) * 2.0 ** -11,   # 11 significant bits, round to nearest
    "q8_0": q8_0_value_bound,
    "q8_0_r16": q8_0_value_bound,              # the same blocks, rows interleaved
    "q5_0": q5_0_value_bound,                  # GGUF block types run as stored
    "q4_k": q4_k_value_bound,
    "q6_k": q6_k_value_bound,
}
# the kernels' rounding of x: int16 per 32 values (q8_0), int8 per 32 (q5_0) or per 256
# (the K-quants, as ggml's q8_K)
ACTIVATION_BOUND = {"q8_0": int_activation_bound(32767), "q8_0_r16": int_activation_bound(32767),
                    "q5_0": int_activation_bound(127), "q4_k": int_activation_bound(127, 256),
                    "q6_k": int_activation_bound(127, 256)}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_honours_the_contract(name):
    # lattice_engine.testing.formats: round trip within the per-value bound, rows
    # independent under quantize and to_float, matmul / embed (the C kernels when built)
    # against float64 on the dequantized weights
    assert name in ROUND_TRIP_BOUND, f"no round-trip bound for core format {name!r}: add one"
    check_weight_format(FORMATS[name], ROUND_TRIP_BOUND[name],
                        activation_bound=ACTIVATION_BOUND.get(name))


@pytest.mark.native
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_format_kernels_on_every_variant(name, kernel_variant):
    fmt = FORMATS[name]
    assert fmt.matmul is not None and fmt.embed is not None, f"{name} has no native kernel"
    check_weight_format(fmt, ROUND_TRIP_BOUND[name], activation_bound=ACTIVATION_BOUND.get(name),
                        seed=3)
    cols = max(64, fmt.block_size)
    w = pack(fmt, "w", np.random.default_rng(1).standard_normal((2 * fmt.row_group, cols))
             .astype(np.float32))
    np.testing.assert_array_equal(ops.embed(w, np.array([1, 0])), w.to_float()[[1, 0]])


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


def test_tied_lm_head_is_q8_0_under_q8_0_and_f16_when_asked():
    model = load(FIXTURES / "llama", quant=QuantSpec("q8_0"), backend="numpy").model
    assert model.layers[0].mlp.up_proj.weight.format.name == "q8_0"
    assert model.lm_head is model.embed_tokens
    assert model.lm_head.format.name == "q8_0"
    kept = load(FIXTURES / "llama", quant=QuantSpec("q8_0", {"*embed_tokens*": "f16"}),
                backend="numpy").model
    assert kept.lm_head is kept.embed_tokens and kept.lm_head.format.name == "f16"


def test_override_pins_a_tensor_format():
    spec = QuantSpec("q8_0", {"model.layers.0.mlp.*": "f32"})
    model = load(FIXTURES / "llama", quant=spec, backend="numpy").model
    assert model.layers[0].mlp.up_proj.weight.format.name == "f32"
    assert model.layers[1].mlp.up_proj.weight.format.name == "q8_0"
