"""QuaRot's q4_asym with online rotations (the lattice-quarot plugin) on the _r16 layout:
the rotations run around our kernels (the fused decode step included) and the layout
changes no bit."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.pytest_plugin import require as require_core
from lattice_quant_q4 import kernels as K
from lattice_quant_q4 import plugin

quarot = pytest.importorskip("lattice_quarot", reason="lattice-quarot is not installed")
quarot_plugin = pytest.importorskip("lattice_quarot.plugin")


def manager() -> PluginManager:
    pm = PluginManager(allowlist=[])
    pm.register(plugin, name="quant_q4")
    pm.register(quarot_plugin, name="quarot")
    return pm


@pytest.mark.parametrize("basis", ["residual", "inputs"])
def test_quarot_q4_asym_online_rotations_on_the_r16_layout(tiny_folder, monkeypatch, basis):
    require_core()
    if not K.available():
        pytest.skip(K.LOAD_ERROR)
    ids = np.array([[1, 5, 9, 200, 3, 17]])
    transforms = {"quarot": quarot.QuarotSettings(enabled=True, seed=1, basis=basis,
                                                   online_down_proj=True)}
    runs = {}
    for forced in ("0", "1"):
        monkeypatch.setenv("LATTICE_Q4_R16", forced)
        model = load(tiny_folder, quant=QuantSpec("q4_asym"), backend="native",
                     plugin_manager=manager(), transforms=transforms).model
        held = model.layers[0].mlp.down_proj.weight.format.name
        assert held == "q4_asym_g32" + ("_r16" if forced == "1" else "")
        for fused in (True, False):
            model.fused_decode, model._step_built = fused, False
            cache = model.make_cache()
            out = [model.forward(ids[:, :4], cache)[:, -1]]
            out += [model.forward(ids[:, i:i + 1], cache)[:, -1] for i in (4, 5)]
            assert (model._decode_step() is not None) == fused
            runs[forced, fused] = np.concatenate(out)
    for key, out in runs.items():
        np.testing.assert_array_equal(out, runs["0", False], err_msg=str(key))
