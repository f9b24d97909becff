"""The plugin system: entry points from a real (throwaway) distribution, the allowlist,
duplicates and missing plugins, and `lattice plugins`."""

import json
import sys
import textwrap

import pytest

from lattice_engine import hookimpl
from lattice_engine.cli import main
from lattice_engine.errors import PluginError
from lattice_engine.plugins import PluginManager, get_plugin_manager


def make_distribution(root, dist, plugin, module, body):
    """Write an installed-looking distribution (module + dist-info with an entry point)."""
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[lattice_engine]\n{plugin} = {module}\n")


PLUGIN_BODY = """
    import numpy as np
    from lattice_engine import hookimpl

    @hookimpl
    def register_logits_processors(register):
        def ban_token_zero(value):
            if not value:
                return None
            def apply(token_ids, logits):
                logits[0] = -np.inf
                return logits
            return apply
        register("ban_token_zero", ban_token_zero)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("throwaway")]:
        del sys.modules[name]


def test_entry_point_plugin_is_loaded_and_used(site):
    make_distribution(site, "lattice-throwaway", "throwaway", "throwaway_plugin", PLUGIN_BODY)
    pm = PluginManager()
    assert "ban_token_zero" in pm.registry.names("logits_processors")
    described = {p["name"]: p for p in pm.describe()}
    assert described["throwaway"]["version"] == "1.2.3"
    assert described["throwaway"]["distribution"] == "lattice-throwaway"
    assert described["throwaway"]["hooks"] == ["register_logits_processors"]

    import numpy as np
    from lattice_engine.sampling import SamplingParams, make_sampler
    sampler = make_sampler(SamplingParams(temperature=0, processors={"ban_token_zero": True}),
                           pm.registry)
    assert sampler([], np.array([5.0, 1.0, 2.0], np.float32)) == 2


def test_allowlist_limits_loading(site):
    make_distribution(site, "lattice-throwaway", "throwaway", "throwaway_plugin", PLUGIN_BODY)
    assert "ban_token_zero" not in PluginManager(allowlist=[]).registry.names("logits_processors")
    assert "ban_token_zero" in PluginManager(allowlist=["throwaway"]).registry.names(
        "logits_processors")


def test_env_allowlist_empty_means_none(site, monkeypatch):
    make_distribution(site, "lattice-throwaway", "throwaway", "throwaway_plugin", PLUGIN_BODY)
    monkeypatch.setenv("LATTICE_PLUGINS", "")
    assert get_plugin_manager().describe() == []


def test_missing_allowlisted_plugin_is_an_error(site):
    with pytest.raises(PluginError, match=r"plugin\(s\) nope are allow-listed but not installed"):
        PluginManager(allowlist=["nope"])


def test_duplicate_names_name_both_owners(site):
    make_distribution(site, "lattice-throwaway", "throwaway", "throwaway_plugin", PLUGIN_BODY)
    make_distribution(site, "lattice-throwaway2", "throwaway2", "throwaway_plugin2", PLUGIN_BODY)
    with pytest.raises(PluginError) as err:
        PluginManager().registry
    assert "'ban_token_zero' is registered twice" in str(err.value)
    assert "'throwaway'" in str(err.value) and "'throwaway2'" in str(err.value)


def test_plugin_cannot_take_a_builtin_name():
    class Impostor:
        @hookimpl
        def register_quant_methods(self, register):
            from lattice_engine.quant.methods import QuantMethod
            register(QuantMethod("q8_0", linear="f32"))

    pm = PluginManager(allowlist=[])
    pm.register(Impostor(), name="impostor")
    with pytest.raises(PluginError, match="'q8_0' is registered twice: by "
                                          "'lattice_engine.builtins' and by 'impostor'"):
        pm.registry


def test_in_process_plugin_registers_and_unregisters():
    class Extra:
        @hookimpl
        def register_samplers(self, register):
            register("always_one", lambda rng: (lambda logits: 1))

    pm = PluginManager(allowlist=[])
    pm.register(Extra(), name="extra")
    assert "always_one" in pm.registry.names("samplers")
    pm.unregister("extra")
    assert "always_one" not in pm.registry.names("samplers")


def test_cli_plugins_lists_builtins_with_all(capsys):
    assert main(["plugins", "--all"]) == 0
    listed = json.loads(capsys.readouterr().out)
    builtin = next(p for p in listed if p["name"] == "lattice_engine.builtins")
    assert builtin["builtin"] is True
    assert "register_architectures" in builtin["hooks"]


def test_cli_plugins_lists_entry_point_plugins(site, capsys):
    make_distribution(site, "lattice-throwaway", "throwaway", "throwaway_plugin", PLUGIN_BODY)
    assert main(["plugins"]) == 0
    listed = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in listed]
    assert "throwaway" in names  # beside any plugin installed for real (CI installs ours)
    assert "lattice_engine.builtins" not in names
