"""q4 experts of a mixture-of-experts model (the core's tiny qwen3_moe / qwen3_5_moe
fixtures): the core's C expert dispatch calls this plugin's matmul once per selected expert
(lk_extern_matmul), inside the fused steps too, and gives the bits of the per-kernel path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lattice_engine.loading import load
from lattice_engine.models.moe import SparseMoE
from lattice_engine.plugins import PluginManager
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.pytest_plugin import require as require_core
from lattice_quant_q4 import plugin

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "fixtures"


def manager() -> PluginManager:
    pm = PluginManager(allowlist=[])
    pm.register(plugin, name="quant_q4")
    return pm


def fixture_folder(name):
    require_core()
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"the core's fixture {folder} is not here (run from the repository)")
    return folder


def fixture_model(name, quant):
    return load(fixture_folder(name), quant=QuantSpec(quant), backend="native",
                plugin_manager=manager()).model


@pytest.mark.parametrize("name", ["qwen3_moe_step2", "qwen3_5_moe"])
def test_q4_experts_run_in_the_c_dispatch_and_the_fused_step(name):
    model = fixture_model(name, "q4_sym")
    moes = [b.mlp for b in model.layers if isinstance(b.mlp, SparseMoE)]
    # held in the _r16 layout where that pays (the same blocks, 16 rows interleaved)
    assert moes and all(m.gate[0].format.name.removesuffix("_r16") == "q4_sym_g32"
                        for m in moes)
    assert all(m.native() is not None for m in moes)  # the plugin's C matmul per expert
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    ids, steps = golden["prompt_ids"], golden["decode_ids"][:, :6]
    runs = {}
    for fused in (True, False):
        model.fused_decode, model._step_built = fused, False
        cache = model.make_cache(batch=2)
        out = [model.forward(ids, cache)]
        out += [model.forward(steps[:, i:i + 1], cache) for i in range(steps.shape[1])]
        runs[fused] = np.concatenate(out, axis=1)
        assert (model._decode_step() is not None) == fused
    np.testing.assert_array_equal(runs[True], runs[False])
    # and 4-bit experts still follow transformers' float logits (random weights, and a
    # 4-bit router input flips some expert choices: loosely; measured 0.70 / 0.99)
    ref = golden["prefill_logits"].ravel()
    got = runs[True][:, :ids.shape[1]].ravel()
    assert np.dot(ref, got) / np.linalg.norm(ref) / np.linalg.norm(got) > 0.6


def _without_grouped(moe):
    """The same layer with its experts' formats stripped of c_matmul_grouped: the core's
    dispatch then calls c_matmul once per selected expert."""
    import dataclasses
    from lattice_engine.quant.formats import PackedMatrix
    for name in ("gate", "up", "down"):
        mats = getattr(moe, name)
        for i, w in enumerate(mats):
            fmt = dataclasses.replace(w.format, c_matmul_grouped=None)
            mats[i] = PackedMatrix(fmt, w.rows, w.cols, w.data)


@pytest.mark.parametrize("name", ["qwen3_moe_step2", "qwen3_5_moe"])
def test_grouped_expert_dispatch_gives_the_bits_of_one_call_per_expert(name):
    """Our formats hand the core a grouped matmul (WeightFormat.c_matmul_grouped): a layer's
    selected experts reach us in one call, x quantized once, one pool job. Every row is bit
    for bit what one call per expert gives, at decode sizes and with experts that get more
    rows than the few-rows kernels take (80 rows x top-k over 8 experts: the tiles)."""
    from lattice_engine.kernels.moe import NativeMoE
    model = fixture_model(name, "q4_asym")
    rng = np.random.default_rng(3)
    for moe in (b.mlp for b in model.layers if isinstance(b.mlp, SparseMoE)):
        assert moe.gate[0].format.c_matmul_grouped
        grouped = NativeMoE.build(moe)
        _without_grouped(moe)
        per_expert = NativeMoE.build(moe)
        for n in (1, 2, 7, 80):
            x = rng.standard_normal((n, moe.hidden)).astype(np.float32)
            np.testing.assert_array_equal(grouped(x), per_expert(x), err_msg=f"{n} rows")


@pytest.mark.parametrize("keep_mapped", [False, True])
def test_gguf_q4_0_experts_are_relaid_to_r16_or_stay_mapped(tmp_path, monkeypatch,
                                                             keep_mapped):
    """A GGUF's Q4_0 experts (stacked, memory-mapped) loaded as q4_sym: copied into our own
    memory and re-laid to q4_sym_g32_r16 where that pays (any x86 variant), or left as views
    of the map with LATTICE_MAP_EXPERTS=1; the same logits either way."""
    pytest.importorskip("gguf")
    import json
    from lattice_engine.testing.moe_gguf import write_qwen3_moe_gguf
    from lattice_quant_q4.kernels import r16_pays
    folder = fixture_folder("qwen3_moe")
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")
    weights = load_file(str(folder / "model.safetensors"))
    path = write_qwen3_moe_gguf(tmp_path / "moe_q4_0.gguf", config, weights.__getitem__, "Q4_0")

    def run():
        model = load(path, quant=QuantSpec("q4_sym"), backend="native",
                     plugin_manager=manager()).model
        ids = load_file(str(folder / "golden.safetensors"))["prompt_ids"]
        return model, model.forward(ids, model.make_cache(batch=2))

    monkeypatch.setenv("LATTICE_MAP_EXPERTS", "1")
    mapped_model, mapped_logits = run()
    if not keep_mapped:
        monkeypatch.delenv("LATTICE_MAP_EXPERTS")
    model, logits = run()
    relaid = r16_pays() and not keep_mapped
    for moe in (b.mlp for b in model.layers if isinstance(b.mlp, SparseMoE)):
        for m in moe.gate + moe.up + moe.down:
            assert m.format.name == ("q4_sym_g32_r16" if relaid else "q4_sym_g32")
            assert m.data.flags.writeable == relaid  # our copy, or the read-only map
    np.testing.assert_array_equal(logits, mapped_logits)
