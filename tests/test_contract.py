"""The plugin contract as code (lattice_engine.contract): what a plugin registers is checked
when the registry is built, a plugin's own exception names the plugin, the registry follows
pluggy's tryfirst / trylast order, and `lattice plugins` builds the registry."""

from __future__ import annotations

import dataclasses

import re

import pytest

from conftest import FIXTURES
from lattice_engine import contract, hookimpl
from lattice_engine.cli import main
from lattice_engine.engine import Engine
from lattice_engine.errors import ConfigError, PluginError
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.core_formats import Q8_0
from lattice_engine.quant.methods import QuantMethod


def manager_with(plugin, name="acme") -> PluginManager:
    pm = PluginManager(allowlist=[])
    pm.register(plugin, name)
    return pm


def registry_error(plugin) -> str:
    with pytest.raises(PluginError) as info:
        manager_with(plugin).registry
    return str(info.value)


class NotAModel:
    """Has from_checkpoint, but no forward / hidden_states / logits / make_cache."""

    @classmethod
    def from_checkpoint(cls, checkpoint, loader, ops):
        return cls()


@pytest.mark.parametrize("kind,register_call,expected", [
    ("architectures", lambda r: r("acme_lm", NotAModel),
     r"plugin 'acme' registered architecture 'acme_lm', which lacks forward, make_cache, "
     r"hidden_states, logits"),
    ("architectures", lambda r: r("acme_lm", NotAModel()),
     r"architecture 'acme_lm', which is a NotAModel, not a class"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad", block_size=0)),
     r"weight format 'q8_bad', which has block_size = 0"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad", c_matmul=("f", 0))),
     r"weight format 'q8_bad', which has c_matmul = \('f', 0\)"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad",
                                                      c_matmul=(1, 0), c_matmul_grouped=-3)),
     r"weight format 'q8_bad', which has c_matmul_grouped = -3"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad", c_matmul_grouped=7)),
     r"weight format 'q8_bad', which has a c_matmul_grouped but no c_matmul"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad",
                                                      from_stored={"q4_k": "not callable"})),
     r"weight format 'q8_bad', which has from_stored = \{'q4_k': 'not callable'\}"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad",
                                                      from_stored=[("q4_k", len)])),
     r"weight format 'q8_bad', which has from_stored = \[.*must be None or a mapping"),
    ("weight_formats", lambda r: r(dataclasses.replace(Q8_0, name="q8_bad", native_layout=1)),
     r"weight format 'q8_bad', which has a native_layout that is neither None nor callable"),
    ("weight_formats", lambda r: r("fmt", {"name": "fmt"}),
     r"weight format 'fmt', which is a dict, not a lattice_engine.quant.formats.WeightFormat"),
    ("quant_methods", lambda r: r(QuantMethod("q5_magic", linear="q5_blocks")),
     r"quant method 'q5_magic', which stores linear matrices as 'q5_blocks', a weight format "
     r"nobody registered"),
    ("samplers", lambda r: r("lucky", 42),
     r"sampler 'lucky', which is a int, not a factory"),
    ("logits_processors", lambda r: r("seed", lambda value: None),
     r"logits processor 'seed', which shares its name with a sampling parameter"),
    ("logits_processors", lambda r: r("stop", lambda value: None),
     r"logits processor 'stop', which shares its name"),
    ("encoders", lambda r: r("eye", object()),
     r"encoder 'eye', which has modality = None; it must be a non-empty string"),
    ("encoders", lambda r: r("eye", type("Eye", (), {"modality": "image",
                                                     "supports": lambda self, c: True})()),
     r"encoder 'eye', which lacks load \(see lattice_engine.contract.InputEncoder\)"),
])
def test_an_incomplete_registration_fails_naming_the_plugin_and_member(kind, register_call,
                                                                        expected):
    hook = {"architectures": "register_architectures", "weight_formats": "register_weight_formats",
            "quant_methods": "register_quant_methods", "samplers": "register_samplers",
            "logits_processors": "register_logits_processors",
            "encoders": "register_encoders"}[kind]

    class Plugin:
        pass

    setattr(Plugin, hook, staticmethod(hookimpl(specname=hook)(lambda register: register_call(register))))
    message = registry_error(Plugin)
    assert re.search(expected, message), message


def test_an_exception_inside_a_hook_names_the_plugin_and_the_hook():
    class Broken:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            raise KeyError("oops")

    assert "plugin 'acme' raised in register_samplers: KeyError: 'oops'" in registry_error(Broken)


def test_registry_follows_pluggy_call_order():
    # built-ins are tryfirst (their processors run first); among tryfirst hooks the
    # later-registered plugin goes first; trylast goes last
    def processor(name):
        return lambda value: None

    class Early:
        @staticmethod
        @hookimpl(tryfirst=True)
        def register_logits_processors(register):
            register("early", processor("early"))

    class Plain:
        @staticmethod
        @hookimpl
        def register_logits_processors(register):
            register("plain", processor("plain"))

    class Late:
        @staticmethod
        @hookimpl(trylast=True)
        def register_logits_processors(register):
            register("late", processor("late"))

    pm = PluginManager(allowlist=[])
    for plugin, name in ((Late, "late"), (Plain, "plain"), (Early, "early")):
        pm.register(plugin, name)
    order = pm.registry.names("logits_processors")
    builtins = ["repetition_penalty", "temperature", "top_k", "top_p", "min_p"]
    assert order == ["early"] + builtins + ["plain", "late"]
    assert pm.registry.owners["logits_processors"]["late"] == "late"


def test_lattice_plugins_builds_the_registry(monkeypatch, capsys):
    class Clash:
        @staticmethod
        @hookimpl
        def register_samplers(register):
            register("greedy", lambda rng: (lambda logits: 0))

    from lattice_engine import plugins
    pm = manager_with(Clash, "clash")
    monkeypatch.setattr(plugins, "_default", pm)
    assert main(["plugins"]) == 2
    assert "'greedy' is registered twice" in capsys.readouterr().err
    monkeypatch.setattr(plugins, "_default", PluginManager(allowlist=[]))
    assert main(["plugins", "--all"]) == 0
    listed = capsys.readouterr().out
    assert '"greedy"' in listed and '"registers"' in listed


def test_serving_a_model_without_paged_members_is_a_clear_error(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), backend="numpy")

    class DenseOnly:
        """Delegates the CausalLM members only."""

        def __init__(self, inner):
            self.config = inner.config
            self.forward, self.make_cache = inner.forward, inner.make_cache
            self.hidden_states, self.logits = inner.hidden_states, inner.logits

    engine.model = DenseOnly(engine.model)
    assert isinstance(engine.model, contract.CausalLM)
    assert not contract.is_servable(engine.model)
    with pytest.raises(ConfigError, match="lacks make_paged_cache, forward_paged"):
        engine.start_batching()
    # generation needs only the CausalLM members
    assert len(engine.generate("ab", max_tokens=2).tokens) == 2


def test_the_core_models_honour_the_protocols():
    for name in ("llama", "qwen3_5_text"):
        model = load(FIXTURES / name, backend="numpy").model
        assert isinstance(model, contract.PagedCausalLM)
        assert isinstance(model.config, contract.ModelConfig)


def test_engine_load_keeps_a_quantized_checkpoint_as_stored(tiny_model_dir, tmp_path):
    out = tmp_path / "q8"
    assert main(["quantize", str(tiny_model_dir), "--method", "q8_0", "--out", str(out)]) == 0
    engine = Engine.load(str(out), backend="numpy")
    assert engine.model.layers[0].mlp.up_proj.weight.format.name == "q8_0"
    assert Engine.load(str(out), quant="f32", backend="numpy").model.layers[0].mlp.up_proj \
        .weight.format.name == "f32"
    assert len(engine.generate("ab", max_tokens=1).tokens) == 1


def test_a_plugin_can_require_the_hook_contract_version():
    from lattice_engine import PLUGIN_API_VERSION, require_plugin_api
    major, minor = (int(p) for p in PLUGIN_API_VERSION.split("."))
    require_plugin_api(major, minor, plugin="acme")          # this engine: fine
    with pytest.raises(PluginError, match=r"acme needs lattice-engine plugin API "
                                          rf"{major}\.{minor + 1}.*upgrade lattice-engine"):
        require_plugin_api(major, minor + 1, plugin="acme")
    with pytest.raises(PluginError, match=r"upgrade acme"):
        require_plugin_api(major - 1, 0, plugin="acme")
