"""QuaRot folding keeps the function: rotated float32 logits equal the original's, for
every llama-family variant, tied and untied, with and without the online rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.testing.pytest_plugin import require as require_native
from lattice_engine.testing.tolerance import model_path, network_bound
from lattice_quarot import QuarotSettings, random_rotation
from lattice_quarot import plugin as quarot_plugin

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 48, 80, 3, 1, 16, 2


def make_checkpoint(folder, model_type: str, tied: bool, seed: int = 0,
                    hidden: int = HIDDEN):
    """A tiny random checkpoint whose norms and biases are far from their defaults, so
    folding them is actually exercised. Widths are not powers of two (48 = 3 x 16,
    80 = 5 x 16)."""
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1 + 0.5 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": mat(VOCAB, hidden), "model.norm.weight": norm(hidden)}
    if not tied:
        t["lm_head.weight"] = mat(VOCAB, hidden)
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm(hidden)
        t[f"{p}.post_attention_layernorm.weight"] = norm(hidden)
        t[f"{p}.self_attn.q_proj.weight"] = mat(HEADS * HEAD_DIM, hidden)
        t[f"{p}.self_attn.k_proj.weight"] = mat(KV_HEADS * HEAD_DIM, hidden)
        t[f"{p}.self_attn.v_proj.weight"] = mat(KV_HEADS * HEAD_DIM, hidden)
        t[f"{p}.self_attn.o_proj.weight"] = mat(hidden, HEADS * HEAD_DIM)
        t[f"{p}.mlp.gate_proj.weight"] = mat(INTER, hidden)
        t[f"{p}.mlp.up_proj.weight"] = mat(INTER, hidden)
        t[f"{p}.mlp.down_proj.weight"] = mat(hidden, INTER)
        if model_type == "qwen2":
            for proj, n in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", KV_HEADS)):
                t[f"{p}.self_attn.{proj}.bias"] = rng.standard_normal(n * HEAD_DIM).astype(np.float32)
        if model_type == "qwen3":
            t[f"{p}.self_attn.q_norm.weight"] = norm(HEAD_DIM)
            t[f"{p}.self_attn.k_norm.weight"] = norm(HEAD_DIM)
    config = {"model_type": model_type, "hidden_size": hidden, "intermediate_size": INTER,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": tied}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(t, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def plugins():
    pm = PluginManager(load_entry_points=False)
    pm.register(quarot_plugin, "quarot")
    return pm


IDS = np.array([[1, 5, 9, 2, 33, 60, 7, 12], [3, 3, 40, 41, 0, 63, 8, 8]])


def logits(folder, pm, backend="numpy", **settings):
    transforms = {"quarot": QuarotSettings(enabled=True, **settings)} if settings else None
    model = load(folder, backend=backend, plugin_manager=pm, transforms=transforms).model
    cache = model.make_cache(batch=2)
    prefill = model.forward(IDS[:, :6], cache)
    steps = [model.forward(IDS[:, i:i + 1], cache) for i in (6, 7)]
    return np.concatenate([prefill] + steps, axis=1)


def rotation_bound(folder, pm) -> float:
    """How far a rotated model's logits may be from the plain model's in float32
    (`lattice_engine.testing.tolerance`): the plain model's dot-product path, plus per layer
    the rotations folded into its matrices or applied online (products of length hidden
    and intermediate), at the plain model's lm_head magnitude."""
    model = load(folder, backend="numpy", plugin_manager=pm).model
    cfg = model.config
    hidden = model.hidden_states(IDS, model.make_cache(batch=2))
    magnitude = (np.abs(hidden.astype(np.float64)).reshape(-1, cfg.hidden_size)
                 @ np.abs(model.lm_head.to_float().astype(np.float64)).T).max()
    path = model_path(cfg, IDS.shape[1]) + \
        [cfg.hidden_size, cfg.intermediate_size] * cfg.num_hidden_layers
    return network_bound(magnitude, path)


def test_rotation_is_orthogonal_for_any_width():
    for n in (1, 48, 80, 896, 4864):
        r = random_rotation(n, np.random.default_rng(n))
        if n <= 896:
            m = r.matrix()
            np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-12)
        x = np.random.default_rng(0).standard_normal((2, n))
        np.testing.assert_allclose(r.apply_transposed(r.apply(x)), x, atol=1e-12)


@pytest.mark.parametrize("basis", ["residual", "inputs"])
@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_rotated_model_computes_the_same_function(tmp_path, plugins, model_type, tied, online,
                                                  basis):
    folder = make_checkpoint(tmp_path / model_type, model_type, tied)
    plain = logits(folder, plugins)
    rotated = logits(folder, plugins, seed=7, online_down_proj=online, basis=basis)
    assert np.abs(rotated - plain).max() <= rotation_bound(folder, plugins)
    assert (rotated.argmax(-1) == plain.argmax(-1)).all()


@pytest.mark.parametrize("basis", ["residual", "inputs"])
def test_native_backend_and_fused_decode_agree(tmp_path, plugins, basis):
    require_native()
    folder = make_checkpoint(tmp_path / "m", "qwen2", tied=True)
    plain = logits(folder, plugins)
    rotated = logits(folder, plugins, backend="native", seed=1, online_down_proj=True,
                     basis=basis)
    assert np.abs(rotated - plain).max() <= rotation_bound(folder, plugins)


@pytest.mark.parametrize("basis", ["residual", "inputs"])
def test_fused_decode_step_runs_the_rotations_bit_for_bit(tmp_path, plugins, basis):
    """The C decode step applies every online rotation (the inputs basis' q/k/v, gate/up
    and o_proj inputs, and down_proj's) with the per-kernel path's kernels, in its order."""
    require_native()
    folder = make_checkpoint(tmp_path / "m", "qwen3", tied=False)
    model = load(folder, backend="native", plugin_manager=plugins,
                 transforms={"quarot": QuarotSettings(enabled=True, seed=2, basis=basis)}).model
    ids = np.array([[1, 5, 9, 2, 33, 60, 7, 12], [3, 3, 40, 41, 0, 63, 8, 8]])
    runs = {}
    for fused in (True, False):
        model.fused_decode, model._step_built = fused, False
        cache = model.make_cache(batch=2)
        out = [model.forward(ids[:, :6], cache)[:, -1]]
        out += [model.forward(ids[:, i:i + 1], cache)[:, -1] for i in (6, 7)]
        runs[fused] = out
        assert (model._decode_step() is not None) == fused
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_array_equal(a, b)


def test_inputs_basis_in_the_paged_batch_forward(tmp_path, plugins):
    """The serving path (flat batch over a paged cache) applies the input rotations too."""
    from lattice_engine.cache.paged import SequenceBlocks
    from lattice_engine.models.paged_forward import PagedBatch
    folder = make_checkpoint(tmp_path / "m", "qwen3", tied=False)
    ids = [1, 5, 9, 2, 33, 60, 7, 12]
    out = {}
    for basis in (None, "inputs"):
        transforms = {"quarot": QuarotSettings(enabled=True, seed=3, basis=basis)} if basis \
            else None
        model = load(folder, backend="numpy", plugin_manager=plugins,
                     transforms=transforms).model
        cache = model.make_paged_cache(num_blocks=4, block_size=4)
        seq = SequenceBlocks()
        assert cache.reserve(seq, len(ids))
        batch = PagedBatch.build(cache, [(seq, ids, 0, True)])
        out[basis] = model.forward_paged(batch, cache)
    assert np.abs(out["inputs"] - out[None]).max() <= rotation_bound(folder, plugins)
    assert np.abs(out[None]).max() > 0.1


def test_inputs_basis_keeps_norms_and_embeddings(tmp_path, plugins):
    folder = make_checkpoint(tmp_path / "m", "llama", tied=True)
    a = load(folder, backend="numpy", plugin_manager=plugins).model
    b = load(folder, backend="numpy", plugin_manager=plugins,
             transforms={"quarot": QuarotSettings(enabled=True, basis="inputs")}).model
    np.testing.assert_array_equal(a.embed_tokens.to_float(), b.embed_tokens.to_float())
    assert b.lm_head is b.embed_tokens  # still tied: the stream is not rotated
    np.testing.assert_array_equal(np.abs(b.layers[0].input_layernorm),
                                  np.abs(a.layers[0].input_layernorm))  # only signs folded
    assert b.layers[0].attn_in_rotation is not None and b.layers[0].mlp_in_rotation is not None


def test_unknown_basis_and_unsupported_model_are_clear_errors(tmp_path, plugins):
    folder = make_checkpoint(tmp_path / "m", "llama", tied=True)
    with pytest.raises(CheckpointError, match="quarot.basis = 'diagonal'"):
        load(folder, backend="numpy", plugin_manager=plugins,
             transforms={"quarot": QuarotSettings(enabled=True, basis="diagonal")})


def test_weights_really_change(tmp_path, plugins):
    folder = make_checkpoint(tmp_path / "m", "llama", tied=True)
    pm = plugins
    a = load(folder, backend="numpy", plugin_manager=pm).model
    b = load(folder, backend="numpy", plugin_manager=pm,
             transforms={"quarot": QuarotSettings(enabled=True, basis="residual")}).model
    wa = a.layers[0].self_attn.q_proj.weight.to_float()
    wb = b.layers[0].self_attn.q_proj.weight.to_float()
    assert np.abs(wa - wb).max() > 0.1
    np.testing.assert_array_equal(b.layers[0].input_layernorm, np.ones(HIDDEN, np.float32))
    assert b.lm_head is not b.embed_tokens  # the tied head got its own rotated copy


def test_auto_basis_is_inputs_for_the_llama_family(tmp_path, plugins):
    folder = make_checkpoint(tmp_path / "m", "qwen2", tied=True)
    auto = load(folder, backend="numpy", plugin_manager=plugins,
                transforms={"quarot": QuarotSettings(enabled=True)})
    assert auto.checkpoint.config["quarot"]["basis"] == "inputs"
    # the inputs basis leaves the norms' weights in place
    assert np.abs(auto.model.layers[0].input_layernorm - 1).max() > 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_untied_head_keeps_the_precision_of_a_tied_one(tmp_path, plugins, tied):
    from lattice_engine.quant.methods import QuantSpec
    # hidden 64: rows of whole q8_0 blocks, so an untied head really is q8_0
    folder = make_checkpoint(tmp_path / "m", "llama", tied=tied, hidden=64)
    plain = load(folder, backend="numpy", plugin_manager=plugins, quant=QuantSpec("q8_0"))
    rotated = load(folder, backend="numpy", plugin_manager=plugins, quant=QuantSpec("q8_0"),
                   transforms={"quarot": QuarotSettings(enabled=True)})
    # tied: the method's tied-embedding format, and so the rotated head's own copy (not the
    # untied head's format, though under q8_0 both are q8_0); untied: its own format
    assert plain.model.lm_head.format.name == "q8_0"
    assert rotated.model.lm_head.format.name == plain.model.lm_head.format.name


def test_unsupported_architecture_is_a_clear_error(tmp_path, plugins):
    folder = make_checkpoint(tmp_path / "m", "llama", tied=True)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    from lattice_quarot.fold import quarot
    from lattice_engine.io.hf_folder import load_hf_folder
    with pytest.raises(CheckpointError, match="QuaRot supports model types llama, qwen2, qwen3"):
        quarot(load_hf_folder(folder), QuarotSettings(enabled=True), {})


CORE_FIXTURES = __import__("pathlib").Path(__file__).resolve().parents[3] / "tests" / "fixtures"


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("name", ["qwen3_5_text", "qwen3_5_vl"])
def test_qwen3_5_rotated_model_computes_the_same_function(tmp_path, plugins, name, online):
    # the core's Qwen3.5 fixtures (tied text model; untied composite with vision and MTP
    # weights), with their (1 + w) norms moved away from w = 0 so folding is exercised
    import shutil
    from safetensors.numpy import load_file
    if not (CORE_FIXTURES / name).exists():
        pytest.skip("the core repository's test fixtures are not next to this plugin")
    folder = tmp_path / name
    shutil.copytree(CORE_FIXTURES / name, folder)
    weights = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(0)
    for key in weights:
        if key.endswith("layernorm.weight") or key.endswith("language_model.norm.weight") or \
                key == "model.norm.weight":
            weights[key] = (0.5 * rng.standard_normal(weights[key].shape)).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    plain = logits(folder, plugins)
    rotated = logits(folder, plugins, seed=3, online_down_proj=online)
    assert np.abs(rotated - plain).max() <= rotation_bound(folder, plugins)
    assert (rotated.argmax(-1) == plain.argmax(-1)).all()
    with pytest.raises(CheckpointError, match="basis = 'residual' for it"):
        logits(folder, plugins, basis="inputs")


@pytest.mark.parametrize("online", [False, True])
def test_qwen3_5_mtp_head_in_the_rotated_basis_gives_the_same_logits(tmp_path, plugins, online):
    """Qwen3.5's MTP head on a rotated checkpoint (embedding half of fc folded, the
    target's hidden state and the lm_head input converted) gives the unrotated head's
    logits within 1e-3, over rows fed from each model's own hidden states and chained."""
    import shutil
    from safetensors.numpy import load_file
    if not (CORE_FIXTURES / "qwen3_5_vl").exists():
        pytest.skip("the core repository's test fixtures are not next to this plugin")
    folder = tmp_path / "qwen3_5_vl"
    shutil.copytree(CORE_FIXTURES / "qwen3_5_vl", folder)
    weights = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(1)
    for key in weights:  # (1 + w) norms far from w = 0, the final one too
        if key.endswith("norm.weight") and "visual" not in key and "linear_attn" not in key:
            weights[key] = (0.4 * rng.standard_normal(weights[key].shape)).astype(np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    ids = np.array([[1, 5, 9, 2, 33, 60, 7, 12, 200, 17]])

    def mtp_logits(**settings):
        transforms = {"quarot": QuarotSettings(enabled=True, **settings)} if settings else None
        model = load(folder, backend="numpy", plugin_manager=plugins,
                     transforms=transforms).model
        hidden = model.hidden_states(ids, model.make_cache(1))[0]
        head = model.mtp_head()
        cache = head.make_cache()
        states = head.hidden(ids[0, 1:], hidden[:-1], np.arange(9), cache)
        out = [head.logits(states)]
        last = states[-1:]
        for pos, tok in ((9, 44), (10, 3)):  # chained drafts (fixed tokens: same rows)
            last = head.hidden([tok], last, [pos], cache, chained=True)
            out.append(head.logits(last))
        return np.concatenate(out)

    plain = mtp_logits()
    rotated = mtp_logits(seed=5, online_down_proj=online)
    assert np.abs(rotated - plain).max() <= 1e-3
    assert (rotated.argmax(-1) == plain.argmax(-1)).all()
