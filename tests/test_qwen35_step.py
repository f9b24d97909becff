"""The fused Qwen3.5 decode step (Qwen35Step in models/qwen3_5_step.py,
native/src/qwen35_decoder.c) against the per-kernel path it replaces: the same kernels in
the same order, so logits and the recurrent states must be bit-identical, for both fixtures
(tied and untied), every core weight format, batch 2, a KV cache that grows while decoding,
and each kernel variant."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES
from lattice_engine import kernels
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import logits_bound

pytestmark = pytest.mark.native

QWEN35 = ["qwen3_5_text", "qwen3_5_vl"]


def decode(model, prompt: np.ndarray, steps: int, fused: bool):
    """Logits [B, 1 + steps, V] of greedy decoding after the prompt, and the cache."""
    model.fused_decode = fused
    # the prompt fills the cache exactly, so the KV arrays grow (and are re-bound) while
    # decoding
    cache = model.make_cache(batch=prompt.shape[0], capacity=prompt.shape[1])
    logits = [model.forward(prompt, cache, last_only=True)]
    for _ in range(steps):
        logits.append(model.forward(logits[-1].argmax(-1), cache))
    assert (model._decode_step() is not None) == fused
    return np.concatenate(logits, axis=1), cache


def assert_same(fused, per_kernel):
    (a, ca), (b, cb) = fused, per_kernel
    np.testing.assert_array_equal(a, b)
    for x, y in zip(ca.conv + ca.delta + ca.kv.keys + ca.kv.values,
                    cb.conv + cb.delta + cb.kv.keys + cb.kv.values):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", QWEN35)
def test_fused_step_equals_per_kernel_decode(name, quant):
    model = load(FIXTURES / name, quant=QuantSpec(quant), backend="native").model
    prompt = load_file(str(FIXTURES / name / "golden.safetensors"))["prompt_ids"]
    assert prompt.shape[0] == 2
    assert_same(decode(model, prompt, 16, fused=True), decode(model, prompt, 16, fused=False))


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_fused_step_on_each_variant(kernel_variant, quant):
    model = load(FIXTURES / "qwen3_5_text", quant=QuantSpec(quant), backend="native").model
    prompt = load_file(str(FIXTURES / "qwen3_5_text" / "golden.safetensors"))["prompt_ids"]
    assert_same(decode(model, prompt, 8, fused=True), decode(model, prompt, 8, fused=False))


def test_fused_step_matches_transformers():
    """The fused path is what decode runs by default: it stays within the parity bar."""
    model = load(FIXTURES / "qwen3_5_text", backend="native").model
    assert model.fused_decode
    ref = load_file(str(FIXTURES / "qwen3_5_text" / "golden.safetensors"))
    cache = model.make_cache(batch=2)
    model.forward(ref["prompt_ids"], cache)
    steps = ref["decode_ids"]
    out = np.concatenate([model.forward(steps[:, i:i + 1], cache) for i in range(steps.shape[1])], 1)
    assert model._decode_step() is not None
    bound = logits_bound(model, model.hidden_states(ref["prompt_ids"], model.make_cache(batch=2)),
                         ref["prompt_ids"].shape[1] + steps.shape[1])
    assert np.abs(out - ref["decode_logits"]).max() <= bound


def test_fused_step_snapshot_restore():
    model = load(FIXTURES / "qwen3_5_text", quant=QuantSpec("q8_0"), backend="native").model
    cache = model.make_cache(batch=1)
    model.forward(np.array([[5, 6, 7, 8]]), cache)
    snap = cache.snapshot()
    first = [model.forward(np.array([[t]]), cache) for t in (9, 10, 11)]
    cache.restore(snap)
    again = [model.forward(np.array([[t]]), cache) for t in (9, 10, 11)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_fused_step_rejects_bad_input_and_keeps_cache():
    model = load(FIXTURES / "qwen3_5_text", backend="native").model
    cache = model.make_cache(batch=1, capacity=8)
    model.forward(np.array([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(np.array([[model.vocab_size + 5]]), cache)
    assert cache.offset == 3
    step = model._decode_step()  # the C step checks ids and positions itself too
    step.bind_cache(cache.kv.keys, cache.kv.values, cache.conv, cache.delta)
    before = [a.copy() for a in cache.conv + cache.delta]
    cos, sin = model.ops.rope_tables(np.array([3]), model.inv_freq)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        step(np.array([model.vocab_size]), 3, cos, sin)
    with pytest.raises(ValueError, match="outside the bound cache"):
        step(np.array([1]), cache.kv.capacity, cos, sin)
    with pytest.raises(ValueError, match="bind_cache"):
        step(np.array([1, 2]), 3, cos, sin)
    for a, b in zip(before, cache.conv + cache.delta):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="state arrays"):
        step.bind_cache(cache.kv.keys, cache.kv.values, cache.conv[:1], cache.delta[:1])


def test_native_gates_match_numpy():
    from lattice_engine import ops
    x = np.concatenate([np.linspace(-30, 30, 601, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf], np.float32)])
    with np.errstate(over="ignore", invalid="ignore"):
        np.testing.assert_allclose(kernels.sigmoid(x), ops.sigmoid(x), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(kernels.softplus(x), ops.softplus(x), rtol=1e-6, atol=1e-7)


def test_fused_step_with_mixed_formats_in_a_layer():
    """Per-tensor overrides put matrices that read one input in different formats: the step
    runs one job per format and still equals the per-kernel path."""
    spec = QuantSpec("q8_0", {"*in_proj_b*": "f32", "*in_proj_z*": "f16", "*k_proj*": "f16",
                              "*up_proj*": "f32"})
    model = load(FIXTURES / "qwen3_5_text", quant=spec, backend="native").model
    a = model.layers[0].linear_attn
    from lattice_engine.quant.core_formats import r16_pays
    q8 = "q8_0_r16" if r16_pays() else "q8_0"  # q8_0 as run natively here
    assert {a.in_proj_qkv.weight.format.name, a.in_proj_b.weight.format.name,
            a.in_proj_z.weight.format.name} == {q8, "f32", "f16"}
    prompt = load_file(str(FIXTURES / "qwen3_5_text" / "golden.safetensors"))["prompt_ids"]
    assert_same(decode(model, prompt, 6, fused=True), decode(model, prompt, 6, fused=False))
