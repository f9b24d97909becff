"""Table-driven checks over every registered weight format and quant method."""

import numpy as np
import pytest

from conftest import FIXTURES
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.core_formats import quantize_q8_0
from lattice_engine.quant.formats import pack
from lattice_engine.quant.methods import QuantSpec

REGISTRY = PluginManager(allowlist=[]).registry
FORMATS = REGISTRY.items["weight_formats"]
# relative RMS round-trip error allowed on Gaussian weights, per format
ROUND_TRIP_LIMIT = {"f32": 0.0, "f16": 1e-3, "q8_0": 1e-2}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_round_trip_error(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7 * fmt.row_group, 4 * 32)).astype(np.float32)
    packed = pack(fmt, "w", w)
    assert packed.data.dtype == np.uint8
    assert packed.data.shape == (w.shape[0], fmt.row_bytes(w.shape[1]))
    back = packed.to_float()
    rel = np.sqrt(np.mean((back - w) ** 2) / np.mean(w ** 2))
    assert rel <= ROUND_TRIP_LIMIT.get(name, 0.15)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_reference_matmul_and_embed_agree_with_dequantized(name):
    from lattice_engine import ops
    fmt = FORMATS[name]
    rng = np.random.default_rng(1)
    w = pack(fmt, "w", rng.standard_normal((5 * fmt.row_group, 64)).astype(np.float32))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(ops.matmul(x, w), x @ w.to_float().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ops.embed(w, np.array([4, 0])), w.to_float()[[4, 0]])


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
