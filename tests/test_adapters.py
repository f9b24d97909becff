"""The core's adapter seam (lattice_engine.adapters): low-rank updates per row and slot,
numpy reference against the C kernel, mixtures, merge, slots and references, and the
register_adapters hook's contract check. The LoRA kind itself (PEFT files) is tested in
plugins/lora."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine import ops
from lattice_engine.adapters import (AdapterManager, AdapterSlots, AdapterWeights, LowRank,
                                     RowSelection, LinearAdapters, UnknownAdapter, merge,
                                     mix_adapters, named_linears)
from lattice_engine.errors import PluginError, RequestError
from lattice_engine.hookspecs import hookimpl
from lattice_engine.loading import load
from lattice_engine.plugins import PluginManager
from lattice_engine.testing.tolerance import dot_bound

from conftest import FIXTURES


def random_table(rows: RowSelection, k: int, n: int, ranks, seed: int = 0,
                 dtype: str = "f32") -> LinearAdapters:
    rng = np.random.default_rng(seed)
    t = LinearAdapters(rows, k, n, dtype)
    for slot, r in enumerate(ranks):
        if r:
            t.put(slot, LowRank(rng.standard_normal((r, k)), rng.standard_normal((n, r)),
                                0.5 + slot))
    return t


def expected(x, table, slots):
    y = np.zeros((x.shape[0], table.out_features), np.float64)
    for i, s in enumerate(slots):
        lr = table.factors[s] if 0 <= s < len(table.factors) else None
        if lr is not None:
            y[i] = lr.scale * (x[i].astype(np.float64) @ lr.a.T.astype(np.float64)) @ lr.b.T
    return y


def bound(x, table, k, dtype="f32"):
    # two float32 dot products of length K, then r: bounded at the magnitudes |x| |A| |B|;
    # f16 factors (scaled by powers of two into [-1, 1]) add a rounding of at most 2^-11
    # of each value of A and of B, or 2^-25 of the largest below f16's normal range
    mags = [np.abs(x) @ np.abs(lr.a.T) @ np.abs(lr.b.T) * lr.scale
            for lr in table.factors if lr is not None]
    extra = 0.0
    if dtype == "f16":
        extra = max(np.max(m) for m in mags) * 2 * (2.0 ** -11 + 2.0 ** -24 * k)
    return dot_bound(k + 32, np.max(mags)) + extra


@pytest.mark.parametrize("backend,dtype", [
    ("numpy", "f32"), pytest.param("native", "f32", marks=pytest.mark.native),
    pytest.param("native", "f16", marks=pytest.mark.native)])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_rows_use_their_own_slot(backend, dtype, m):
    from lattice_engine.loading import get_ops
    o = get_ops(backend)
    rows = RowSelection()
    table = random_table(rows, 72, 300, [4, 0, 16, 7], dtype=dtype)  # slot 1: no factors
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, 72)).astype(np.float32)
    slots = rng.integers(-1, 5, m).astype(np.int32)       # -1: none; 4: beyond the table
    y0 = rng.standard_normal((m, 300)).astype(np.float32)
    rows.set(per_row=slots)
    got = o.lora_apply(x, y0.copy(), table, rows.slots_for(m))
    want = y0 + expected(x, table, slots)
    assert np.abs(got - want).max() <= bound(x, table, 72, dtype)
    rows.set(uniform=2)
    got = o.lora_apply(x, y0.copy(), table, rows.slots_for(m))
    assert np.abs(got - (y0 + expected(x, table, [2] * m))).max() <= bound(x, table, 72, dtype)
    rows.set()
    assert np.array_equal(table.apply(x, y0.copy(), o), y0)  # nothing selected: untouched


@pytest.mark.native
@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("n", [300, 8])
def test_native_rows_get_the_same_bits_batched_as_alone(n, dtype):
    # the kernel groups rows by slot (one pass over a slot's factors for all its rows) and
    # splits outputs into blocks; a row's update must not depend on its company
    from lattice_engine import kernels
    rows = RowSelection()
    table = random_table(rows, 72, n, [4, 16, 7, 33, 1], dtype=dtype)  # tails of 8 or not
    rng = np.random.default_rng(2)
    m = 11
    x = rng.standard_normal((m, 72)).astype(np.float32)
    y0 = rng.standard_normal((m, n)).astype(np.float32)
    slots = np.array([3, 0, 1, 3, -1, 2, 3, 4, 0, 2, 3], np.int32)
    rows.set(per_row=slots)
    together = kernels.lora_apply(x, y0.copy(), table, slots)
    assert np.abs(together - (y0 + expected(x, table, slots))).max() <= \
        bound(x, table, 72, dtype)
    for i in range(m):
        rows.set(per_row=slots[i:i + 1])
        alone = kernels.lora_apply(x[i:i + 1], y0[i:i + 1].copy(), table, slots[i:i + 1])
        assert np.array_equal(alone[0], together[i]), i


@pytest.mark.native
def test_native_refuses_a_selection_of_other_rows():
    from lattice_engine import kernels
    rows = RowSelection()
    table = random_table(rows, 8, 8, [2])
    rows.set(per_row=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="3 rows were selected but the forward runs 2"):
        table.apply(np.ones((2, 8), np.float32), np.zeros((2, 8), np.float32), kernels)


def test_mixture_is_the_weighted_sum_of_updates():
    rng = np.random.default_rng(0)
    a = AdapterWeights("a", {"m": LowRank(rng.standard_normal((2, 5)),
                                          rng.standard_normal((3, 2)), 2.0)})
    b = AdapterWeights("b", {"m": LowRank(rng.standard_normal((4, 5)),
                                          rng.standard_normal((3, 4)), 0.5),
                             "n": LowRank(rng.standard_normal((1, 5)),
                                          rng.standard_normal((5, 1)), 1.0)})
    mix = mix_adapters([(a, 0.25), (b, -1.5)], "ab")
    want = 0.25 * a.modules["m"].delta() - 1.5 * b.modules["m"].delta()
    assert mix.modules["m"].rank == 6
    np.testing.assert_allclose(mix.modules["m"].delta(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mix.modules["n"].delta(), -1.5 * b.modules["n"].delta(),
                               rtol=1e-6)


def adapter_for(model, seed: int = 0, r: int = 3, only=None) -> AdapterWeights:
    rng = np.random.default_rng(seed)
    mods = {}
    for name, lin in named_linears(model).items():
        if only and not name.endswith(only):
            continue
        mods[name] = LowRank(0.1 * rng.standard_normal((r, lin.weight.cols)),
                             0.1 * rng.standard_normal((lin.weight.rows, r)), 2.0)
    return AdapterWeights(f"a{seed}", mods)


@pytest.mark.parametrize("name", ["llama", "qwen3_5_text"])
def test_every_linear_is_named_like_hf(name):
    model = load(FIXTURES / name, backend="numpy").model
    names = named_linears(model)
    if name == "llama":
        assert "model.layers.1.self_attn.q_proj" in names and "model.layers.0.mlp.down_proj" in names
        assert len(names) == 2 * 7
    else:
        assert "model.layers.0.linear_attn.in_proj_qkv" in names
        assert "model.layers.2.self_attn.o_proj" in names and len(names) == 3 * 8 + 7


def test_merge_equals_the_unmerged_update():
    model = load(FIXTURES / "llama", backend="numpy").model
    ids = np.array([[3, 7, 11, 200, 5]])
    w = adapter_for(model)
    slots = AdapterSlots.of(model)
    slot = slots.add(w)
    with slots.selecting(uniform=slot):
        unmerged = model.forward(ids, model.make_cache())
    plain = model.forward(ids, model.make_cache())
    merge(model, w)
    merged = model.forward(ids, model.make_cache())
    assert np.abs(merged - unmerged).max() < 1e-4 < np.abs(plain - unmerged).max()


@pytest.mark.parametrize("quant,want", [("f32", "f32"), ("f16", "f16"), ("q8_0", "f16")])
def test_the_kernel_holds_factors_at_the_precision_of_their_base(quant, want):
    from lattice_engine.quant.methods import QuantSpec
    model = load(FIXTURES / "llama", backend="numpy", quant=QuantSpec(quant)).model
    slots = AdapterSlots.of(model)
    w = adapter_for(model)
    slots.add(w)
    assert {lin.adapters.dtype for lin in slots.linears.values()} == {want}
    lr = next(iter(w.modules.values()))
    a, bp, scale = lr._kernel[want]
    assert a.dtype == (np.float32 if want == "f32" else np.float16)
    # f16: the factors divided by powers of two into [-1, 1], the scale carrying them
    rebuilt = scale * (bp.transpose(0, 2, 1).reshape(-1, lr.rank)[:lr.b.shape[0]].astype(
        np.float64) @ a.astype(np.float64))
    magnitude = lr.scale * np.abs(lr.b.astype(np.float64)) @ np.abs(lr.a.astype(np.float64))
    # each of a's and b's values rounded once to f16 (2^-11), their product at most twice
    assert np.all(np.abs(rebuilt - lr.delta()) <= (2 * 2.0 ** -11 + 2.0 ** -20) * magnitude + 1e-30)
    assert np.abs(a).max() <= 1 or want == "f32"


def test_slots_are_freed_with_their_last_reference():
    model = load(FIXTURES / "llama", backend="numpy").model
    mgr = AdapterManager(model, PluginManager(load_entry_points=False).registry)
    mgr.put(adapter_for(model, 0))
    slot, variant = mgr.acquire("a0")
    mgr.put(AdapterWeights("a0", adapter_for(model, 1).modules))   # a new version
    new_slot, new_variant = mgr.acquire("a0")
    assert new_slot != slot and new_variant != variant
    assert slot in mgr.slots.weights           # still held by the first request
    mgr.release(slot)
    assert slot not in mgr.slots.weights
    mgr.release(new_slot)
    mgr.unload("a0")
    assert not mgr.slots.weights
    with pytest.raises(UnknownAdapter, match="'a0' is not loaded; loaded: \\(none\\)"):
        mgr.acquire("a0")


def test_an_adapter_for_other_shapes_is_refused():
    model = load(FIXTURES / "llama", backend="numpy").model
    slots = AdapterSlots.of(model)
    bad = AdapterWeights("x", {"model.layers.0.self_attn.q_proj":
                               LowRank(np.zeros((2, 65)), np.zeros((64, 2)), 1.0)})
    with pytest.raises(RequestError, match=r"q_proj' is \[64, 64\]"):
        slots.add(bad)
    with pytest.raises(RequestError, match="does not have"):
        slots.add(AdapterWeights("y", {"model.layers.9.mlp.up_proj":
                                       LowRank(np.zeros((2, 64)), np.zeros((96, 2)), 1.0)}))


class NoSave:
    name = "halfway"

    def load(self, path, model, name=None):
        raise NotImplementedError


def test_an_adapter_kind_without_save_is_refused():
    class Plugin:
        @hookimpl
        def register_adapters(self, register):
            register(NoSave())

    pm = PluginManager(load_entry_points=False)
    pm.register(Plugin(), name="halfway-plugin")
    with pytest.raises(PluginError, match="adapter kind 'halfway'.*lacks save"):
        pm.registry
