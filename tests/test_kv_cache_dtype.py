"""`[model] kv_cache`: the dense cache storing keys and values as f16 or q8_0. Attention
computes over exactly the stored values; the native backend matches the numpy reference
under the float32 error model with either storage; bad settings are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import backends
from lattice_engine.cache.dense import KVCache, check_kv_dtype
from lattice_engine.config import ConfigError, ModelSection
from lattice_engine.loading import load
from lattice_engine.quant.core_formats import q8_0_to_float, quantize_q8_0
from lattice_engine.testing.checkpoints import write_tiny_llama
from lattice_engine.testing.tolerance import logits_bound

# head_dim 32: one q8_0 block per head vector
DIMS = dict(hidden=64, heads=2, kv_heads=1, ffn=96, layers=2)


def kv(seed: int, t: int, heads: int = 2, d: int = 64) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, t, heads, d)) * 3).astype(np.float32)


def stored_f16(x):
    return x.astype(np.float16).astype(np.float32)


def stored_q8_0(x):
    flat = x.reshape(-1, x.shape[-1])
    return q8_0_to_float(quantize_q8_0(flat), x.shape[-1]).reshape(x.shape)


@pytest.mark.parametrize("dtype,stored", [("f32", lambda x: x), ("f16", stored_f16),
                                          ("q8_0", stored_q8_0)])
def test_attention_reads_exactly_the_stored_values_across_growth(dtype, stored):
    cache = KVCache(num_layers=2, batch=1, num_kv_heads=2, head_dim=64, capacity=4, dtype=dtype)
    k1, v1, k2, v2 = kv(0, 3), kv(1, 3), kv(2, 6), kv(3, 6)
    keys, values = cache.update(1, k1, v1)
    cache.advance(3)
    keys, values = cache.update(1, k2, v2)  # grows from 4 to 9 positions
    assert cache.capacity >= 9 and keys.dtype == values.dtype == np.float32
    np.testing.assert_array_equal(keys, stored(np.concatenate([k1, k2], axis=1)))
    np.testing.assert_array_equal(values, stored(np.concatenate([v1, v2], axis=1)))
    cache.advance(6)
    cache.truncate(2)
    keys, _ = cache.update(1, k2[:, :1], v2[:, :1])
    np.testing.assert_array_equal(keys, stored(np.concatenate([k1[:, :2], k2[:, :1]], axis=1)))


def test_storage_sizes():
    sizes = {d: KVCache(1, 1, 2, 64, capacity=10, dtype=d).keys[0].nbytes
             for d in ("f32", "f16", "q8_0")}
    assert sizes == {"f32": 10 * 2 * 64 * 4, "f16": 10 * 2 * 64 * 2, "q8_0": 10 * 2 * 2 * 34}


def test_q8_0_error_is_within_half_a_step_of_each_block():
    x = kv(4, 50)
    blocks = x.reshape(-1, 32).astype(np.float64)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    # half a quantization step, plus the f16 rounding of the scale times the largest code
    bound = amax / 127 * (0.5 + 127 * 2.0 ** -11) * (1 + 1e-6)
    assert np.all(np.abs(stored_q8_0(x).reshape(-1, 32) - blocks) <= bound)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ConfigError, match="kv_cache = 'f8'.*f32, f16, q8_0"):
        check_kv_dtype("f8")
    with pytest.raises(ConfigError, match="head_dim is 48; use 'f16'"):
        check_kv_dtype("q8_0", 48)
    with pytest.raises(ConfigError, match="model.kv_cache"):
        ModelSection(kv_cache="int4")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("kv") / "tiny", tokenizer=False, **DIMS)


def run_model(model, ids, decode_steps):
    """Logits of a prefill of ids[:-decode_steps] then one decode step per remaining id."""
    cache = model.make_cache(batch=1)
    cut = ids.shape[1] - decode_steps
    out = [model.forward(ids[:, :cut], cache)]
    for i in range(cut, ids.shape[1]):
        out.append(model.forward(ids[:, i:i + 1], cache))
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("backend", backends())
def test_model_with_a_reduced_kv_cache_matches_the_numpy_reference(tiny_folder, dtype, backend):
    ids = np.random.default_rng(5).integers(0, 256, (1, 12))
    ref_model = load(tiny_folder, backend="numpy", kv_cache=dtype).model
    want, ref_cache = run_model(ref_model, ids, decode_steps=4)
    assert ref_cache.dtype == dtype
    model = load(tiny_folder, backend=backend, kv_cache=dtype).model
    got, cache = run_model(model, ids, decode_steps=4)
    assert cache.dtype == dtype and cache.keys[0].dtype == ref_cache.keys[0].dtype
    hidden = ref_model.hidden_states(ids, ref_model.make_cache())
    f32, _ = run_model(load(tiny_folder, backend="numpy").model, ids, decode_steps=4)
    storage_effect = np.abs(f32 - want).max()
    assert storage_effect > 0  # the reduced cache does change the result
    # Both sides store the K/V they computed, which differ by float32 rounding: most land
    # on the same f16 / q8_0 value, a few on the neighbouring one. Such a step moves the
    # logits no more than rounding every stored value does (the storage effect measured
    # on this input), counted twice; the rest is the float32 error model.
    bound = logits_bound(ref_model, hidden, ids.shape[1]) + 2 * storage_effect
    assert np.abs(got - want).max() <= bound


def test_q8_0_needs_head_vectors_in_blocks_of_32(tmp_path):
    folder = write_tiny_llama(tmp_path / "d16", tokenizer=False)  # head_dim 16
    with pytest.raises(ConfigError, match="head_dim is 16"):
        load(folder, backend="numpy", kv_cache="q8_0")


def test_serving_refuses_a_reduced_kv_cache_with_the_fix(tiny_folder):
    model = load(tiny_folder, backend="numpy", kv_cache="f16").model
    with pytest.raises(ConfigError, match="paged cache of serve stores f32 only"):
        model.make_paged_cache(num_blocks=4)
