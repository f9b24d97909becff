"""The plugin in the engine: entry point, methods and group sizes on a tiny model, GGUF
Q4_0 / Q4_1 passthrough, `lattice quantize` round trips, and the error without it."""

from __future__ import annotations

import importlib.metadata as metadata
import json

import numpy as np
import pytest

from lattice_engine.cli import main
from lattice_engine.errors import CheckpointError, ConfigError, PluginError
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.pytest_plugin import require as require_core
from lattice_quant_q4 import formats as F
from lattice_quant_q4 import plugin

from conftest import CONFIG, write_tiny_gguf

installed = any(ep.name == "quant_q4" for ep in metadata.entry_points(group="lattice_engine"))


def manager() -> PluginManager:
    """The plugin registered in-process (works whether or not it is pip-installed)."""
    pm = PluginManager(allowlist=[])
    pm.register(plugin, name="quant_q4")
    return pm


def logits(loaded, ids=(1, 5, 9, 200, 3)):
    m = loaded.model
    return m.forward(np.asarray([ids]), m.make_cache())[0]


def formats_of(loaded, layout: bool = False) -> dict[str, str]:
    """The format of a few matrices: as the quant method chose it, or (layout) as held (the
    native backend holds q8_0 and the q4 formats in their row-interleaved _r16 layouts where
    that pays: the same blocks)."""
    m = loaded.model
    layer = m.layers[0]
    names = {"q": layer.self_attn.q_proj.weight.format.name,
             "down": layer.mlp.down_proj.weight.format.name,
             "embed": m.embed_tokens.format.name, "lm_head": m.lm_head.format.name}
    return names if layout else {k: v.removesuffix("_r16") for k, v in names.items()}


@pytest.mark.skipif(not installed, reason="lattice-quant-q4 is not pip-installed here")
def test_entry_point_is_found_and_listed(capsys):
    pm = PluginManager()
    assert {"q4_sym", "q4_asym", "q4_0"} <= set(pm.registry.names("quant_methods"))
    assert main(["plugins"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["quant_q4"]["distribution"] == "lattice-quant-q4"
    assert listed["quant_q4"]["hooks"] == ["register_quant_methods", "register_weight_formats"]


@pytest.mark.parametrize("method", ["q4_sym", "q4_asym"])
def test_methods_keep_embedding_and_lm_head_in_q8_0(tiny_folder, method):
    pm = manager()
    f32 = load(tiny_folder, quant=QuantSpec("f32"), plugin_manager=pm)
    q4 = load(tiny_folder, quant=QuantSpec(method), plugin_manager=pm)
    # the C kernels against the numpy reference on the same packed weights: only the
    # int8 rounding of the activations separates them
    ref = load(tiny_folder, quant=QuantSpec(method), backend="numpy", plugin_manager=pm)
    assert formats_of(q4) == formats_of(ref, layout=True) == {
        "q": f"{method}_g32", "down": f"{method}_g32", "embed": "q8_0", "lm_head": "q8_0"}
    from lattice_engine.quant.core_formats import r16_pays
    from lattice_quant_q4.kernels import r16_pays as q4_r16_pays
    held = formats_of(q4, layout=True)
    assert held["embed"] == ("q8_0_r16" if r16_pays() else "q8_0")
    assert held["q"] == f"{method}_g32" + ("_r16" if q4_r16_pays() else "")
    a, b = logits(ref), logits(q4)
    assert np.abs(a - b).max() < 0.03 * np.abs(a).max()
    # and the 4-bit model still follows the float one (random weights: loosely)
    c = logits(f32).ravel()
    assert np.dot(c, b.ravel()) / np.linalg.norm(c) / np.linalg.norm(b) > 0.9


def test_group_size_and_fallback_for_rows_it_does_not_divide(tiny_folder):
    pm = manager()
    g64 = load(tiny_folder, quant=QuantSpec("q4_asym", {}, 64), plugin_manager=pm)
    # down_proj rows are 96 long: not a multiple of 64, so they stay q8_0
    assert formats_of(g64)["q"] == "q4_asym_g64" and formats_of(g64)["down"] == "q8_0"
    with pytest.raises(ConfigError, match=r"quant.group_size = 48 is not supported by q4_asym; "
                                          r"choices: 32, 64, 128"):
        load(tiny_folder, quant=QuantSpec("q4_asym", {}, 48), plugin_manager=pm)
    with pytest.raises(ConfigError, match="does not apply to quant method 'q8_0'"):
        load(tiny_folder, quant=QuantSpec("q8_0", {}, 64), plugin_manager=pm)


def test_q4_0_method_runs_the_sym_kernels_on_ggml_blocks(tiny_folder):
    pm = manager()
    q40 = load(tiny_folder, quant=QuantSpec("q4_0"), plugin_manager=pm)
    assert formats_of(q40) == {"q": "q4_0", "down": "q4_0", "embed": "q8_0", "lm_head": "q8_0"}
    w = q40.model.layers[0].self_attn.q_proj.weight
    x = np.random.default_rng(1).standard_normal((3, w.data.shape[1] // 18 * 32), np.float32)
    held = {f.name: f for f in F.Q4_FORMATS + F.Q4_R16_FORMATS}
    sym = held[w.format.name.replace("q4_0", "q4_sym_g32")]  # the plain or the _r16 twin
    np.testing.assert_array_equal(w.format.matmul(x, w.data), sym.matmul(x, w.data))
    with pytest.raises(ConfigError, match="q4_0, ggml's Q4_0 rule, which has groups of 32"):
        load(tiny_folder, quant=QuantSpec("q4_0", {}, 64), plugin_manager=pm)


@pytest.mark.parametrize("method", ["q4_sym", "q4_asym", "q4_0"])
def test_the_r16_layout_at_load_changes_no_bit(tiny_folder, monkeypatch, method):
    """The native backend converts the 4-bit matrices to their _r16 twins at load where
    that pays (LATTICE_Q4_R16 forces it either way): the same logits to the bit, the same
    blocks back, the embedding lookup included."""
    require_core()
    from lattice_quant_q4 import kernels as K
    if not K.available():
        pytest.skip(K.LOAD_ERROR)
    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("LATTICE_Q4_R16", forced)
        runs[forced] = load(tiny_folder, quant=QuantSpec(method, {"model.embed_tokens.weight":
                                                                  "q4_asym_g32"}),
                            backend="native", plugin_manager=manager())
    plain, r16 = runs["0"].model, runs["1"].model
    base = "q4_0" if method == "q4_0" else f"{method}_g32"
    assert plain.layers[0].mlp.up_proj.weight.format.name == base
    assert r16.layers[0].mlp.up_proj.weight.format.name == base + "_r16"
    assert r16.embed_tokens.format.name == "q4_asym_g32_r16"
    for a, b in zip(plain.layers, r16.layers):
        wa, wb = a.mlp.up_proj.weight, b.mlp.up_proj.weight
        family, group = F.layout_of(wa.format.name)
        np.testing.assert_array_equal(F.from_r16(family, group, wb.data), wa.data)
    np.testing.assert_array_equal(logits(runs["0"]), logits(runs["1"]))
    ids = np.array([0, 17, 255, 17])
    np.testing.assert_array_equal(r16.embed_tokens.format.embed(r16.embed_tokens.data, ids),
                                  plain.embed_tokens.format.embed(plain.embed_tokens.data, ids))


def test_overrides_win(tiny_folder):
    q4 = load(tiny_folder, quant=QuantSpec("q4_sym", {"model.layers.0.self_attn.*": "f16",
                                                      "lm_head.weight": "q4_asym_g32"}),
              plugin_manager=manager())
    assert formats_of(q4)["q"] == "f16" and formats_of(q4)["lm_head"] == "q4_asym_g32"
    assert q4.model.layers[1].self_attn.q_proj.weight.format.name.removesuffix("_r16") == \
        "q4_sym_g32"


@pytest.mark.parametrize("method,qtype", [("q4_sym", "Q4_0"), ("q4_asym", "Q4_1")])
def test_gguf_q4_tensors_load_as_their_bytes(tmp_path, method, qtype):
    gguf = pytest.importorskip("gguf")
    t = getattr(gguf.GGMLQuantizationType, qtype)
    path = tmp_path / f"tiny-{qtype}.gguf"
    w = write_tiny_gguf(path, t)
    loaded = load(path, quant=QuantSpec(method), plugin_manager=manager())
    attn = loaded.model.layers[1].self_attn
    # v_proj is stored as is; q_proj's rows were un-permuted, whole blocks at a time
    # (held in the _r16 layout where that pays: the same blocks, rows interleaved)
    assert attn.v_proj.weight.format.name.removesuffix("_r16") == f"{method}_g32"

    def blocks(m):
        return F.from_r16(method, 32, m.data) if m.format.name.endswith("_r16") else m.data
    np.testing.assert_array_equal(blocks(attn.v_proj.weight),
                                  gguf.quants.quantize(w["model.layers.1.self_attn.v_proj.weight"], t))
    np.testing.assert_array_equal(blocks(attn.q_proj.weight),
                                  gguf.quants.quantize(w["model.layers.1.self_attn.q_proj.weight"], t))
    # and the model computes with them: close to the float weights it was made from
    f32 = load(path, quant=QuantSpec("f32"), plugin_manager=manager())
    np.testing.assert_array_equal(f32.model.layers[1].self_attn.q_proj.weight.to_float(),
                                  attn.q_proj.weight.to_float())


@pytest.mark.parametrize("method,group", [("q4_asym", 32), ("q4_sym", 64)])
def test_quantize_writes_a_checkpoint_that_reloads_bit_identically(tiny_folder, tmp_path,
                                                                     monkeypatch, capsys,
                                                                     method, group):
    import lattice_engine.plugins as plugins
    monkeypatch.setattr(plugins, "_default", manager())
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--method", method, "--group-size", str(group),
                 "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == method and summary["group_size"] == group
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == method
    assert config["quantization"]["formats"]["model.layers.0.mlp.up_proj.weight"] == \
        f"{method}_g{group}"

    direct = load(tiny_folder, quant=QuantSpec(method, {}, group), plugin_manager=manager())
    again = load(out, plugin_manager=manager())  # no method given: as stored
    assert again.quant == method
    for a, b in zip(direct.model.layers, again.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            wa, wb = getattr(a.self_attn, name).weight, getattr(b.self_attn, name).weight
            assert wa.format is wb.format
            np.testing.assert_array_equal(wa.data, wb.data)
        for name in ("gate_proj", "up_proj", "down_proj"):
            np.testing.assert_array_equal(getattr(a.mlp, name).weight.data,
                                          getattr(b.mlp, name).weight.data)
    np.testing.assert_array_equal(logits(direct), logits(again))


def test_truncated_quantized_checkpoint_is_a_clear_error(tiny_folder, tmp_path, monkeypatch,
                                                         capsys):
    import lattice_engine.plugins as plugins
    monkeypatch.setattr(plugins, "_default", manager())
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--method", "q4_asym", "--out", str(out)]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="is truncated"):
        load(out, plugin_manager=manager())
    capsys.readouterr()
    assert main(["generate", "hi", "--model", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is truncated" in err


def test_a_packed_tensor_of_the_wrong_size_is_named(tiny_folder, tmp_path):
    from safetensors.numpy import load_file, save_file
    from lattice_engine.quantize import quantize_checkpoint
    out = tmp_path / "q"
    quantize_checkpoint(str(tiny_folder), out, QuantSpec("q4_asym"), manager())
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name][:, :-20].copy()
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' .* is stored as q4_asym_g32 "
                                              r"with \(96, 20\) bytes"):
        load(out, plugin_manager=manager())


@pytest.mark.skipif(not installed, reason="lattice-quant-q4 is not pip-installed here")
def test_without_the_plugin_loaded_q4_names_the_package(tiny_folder, capsys, monkeypatch):
    # the hint comes from this distribution's metadata (entry-point group
    # lattice_engine.quant_methods), not from a table in the core
    with pytest.raises(PluginError, match=r"'q4_asym' is provided by the installed distribution "
                                          r"lattice-quant-q4 \(plugin quant_q4\), which is not "
                                          r"loaded"):
        load(tiny_folder, quant=QuantSpec("q4_asym"), plugin_manager=PluginManager(allowlist=[]))
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    assert main(["generate", "hi", "--model", str(tiny_folder), "--quant", "q4_asym"]) == 2
    err = capsys.readouterr().err
    assert "lattice-quant-q4" in err and "LATTICE_PLUGINS" in err


@pytest.mark.parametrize("method", ["q4_sym", "q4_asym"])
def test_fused_decode_calls_our_kernel_from_c_bit_for_bit(tiny_folder, method):
    """WeightFormat.c_matmul hands the core's fused decode step our C matmul: the step then
    runs for a q4 model, with the per-kernel path's bits."""
    require_core()
    model = load(tiny_folder, quant=QuantSpec(method), backend="native",
                 plugin_manager=manager()).model
    assert model.layers[0].mlp.down_proj.weight.format.c_matmul is not None
    prompt = np.array([[1, 5, 9, 200, 3]])
    runs = {}
    for fused in (True, False):
        model.fused_decode, model._step_built = fused, False
        cache = model.make_cache()
        out = [model.forward(prompt, cache)[:, -1]]
        for tok in (7, 11, 13):
            out.append(model.forward(np.array([[tok]]), cache)[:, -1])
        runs[fused] = out
        assert (model._decode_step() is not None) == fused
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_array_equal(a, b)
