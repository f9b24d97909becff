"""`[model] kv_cache`: the dense and paged caches storing keys and values as f16 or q8_0.
Attention computes over exactly the stored values; the C kernels (dense, paged, the fused
steps) read them as stored and match the numpy reference under the float32 error model;
f16 K/V stay within the f16 storage bound of transformers' float32 logits; bad settings
are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from safetensors.numpy import load_file

from conftest import FIXTURES, backends, check_paged_against_golden
from lattice_engine import kernels, ops
from lattice_engine.cache import SequenceBlocks
from lattice_engine.cache.dense import KVCache, KVLayout, check_kv_dtype, key_transform, kv_encode
from lattice_engine.models.paged_forward import PagedBatch
from lattice_engine.config import ConfigError, ModelSection
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.quant.core_formats import q8_0_to_float, quantize_q8_0
from lattice_engine.testing.checkpoints import write_tiny_llama
from lattice_engine.testing.tolerance import (U16, attention_bound, kv_storage_bound,
                                              logits_bound)

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


@pytest.mark.parametrize("quant,want", [("f32", "f32"), ("f16", "f16"), ("q8_0", "f16")])
def test_the_default_keeps_float32_models_exact_and_halves_the_cache_of_others(
        tiny_folder, quant, want):
    assert ModelSection().kv_cache == "auto"
    model = load(tiny_folder, backend="numpy", quant=QuantSpec(quant)).model
    assert model.kv_cache == want and model.make_cache().dtype == want
    # an explicit choice wins over the weights' format
    assert load(tiny_folder, backend="numpy", quant=QuantSpec(quant),
                kv_cache="f32").model.kv_cache == "f32"


def test_q8_0_needs_head_vectors_in_blocks_of_32(tmp_path):
    folder = write_tiny_llama(tmp_path / "d16", tokenizer=False)  # head_dim 16
    with pytest.raises(ConfigError, match="head_dim is 16"):
        load(folder, backend="numpy", kv_cache="q8_0")


# ---- the attention kernels reading stored K/V ------------------------------------------

@pytest.fixture(params=["generic", "avx2"])
def isa(request):
    """The ISA levels of the attention kernels (generic, and AVX2 where the CPU has it)."""
    from lattice_engine.testing.pytest_plugin import core_variant
    with core_variant(request.param) as name:
        yield name


def stored_problem(rng, dtype, B=2, S=300, hkv=2, d=64):
    """Keys with a bias-like outlier channel, values, and their stored form and layout
    (q8_0 keys through a shift and a scale)."""
    k = rng.standard_normal((B, S, hkv, d)).astype(np.float32)
    k[..., 5] += 60
    v = rng.standard_normal((B, S, hkv, d)).astype(np.float32)
    shift = scale = None
    if dtype == "q8_0":
        shift = np.zeros((hkv, d), np.float32)
        shift[:, 5] = 60
        scale = (0.5 + rng.random((hkv, d))).astype(np.float32)
    layout = KVLayout(dtype, d, shift, scale)
    return layout, layout.encode_keys(k), kv_encode(dtype, v)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
@pytest.mark.parametrize("B,T,S", [(1, 1, 300), (2, 1, 700), (1, 37, 40), (2, 9, 260)])
def test_attention_kernel_reads_stored_kv_like_the_reference(isa, dtype, B, T, S):
    """lk_attention_kv over f16 / q8_0 rows (a strided slice of a longer, batched cache,
    decode and prefill, several key blocks) equals the numpy reference over the widened
    values, within the float32 attention bound."""
    rng = np.random.default_rng(7)
    layout, ks, vs = stored_problem(rng, dtype, B, S + 11)
    q = rng.standard_normal((B, T, 6, 64)).astype(np.float32)
    ks, vs = ks[:, :S], vs[:, :S]
    want = ops.attention(q, ks, vs, S - T, 0.125, kv=layout)
    got = kernels.attention(q, ks, vs, S - T, 0.125, kv=layout)
    bound = attention_bound(q, layout.keys(ks), layout.values(vs), S - T, 0.125)
    assert (np.abs(got - want) <= bound).all()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_paged_attention_kernel_reads_stored_kv_like_the_reference(isa, dtype):
    """lk_paged_attention_kv over pools in f16 / q8_0: a decode row, a prefill chunk and a
    fresh prompt through block tables, against the numpy reference."""
    rng = np.random.default_rng(8)
    hq, hkv, d, bs, nb = 6, 2, 64, 16, 24
    layout, kp, vp = stored_problem(rng, dtype, nb, bs, hkv, d)
    rows, pos = [1, 20, 70], [80, 30, 0]
    tables = rng.permutation(nb)[:18].astype(np.int32).reshape(3, 6)
    q_start = np.concatenate([[0], np.cumsum(rows)])
    q = rng.standard_normal((q_start[-1], hq, d)).astype(np.float32)
    want = ops.paged_attention(q, kp, vp, q_start, np.array(pos), tables, 0.2, kv=layout)
    got = kernels.paged_attention(q, kp, vp, q_start, np.array(pos), tables, 0.2, kv=layout)
    for i in range(3):
        r = slice(q_start[i], q_start[i + 1])
        n = pos[i] + rows[i]
        keys = layout.keys(kp[tables[i]].reshape(-1, hkv, kp.shape[-1]))[:n]
        values = layout.values(vp[tables[i]].reshape(-1, hkv, vp.shape[-1]))[:n]
        bound = attention_bound(q[None, r], keys[None], values[None], pos[i], 0.2)[0]
        assert (np.abs(got[r] - want[r]) <= bound).all()


def test_key_shift_leaves_attention_unchanged_and_the_transform_cuts_q8_0_error():
    """Subtracting one vector from every key changes no attention output beyond float32
    rounding (softmax ignores a constant added to a query's scores); on keys with a large
    channel, q8_0 through the shift and scale lands much closer to the float32 result."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 8, 4, 64)).astype(np.float32)
    layout, _, _ = stored_problem(rng, "q8_0", 1, 200)
    k = rng.standard_normal((1, 200, 2, 64)).astype(np.float32) * 2
    k[..., 5] += 60
    k[..., 40] += 25 * rng.standard_normal((1, 200, 2))
    v = rng.standard_normal((1, 200, 2, 64)).astype(np.float32)
    exact = ops.attention(q, k, v, 192, 0.125)
    shifted = ops.attention(q, k - layout.k_shift, v, 192, 0.125)
    bound = attention_bound(q, k, v, 192, 0.125)
    assert (np.abs(shifted - exact) <= 2 * bound).all()
    bias = np.tile(np.eye(1, 64, 5)[0] * 60, 2)
    size = np.abs(k - bias.reshape(2, 64)).mean(axis=(0, 1)).reshape(-1)  # without the bias
    shift, scale = key_transform(bias, size, lambda x: x, 2, 64)
    np.testing.assert_allclose(shift[:, 5], 60)
    plain = KVLayout("q8_0", 64)
    moved = KVLayout("q8_0", 64, shift, scale)
    err_plain = np.abs(ops.attention(q, plain.encode_keys(k), kv_encode("q8_0", v), 192, 0.125,
                                     kv=plain) - exact).max()
    err_moved = np.abs(ops.attention(q, moved.encode_keys(k), kv_encode("q8_0", v), 192, 0.125,
                                     kv=moved) - exact).max()
    assert err_moved < err_plain / 2  # the values, q8_0 in both, keep part of the error


# ---- models: f16 K/V against transformers' float32, dense and batched --------------------

F16_MODELS = ["llama", "qwen2", "qwen3", "qwen3_5_text"]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", F16_MODELS)
def test_f16_kv_logits_stay_within_f16_rounding_of_float32(name, backend):
    """A batch of 2 prefills, then decodes every golden step (the native backend through the
    fused decode step reading f16 caches): each logit equals transformers' float32 one
    within the float32 bound plus the f16 storage bound (`kv_storage_bound`)."""
    model = load(FIXTURES / name, backend=backend, kv_cache="f16").model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    prompt, steps = golden["prompt_ids"], golden["decode_ids"]
    t, n = prompt.shape[1], steps.shape[1]
    cache = model.make_cache(batch=2)
    first = model.forward(prompt, cache, last_only=True)[:, 0]
    kv = cache.kv if hasattr(cache, "kv") else cache
    assert kv.dtype == "f16" and kv.keys[0].dtype == np.float16
    hidden = model.hidden_states(prompt, model.make_cache(batch=2))
    atol = logits_bound(model, hidden, t + n) + kv_storage_bound(model, hidden, t + n)
    np.testing.assert_allclose(first, golden["prefill_logits"][:, -1], atol=atol)
    for i in range(n):
        logits = model.forward(steps[:, i:i + 1], cache)[:, 0]
        np.testing.assert_allclose(logits, golden["decode_logits"][:, i], atol=atol)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", F16_MODELS)
def test_serving_with_an_f16_kv_cache_matches_transformers(name, backend):
    """The paged cache stores f16 (half the bytes); chunked prefill and batched decode (the
    fused paged step on the native backend) stay within the f16 storage bound of
    transformers' float32 logits."""
    model = load(FIXTURES / name, backend=backend, kv_cache="f16").model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    t = golden["prompt_ids"].shape[1]
    n = golden["decode_ids"].shape[1]
    block = 16 if name.startswith("qwen3_5") else 4
    cache = model.make_paged_cache(num_blocks=32, block_size=block, max_sequences=2)
    assert cache.dtype == "f16" and cache.keys[0].dtype == np.float16
    seqs = []
    for _ in range(2):
        s = SequenceBlocks()
        assert cache.reserve(s, t + n)
        if cache.recurrent is not None:
            s.state_slot = cache.recurrent.acquire()
        seqs.append(s)
    check_paged_against_golden(model, golden, cache, seqs, cut=block * max(1, t // (2 * block)),
                               kv_unit=U16)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_fused_paged_step_reads_reduced_pools_like_the_per_kernel_path(tiny_folder, dtype):
    """The one-call C step over a paged batch (a chunked prefill beside a whole one, then a
    decode row) stores and reads f16 / q8_0 pools (q8_0 keys through the key transform)
    as the per-kernel path does: the same logits within the float32 bound plus, since
    both sides store keys and values they computed with float32 rounding differences,
    twice the storage's own effect measured against f32 K/V (as for the dense cache)."""
    from lattice_engine.testing.pytest_plugin import require
    require()
    prompt = np.random.default_rng(11).integers(0, 256, (2, 14))
    t = prompt.shape[1]

    def run(kv_cache, fused):
        model = load(tiny_folder, backend="native", kv_cache=kv_cache).model
        model.fused_decode = fused
        cache = model.make_paged_cache(num_blocks=16, block_size=4)
        seqs = [SequenceBlocks(), SequenceBlocks()]
        for s in seqs:
            assert cache.reserve(s, t + 2)
        out = []
        for items in ([(seqs[0], prompt[0, :6], 0, True), (seqs[1], prompt[1], 0, True)],
                      [(seqs[0], prompt[0, 6:], 6, True), (seqs[1], prompt[1, :1], t, True)]):
            out.append(model.forward_paged(PagedBatch.build(cache, items), cache))
        return np.concatenate(out), model, cache

    fused, model, cache = run(dtype, True)
    per_kernel, _, _ = run(dtype, False)
    f32, _, _ = run("f32", False)
    assert cache.keys[0].dtype == (np.float16 if dtype == "f16" else np.uint8)
    # q8_0 keys go through the model's key transform (a scale here: the fixture has no bias)
    assert (cache.layouts[0].k_scale is not None) == (dtype == "q8_0")
    storage_effect = np.abs(per_kernel - f32).max()
    assert storage_effect > 0
    hidden = model.hidden_states(prompt, model.make_cache(batch=2))
    bound = logits_bound(model, hidden, t + 1) + 2 * storage_effect
    assert np.abs(fused - per_kernel).max() <= bound


def test_serving_builds_a_paged_cache_in_the_configured_dtype(tiny_folder):
    for dtype, item in (("f16", np.float16), ("q8_0", np.uint8)):
        model = load(tiny_folder, backend="numpy", kv_cache=dtype).model
        cache = model.make_paged_cache(num_blocks=4)
        assert cache.dtype == dtype and cache.keys[0].dtype == item
        assert cache.keys[0].nbytes == KVCache(2, 1, 1, 32, capacity=4 * 16,
                                               dtype=dtype).keys[0].nbytes
