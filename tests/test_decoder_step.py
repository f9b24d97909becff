"""The fused native decode step (DecoderStep in models/transformer_step.py,
native/src/decoder.c) against the per-kernel path it replaces: the same kernels in the same
order, so the logits must be bit-identical, for every architecture fixture and core weight
format, batch > 1, across a cache that grows and across kernel variants."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ARCHITECTURES, FIXTURES
from lattice_engine import kernels
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import logits_bound

pytestmark = pytest.mark.native


def decode_logits(model, prompt: np.ndarray, steps: int, fused: bool) -> np.ndarray:
    model.fused_decode = fused
    cache = model.make_cache(batch=prompt.shape[0], capacity=3)  # grows while decoding
    logits = [model.forward(prompt, cache, last_only=True)]
    for _ in range(steps):
        logits.append(model.forward(logits[-1].argmax(-1), cache))
    assert (model._decode_step() is not None) == fused
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fused_step_equals_per_kernel_decode(name, quant):
    model = load(FIXTURES / name, quant=QuantSpec(quant), backend="native").model
    prompt = load_file(str(FIXTURES / name / "golden.safetensors"))["prompt_ids"]
    per_kernel = decode_logits(model, prompt, 6, fused=False)
    fused = decode_logits(model, prompt, 6, fused=True)
    np.testing.assert_array_equal(fused, per_kernel)


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_fused_step_on_each_variant(kernel_variant, quant):
    model = load(FIXTURES / "qwen2", quant=QuantSpec(quant), backend="native").model
    prompt = load_file(str(FIXTURES / "qwen2" / "golden.safetensors"))["prompt_ids"]
    np.testing.assert_array_equal(decode_logits(model, prompt, 4, fused=True),
                                  decode_logits(model, prompt, 4, fused=False))


def test_fused_step_rejects_bad_token_and_keeps_cache():
    model = load(FIXTURES / "llama", backend="native").model
    cache = model.make_cache(batch=1)
    model.forward(np.array([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="out of range"):
        model.forward(np.array([[model.vocab_size + 5]]), cache)
    assert cache.offset == 3
    step = model._decode_step()  # the C step checks ids itself too
    step.bind_cache(cache.keys, cache.values)
    cos, sin = model.ops.rope_tables(np.array([3]), model.inv_freq)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        step(np.array([model.vocab_size]), 3, cos, sin)
    with pytest.raises(ValueError, match="outside the bound cache"):
        step(np.array([1]), cache.capacity, cos, sin)


def test_matmul_multi_equals_separate_matmuls():
    from lattice_engine.quant.core_formats import CORE_FORMATS
    from lattice_engine.quant.formats import pack

    rng = np.random.default_rng(0)
    for fmt in CORE_FORMATS:
        ws = [pack(fmt, "w", rng.standard_normal((n, 96)).astype(np.float32))
              for n in (200, 33, 7)]
        for m in (1, 3, 12):
            x = rng.standard_normal((m, 96)).astype(np.float32)
            for w, y in zip(ws, kernels.matmul_multi(x, ws)):
                np.testing.assert_array_equal(y, kernels.matmul(x, w))


def test_matmul_multi_refuses_mixed_weights():
    from lattice_engine.quant.core_formats import CORE_FORMATS
    from lattice_engine.quant.formats import pack

    f32, f16 = CORE_FORMATS[0], CORE_FORMATS[1]
    a = pack(f32, "a", np.ones((4, 32), np.float32))
    b = pack(f16, "b", np.ones((4, 32), np.float32))
    with pytest.raises(ValueError, match="share one native format"):
        kernels.matmul_multi(np.ones((1, 32), np.float32), [a, b])


def test_a_plugin_format_with_a_c_matmul_runs_in_the_fused_step():
    """A weight format that hands over a C matmul (WeightFormat.c_matmul, the signature of
    lk_extern_matmul) is called from inside the fused step, failures included. Here the
    "plugin" is a cffi callback into numpy over float32 rows."""
    import dataclasses
    from lattice_engine.quant.formats import PackedMatrix
    ffi = kernels.runtime._ffi
    calls = []

    @ffi.callback("lk_extern_matmul")
    def matmul(ctx, x, M, K, w, ldw, N, y):
        calls.append((M, K, N))
        if ffi.cast("intptr_t", ctx) == 1:
            return 1  # "out of memory"
        xs = np.frombuffer(ffi.buffer(x, 4 * M * K), np.float32).reshape(M, K)
        ws = np.frombuffer(ffi.buffer(w, ldw * N), np.float32).reshape(N, ldw // 4)[:, :K]
        np.frombuffer(ffi.buffer(y, 4 * M * N), np.float32)[:] = (xs @ ws.T).reshape(-1)
        return 0

    address = int(ffi.cast("uintptr_t", matmul))
    model = load(FIXTURES / "llama", backend="native").model
    prompt = load_file(str(FIXTURES / "llama" / "golden.safetensors"))["prompt_ids"]
    reference = decode_logits(model, prompt, 3, fused=False)
    for ctx in (0, 1):
        for block in model.layers:  # every down_proj in the "plugin" format
            w = block.mlp.down_proj.weight
            fmt = dataclasses.replace(w.format, name="f32_via_callback", c_matmul=(address, ctx))
            block.mlp.down_proj.weight = PackedMatrix(fmt, w.rows, w.cols, w.data)
        model._step_built = False
        if ctx == 0:
            fused = decode_logits(model, prompt, 3, fused=True)
            # numpy's BLAS in the callback sums in another order than our f32 kernel
            bound = logits_bound(model, model.hidden_states(prompt, model.make_cache(batch=2)),
                                 prompt.shape[1] + 3)
            assert np.abs(fused - reference).max() <= bound
            assert calls and all(c[1] == model.config.intermediate_size for c in calls)
        else:
            with pytest.raises(MemoryError, match="out of scratch memory"):
                decode_logits(model, prompt, 3, fused=True)
