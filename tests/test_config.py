"""The TOML config: defaults, overrides, and errors that name key, value and choices."""

import pytest

from lattice_engine.config import Config, config_from_dict, load_config
from lattice_engine.errors import ConfigError
from lattice_engine.plugins import PluginManager


def write(tmp_path, text):
    path = tmp_path / "lattice.toml"
    path.write_text(text)
    return path


def test_full_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, """
[model]
path = "some/folder"
backend = "numpy"
threads = 2
[quant]
method = "q8_0"
overrides = { "lm_head.weight" = "f16" }
[sampling]
temperature = 0
top_k = 40
stop = ["\\n\\n"]
seed = 7
[plugins]
load = ["a", "b"]
[server]
port = 9000
"""))
    assert cfg.model.path == "some/folder" and cfg.model.threads == 2
    assert cfg.quant.method == "q8_0" and cfg.quant.overrides == {"lm_head.weight": "f16"}
    assert cfg.sampling.temperature == 0.0 and cfg.sampling.top_k == 40
    assert cfg.sampling.stop == ("\n\n",) and cfg.sampling.seed == 7
    assert cfg.plugins.load == ("a", "b")
    assert cfg.server.port == 9000 and cfg.server.host == "127.0.0.1"


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config() == Config()


def test_cwd_lattice_toml_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "[quant]\nmethod = 'f16'\n")
    assert load_config().quant.method == "f16"


def test_cli_style_override_replaces_only_given_values():
    cfg = config_from_dict({"sampling": {"temperature": 0.2, "top_k": 5}})
    cfg = cfg.override("sampling", top_k=9, temperature=None)
    assert cfg.sampling.temperature == 0.2 and cfg.sampling.top_k == 9


@pytest.mark.parametrize("text,message", [
    ("[model\npath = 1", "is not valid TOML"),
    ("[modle]\npath = 'x'", r"unknown section \[modle\]; valid sections: model, quant, "
                            r"sampling, plugins, server, speculative, inputs, ray "
                            r"\(did you mean \[model\]\?\)"),
    ("stray = 1", r"unknown section \[stray\]"),
    ("[model]\npaht = 'x'", r"unknown key model.paht; valid keys in \[model\]: path, backend, "
                            r"threads"),
    ("[model]\nbackend = 'gpu'", r"model.backend = 'gpu' is not valid; choices: auto, native, "
                                 r"numpy"),
    ("[sampling]\ntop_p = 1.5", r"top_p=1.5 is out of range: it must be in \(0, 1\]"),
    ("[sampling]\ntemperature = 'hot'", "sampling.temperature = 'hot' must be of type float"),
    ("[server]\nport = 70000", "server.port = 70000 is out of range: use 1..65535"),
    ("model = 3", r"model must be a table \(\[model\]\)"),
    ("[ray]\nreplicas = 0", r"ray.replicas = 0 is out of range: it must be an integer >= 1"),
    ("[ray]\nmin_replicas = 1", r"autoscaling needs both bounds"),
    ("[ray]\nmin_replicas = 3\nmax_replicas = 2", r"ray.max_replicas = 2 is below "
                                                  r"ray.min_replicas = 3"),
    ("[ray]\nrouting = 'random'", r"ray.routing = 'random' is not valid; choices: prefix, "
                                   r"round-robin"),
    ("[ray]\naddress = ' '", r"ray.address \(--ray-address\) is empty"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_plugin_sections_are_checked_against_installed_transforms(tmp_path):
    from dataclasses import dataclass

    from lattice_engine.plugins import Registry
    from lattice_engine.transforms import WeightTransform

    @dataclass(frozen=True)
    class Knobs:
        enabled: bool = False
        seed: int = 0

    cfg = load_config(write(tmp_path, "[rotate]\nenabled = true\nseed = 3\n"))
    empty = Registry()
    with pytest.raises(ConfigError, match=r"unknown section \[rotate\].*plugin sections: "
                                          r"\(none installed\)"):
        cfg.transform_settings(empty)
    registry = Registry()
    registry.add("weight_transforms", "rotate",
                 WeightTransform("rotate", Knobs, lambda c, s, f: c), "test")
    assert cfg.transform_settings(registry) == {"rotate": Knobs(enabled=True, seed=3)}
    off = load_config(write(tmp_path, "[rotate]\nseed = 3\n"))
    assert off.transform_settings(registry) == {}
    bad = load_config(write(tmp_path, "[rotate]\nsed = 3\n"))
    with pytest.raises(ConfigError, match=r"unknown key rotate.sed; valid keys in \[rotate\]: "
                                          r"enabled, seed"):
        bad.transform_settings(registry)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_unknown_quant_method_lists_choices():
    cfg = config_from_dict({"quant": {"method": "q4_asym"}})
    with pytest.raises(ConfigError, match=r"quant.method = 'q4_asym' is not a registered quant "
                                          r"method; choices: f16, f32, gguf, q8_0"):
        cfg.validate(PluginManager(allowlist=[]).registry)


def test_unknown_override_format_lists_choices():
    cfg = config_from_dict({"quant": {"overrides": {"lm_head.weight": "q3"}}})
    with pytest.raises(ConfigError, match="'q3' is not a registered weight format; choices: "
                                          "f16, f32, q4_k, q5_0, q6_k, q8_0"):
        cfg.validate(PluginManager(allowlist=[]).registry)
