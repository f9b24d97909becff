"""`lattice quantize` and quantized checkpoints with the core formats (the q4 plugin has
its own tests), `[quant] group_size`, and the error for a method a missing plugin provides."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lattice_engine.cli import main
from lattice_engine.errors import CheckpointError, ConfigError, PluginError
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.methods import QuantSpec


def core_only() -> PluginManager:
    return PluginManager(allowlist=[])


def test_quantize_q8_0_reloads_bit_identically(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_model_dir), "--method", "q8_0", "--out", str(out),
                 "--override", "model.layers.1.mlp.*=f16"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "q8_0" and summary["formats"] == {"q8_0": 12, "f16": 3}  # the tied table is q8_0 too
    section = json.loads((out / "config.json").read_text())["quantization"]
    assert section["formats"]["model.layers.1.mlp.up_proj.weight"] == "f16"
    assert "model.layers.1.mlp.up_proj.weight" not in section["packed"]
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()

    direct = load(tiny_model_dir, quant=QuantSpec("q8_0", {"model.layers.1.mlp.*": "f16"}),
                  plugin_manager=core_only())
    again = load(out, plugin_manager=core_only())
    assert again.quant == "q8_0"
    for a, b in zip(direct.model.layers, again.model.layers):
        for la, lb in ((a.self_attn.q_proj, b.self_attn.q_proj), (a.mlp.up_proj, b.mlp.up_proj)):
            assert la.weight.format.name == lb.weight.format.name
            np.testing.assert_array_equal(la.weight.data, lb.weight.data)
    ids = np.array([[3, 1, 4, 1, 5]])
    np.testing.assert_array_equal(
        direct.model.forward(ids, direct.model.make_cache()),
        again.model.forward(ids, again.model.make_cache()))
    # asking for another method converts from the stored formats
    f32 = load(out, quant=QuantSpec("f32"), plugin_manager=core_only())
    assert f32.model.layers[0].self_attn.q_proj.weight.format.name == "f32"


def test_truncated_quantized_checkpoint_is_one_line(tiny_model_dir, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_model_dir), "--method", "q8_0", "--out", str(out)]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    capsys.readouterr()
    assert main(["generate", "hi", "--model", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is truncated" in err
    with pytest.raises(CheckpointError, match="is truncated"):
        load(out, plugin_manager=core_only())


def test_quantization_section_of_another_version_is_named(tiny_model_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_model_dir), "--method", "q8_0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["quantization"]["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not format_version 1"):
        load(out, plugin_manager=core_only())


def test_a_method_no_plugin_provides_says_so(tiny_model_dir, capsys, monkeypatch):
    # the core names no plugin: installed distributions declare their methods (entry-point
    # group lattice_engine.quant_methods; lattice-quant-q4's own suite checks that hint)
    with pytest.raises(PluginError, match=r"no installed plugin declares quant method "
                                          r"'q3_imaginary'"):
        load(tiny_model_dir, quant=QuantSpec("q3_imaginary"), plugin_manager=core_only())
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    for argv in (["generate", "hi", "--model", str(tiny_model_dir), "--quant", "q3_imaginary"],
                 ["quantize", str(tiny_model_dir), "--method", "q3_imaginary", "--out", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "q3_imaginary" in err and "lattice plugins --all" in err


def test_group_size_needs_a_grouped_method(tiny_model_dir):
    with pytest.raises(ConfigError, match="does not apply to quant method 'q8_0'"):
        load(tiny_model_dir, quant=QuantSpec("q8_0", {}, 64), plugin_manager=core_only())


def test_bad_override_syntax(tiny_model_dir, capsys):
    assert main(["quantize", str(tiny_model_dir), "--method", "q8_0", "--out", "x",
                 "--override", "lm_head.weight"]) == 2
    assert "must look like GLOB=FORMAT" in capsys.readouterr().err
