"""Qwen3.5 (hybrid Gated DeltaNet + gated attention) against transformers' float32 run of the
same tiny random checkpoints (tests/fixtures/qwen3_5_*, made by
scripts/make_qwen3_5_fixtures.py), plus the recurrent-state cache and its kernels."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import FIXTURES, backends
from lattice_engine import ops
from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import dot_bound, logits_bound, model_path, network_bound

# Tolerances come from lattice_engine.testing.tolerance's float32 error model: logits
# within logits_bound (the model's dot-product lengths and the logits' magnitude), states
# within the same relative bound at the states' magnitude.
QWEN35 = ["qwen3_5_text", "qwen3_5_vl"]


def golden(name):
    return load_file(str(FIXTURES / name / "golden.safetensors"))


def context(ref) -> int:
    return ref["prompt_ids"].shape[1] + ref["decode_ids"].shape[1]


def model_bound(model, ids, positions) -> float:
    return logits_bound(model, model.hidden_states(ids, model.make_cache(batch=ids.shape[0])),
                        positions)


def delta_rule_bound(state_in, state_out, q, out=None) -> tuple[float, float]:
    """Bounds for a gated delta rule run over T tokens (two float32 orders): each token's
    update of the [Dk, Dv] state is a length-Dk product at the state's scale, and the errors
    it leaves are carried (decays <= 1 do not amplify them), so over T tokens they add up
    like one dot product of length T * Dk; an output S^T q adds a length-Dk product at the
    scale |q|_1 * max|S|."""
    t, dk = q.shape[1], q.shape[-1]
    s_mag = max(np.abs(state_in).max(), np.abs(state_out).max())
    q_l1 = np.abs(q).sum(-1).max()
    return float(dot_bound(t * dk, s_mag)), float(dot_bound(t * dk + dk, q_l1 * s_mag))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", QWEN35)
def test_prefill_and_decode_match_transformers(name, backend):
    model = load(FIXTURES / name, backend=backend).model
    ref = golden(name)
    bound = model_bound(model, ref["prompt_ids"], context(ref))
    cache = model.make_cache(batch=2, capacity=4)  # small on purpose: exercises growth
    prefill = model.forward(ref["prompt_ids"], cache)
    assert np.abs(prefill - ref["prefill_logits"]).max() <= bound
    # the delta-rule states after the (chunked) prefill equal transformers' cache
    path = model_path(model.config, ref["prompt_ids"].shape[1])
    for i in range(model.num_linear):
        want = ref[f"delta_state_{i}"]
        assert np.abs(cache.delta[i] - want).max() <= network_bound(np.abs(want).max(), path)
    steps = ref["decode_ids"]
    assert steps.shape[1] == 32
    decode = np.concatenate([model.forward(steps[:, i:i + 1], cache)
                             for i in range(steps.shape[1])], axis=1)
    assert np.abs(decode - ref["decode_logits"]).max() <= bound
    assert (decode.argmax(-1) == ref["decode_logits"].argmax(-1)).all()
    ours = np.concatenate([prefill[:, -1:], decode[:, :-1]], axis=1).argmax(-1)
    assert (ours == steps).all()


def test_fixtures_cover_the_issue():
    text = json.loads((FIXTURES / "qwen3_5_text" / "config.json").read_text())
    vl = json.loads((FIXTURES / "qwen3_5_vl" / "config.json").read_text())
    for cfg in (text, vl["text_config"]):
        assert cfg["layer_types"].count("linear_attention") >= 2
        assert cfg["layer_types"].count("full_attention") >= 1
        assert cfg["rope_parameters"]["partial_rotary_factor"] < 1
        assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert text["tie_word_embeddings"] and not vl["tie_word_embeddings"]
    # one prompt spans more than one 64-token chunk of the delta rule
    assert golden("qwen3_5_text")["prompt_ids"].shape[1] > 64


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", QWEN35)
def test_batch_rows_and_split_prefill_equal_single_sequences(name, backend):
    """numpy: BLAS may block a 2-row and a 1-row product differently, so rows agree within
    the float32 bound. native: our kernels compute each row in an order independent of the
    other rows, so batch rows are bit-identical. Split prefill moves the delta rule's chunk
    boundaries (another valid summation order) on either backend: within the bound."""
    model = load(FIXTURES / name, backend=backend).model
    ids = golden(name)["prompt_ids"]
    bound = model_bound(model, ids, ids.shape[1])
    both = model.forward(ids, model.make_cache(batch=2))
    for row in range(2):
        alone = model.forward(ids[row:row + 1], model.make_cache(batch=1))
        if backend == "native":
            np.testing.assert_array_equal(alone[0], both[row])
        else:
            assert np.abs(alone[0] - both[row]).max() <= bound
    # the prompt in two calls (conv and delta states carried across) equals one call
    cache = model.make_cache(batch=2)
    cut = ids.shape[1] // 2 + 1
    parts = np.concatenate([model.forward(ids[:, :cut], cache), model.forward(ids[:, cut:], cache)], 1)
    assert np.abs(parts - both).max() <= bound


@pytest.mark.parametrize("backend", backends())
def test_snapshot_restore_replays_exactly(backend):
    model = load(FIXTURES / "qwen3_5_text", backend=backend).model
    ref = golden("qwen3_5_text")
    cache = model.make_cache(batch=2)
    model.forward(ref["prompt_ids"], cache)
    snap = cache.snapshot()
    steps = ref["decode_ids"][:, :4]
    first = [model.forward(steps[:, i:i + 1], cache) for i in range(4)]
    cache.restore(snap)
    assert cache.offset == ref["prompt_ids"].shape[1]
    again = [model.forward(steps[:, i:i + 1], cache) for i in range(4)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="snapshot"):
        cache.truncate(cache.offset - 1)


def random_delta_inputs(seed, b=2, t=150, hk=2, hv=4, dk=16, dv=24, decay=(0.01, 0.5)):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    k = rng.standard_normal((b, t, hk, dk)).astype(np.float32)
    v = rng.standard_normal((b, t, hv, dv)).astype(np.float32)
    g = -rng.uniform(*decay, (b, t, hv)).astype(np.float32)
    beta = rng.uniform(0, 1, (b, t, hv)).astype(np.float32)
    state = (0.3 * rng.standard_normal((b, hv, dk, dv))).astype(np.float32)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("decay", [(0.01, 0.5), (0.5, 11.0)], ids=["mild", "strong"])
@pytest.mark.parametrize("backend", backends())
def test_chunked_delta_rule_equals_recurrence(backend, decay):
    """Strong decays (the random checkpoints' A_log gives -0.5 .. -11 per token) drive the
    chunked form's exp(cumulative decay) through the subnormal range, which the native
    kernel flushes to zero for speed: the results must not move."""
    from lattice_engine.loading import get_ops
    impl = get_ops(backend)
    q, k, v, g, beta, state = random_delta_inputs(0, decay=decay)
    s_rec, s_chunk = state.copy(), state.copy()
    rec = ops.gated_delta_rule(q, k, v, g, beta, s_rec, chunk=0)  # numpy recurrence: the definition
    state_bound, out_bound = delta_rule_bound(state, s_rec, q)
    out = impl.gated_delta_rule(q, k, v, g, beta, s_chunk, chunk=64)
    assert np.abs(s_chunk - s_rec).max() <= state_bound
    assert np.abs(out - rec).max() <= out_bound
    s_step = state.copy()
    out_step = impl.gated_delta_rule(q, k, v, g, beta, s_step, chunk=0)
    assert np.abs(s_step - s_rec).max() <= state_bound
    assert np.abs(out_step - rec).max() <= out_bound


@pytest.mark.native
def test_native_deltanet_kernels_match_numpy(kernel_variant):
    from lattice_engine import kernels
    rng = np.random.default_rng(1)
    # conv: prefill longer and shorter than the kernel, then one decode step; each output
    # is a 4-tap dot product (SiLU after it is accurate to a few u)
    w = rng.standard_normal((4, 300)).astype(np.float32)
    st_np = rng.standard_normal((2, 3, 300)).astype(np.float32)
    st_c = st_np.copy()
    for t in (7, 2, 1):
        x = rng.standard_normal((2, t, 300)).astype(np.float32)
        magnitude = np.abs(np.concatenate([st_np, x], 1)).max() * np.abs(w).sum(0).max()
        want = ops.causal_conv1d(x, w, st_np)
        got = kernels.causal_conv1d(x.copy(), w, st_c)
        assert np.abs(got - want).max() <= dot_bound(4, magnitude)
        np.testing.assert_array_equal(st_c, st_np)
    # gated RMSNorm: a 40-long sum of squares, then products of a few u each
    x = rng.standard_normal((3, 5, 40)).astype(np.float32)
    z = rng.standard_normal((3, 5, 40)).astype(np.float32)
    nw = rng.standard_normal(40).astype(np.float32)
    want = ops.gated_rms_norm(x, z, nw, 1e-6)
    assert np.abs(kernels.gated_rms_norm(x, z, nw, 1e-6) - want).max() <= \
        dot_bound(40 + 8, np.abs(want).max())
    # delta rule on views of one fused qkv row, as the model passes them; Dv = 32 takes
    # the register-blocked AVX2 step, Dv = 24 the generic-shaped one
    for dv in (24, 32):
        q, k, v, g, beta, state = random_delta_inputs(2, t=70, dv=dv)
        fused = np.concatenate([q.reshape(2, 70, -1), k.reshape(2, 70, -1),
                                v.reshape(2, 70, -1)], axis=-1)
        n = q[0, 0].size
        views = (fused[..., :n].reshape(q.shape), fused[..., n:2 * n].reshape(k.shape),
                 fused[..., 2 * n:].reshape(v.shape))
        for chunk in (0, 1, 16, 64):
            s_np, s_c = state.copy(), state.copy()
            want = ops.gated_delta_rule(q, k, v, g, beta, s_np, chunk=chunk)
            got = kernels.gated_delta_rule(*views, g, beta, s_c, chunk=chunk)
            state_bound, out_bound = delta_rule_bound(state, s_np, q)
            assert np.abs(got - want).max() <= out_bound, (dv, chunk)
            assert np.abs(s_c - s_np).max() <= state_bound, (dv, chunk)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dv", [24, 32])
def test_delta_rule_ahead_gives_decode_outputs_and_leaves_the_state(backend, dv):
    """A verify's recurrence of T tokens in one call (ahead=True) gives each token the output
    a decode step of it gives, bit for bit, and leaves the state as it was; a replay of the
    first m tokens in one call leaves the state m decode steps leave."""
    from lattice_engine.loading import get_ops
    impl = get_ops(backend)
    q, k, v, g, beta, state = random_delta_inputs(3, t=5, dv=dv)
    t = q.shape[1]
    s_ahead = state.copy()
    out = impl.gated_delta_rule(q, k, v, g, beta, s_ahead, chunk=0, ahead=True)
    assert np.array_equal(s_ahead, state)
    s_one, states = state.copy(), []
    for i in range(t):
        sl = slice(i, i + 1)
        step = impl.gated_delta_rule(np.ascontiguousarray(q[:, sl]),
                                     np.ascontiguousarray(k[:, sl]),
                                     np.ascontiguousarray(v[:, sl]), np.ascontiguousarray(g[:, sl]),
                                     np.ascontiguousarray(beta[:, sl]), s_one, chunk=0)
        assert np.array_equal(step[:, 0], out[:, i]), i
        states.append(s_one.copy())
    for m in (1, 3, t):
        s_replay = state.copy()
        impl.gated_delta_rule(q[:, :m], k[:, :m], v[:, :m], np.ascontiguousarray(g[:, :m]),
                              np.ascontiguousarray(beta[:, :m]), s_replay, chunk=0)
        assert np.array_equal(s_replay, states[m - 1]), m
    with pytest.raises(ValueError, match="ahead needs chunk=0"):
        impl.gated_delta_rule(q, k, v, g, beta, state.copy(), chunk=16, ahead=True)


def test_mtp_and_vision_weights_stay_addressable():
    model = load(FIXTURES / "qwen3_5_vl", backend="numpy").model
    assert "mtp.fc.weight" in model.mtp_weights
    assert model.mtp_weights.shape("mtp.fc.weight") == (64, 128)
    assert model.mtp_weights["mtp.fc.weight"].shape == (64, 128)
    assert len(model.vision_weights) > 0
    assert all(n.startswith("model.visual.") for n in model.vision_weights)
    name = next(iter(model.vision_weights))
    assert model.vision_weights[name].shape == model.vision_weights.shape(name)
    with pytest.raises(CheckpointError, match="mtp.nothing"):
        model.mtp_weights["mtp.nothing"]
    # the text-only checkpoint has neither
    text = load(FIXTURES / "qwen3_5_text", backend="numpy").model
    assert len(text.mtp_weights) == 0 and len(text.vision_weights) == 0


def test_q8_0_stores_the_tied_lm_head_as_q8_0_unless_told_otherwise():
    model = load(FIXTURES / "qwen3_5_text", quant=QuantSpec("q8_0"), backend="numpy").model
    assert model.lm_head is model.embed_tokens
    assert model.lm_head.format.name == "q8_0"
    assert model.layers[0].linear_attn.in_proj_qkv.weight.format.name == "q8_0"
    untied = load(FIXTURES / "qwen3_5_vl", quant=QuantSpec("q8_0"), backend="numpy").model
    assert untied.lm_head is not untied.embed_tokens
    # the f16 table, as Lattice v0.2.3 kept it, is one override away
    asked = load(FIXTURES / "qwen3_5_text", backend="numpy",
                 quant=QuantSpec("q8_0", {"*embed_tokens*": "f16"})).model
    assert asked.lm_head is asked.embed_tokens and asked.lm_head.format.name == "f16"
    f16 = load(FIXTURES / "qwen3_5_text", quant=QuantSpec("f16"), backend="numpy").model
    np.testing.assert_array_equal(asked.lm_head.data, f16.lm_head.data)


def edited_copy(tmp_path, name, edit):
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    weights = load_file(str(folder / "model.safetensors"))
    edit(weights)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("tensor", [
    "model.language_model.layers.0.linear_attn.A_log",
    "model.language_model.layers.2.self_attn.q_proj.weight",
    "lm_head.weight",
])
def test_missing_tensor_is_named(tmp_path, tensor):
    folder = edited_copy(tmp_path, "qwen3_5_vl", lambda w: w.pop(tensor))
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.")):
        load(folder, backend="numpy")


@pytest.mark.parametrize("tensor", [
    "model.layers.1.linear_attn.conv1d.weight",
    "model.layers.0.linear_attn.in_proj_qkv.weight",
    "model.layers.2.self_attn.q_proj.weight",
])
def test_wrong_shape_is_named(tmp_path, tensor):
    def shrink(w):
        w[tensor] = np.ascontiguousarray(w[tensor][:-1])
    folder = edited_copy(tmp_path, "qwen3_5_text", shrink)
    with pytest.raises(CheckpointError, match=tensor.replace(".", r"\.") + ".*shape"):
        load(folder, backend="numpy")
