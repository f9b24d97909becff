"""Our logits with a PEFT adapter against PeftModel + transformers' (float32, unmerged),
on every architecture the core has, Qwen3.5's Gated DeltaNet projections included; and
the adapter we save loads back (by us here; by PEFT in scripts/make_lora_fixtures.py's
sibling check, scripts/check_lora_real.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import BASES, LORA_FIXTURES, backends, load_base, reference
from lattice_engine.adapters import AdapterSlots, merge
from lattice_engine.testing.tolerance import logits_bound
from lattice_lora import load_peft, save_peft_safetensors


def forward_with(model, weights, ids, **kw):
    slots = AdapterSlots.of(model)
    slot = slots.add(weights)
    try:
        with slots.selecting(uniform=slot):
            return model.forward(ids, model.make_cache(batch=ids.shape[0]), **kw)
    finally:
        slots.release(slot)


def bound_for(model, ref) -> float:
    hidden = model.hidden_states(ref["prompt_ids"], model.make_cache(batch=2))
    return logits_bound(model, hidden, ref["prompt_ids"].shape[1])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("base", BASES)
def test_logits_match_peft(base, backend):
    model = load_base(base, backend)
    ref = reference(base)
    weights = load_peft(LORA_FIXTURES / base, model)
    got = forward_with(model, weights, ref["prompt_ids"])
    diff = np.abs(got - ref["logits"]).max()
    assert diff <= max(bound_for(model, ref), 1e-5), diff
    assert diff <= 1e-4
    # the adapter matters: without it the logits are far from PEFT's
    plain = model.forward(ref["prompt_ids"], model.make_cache(batch=2))
    assert np.abs(plain - ref["logits"]).max() > 100 * max(diff, 1e-6)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("base", BASES)
def test_decode_token_by_token_matches_prefill(base, backend):
    # the decode path (the fused C step on native) applies the adapter like the prefill
    model = load_base(base, backend)
    ref = reference(base)
    weights = load_peft(LORA_FIXTURES / base, model)
    ids = ref["prompt_ids"]
    slots = AdapterSlots.of(model)
    slot = slots.add(weights)
    with slots.selecting(uniform=slot):
        cache = model.make_cache(batch=2)
        first = model.forward(ids[:, :4], cache)
        rest = [model.forward(ids[:, i:i + 1], cache) for i in range(4, ids.shape[1])]
    got = np.concatenate([first] + rest, axis=1)
    assert np.abs(got - ref["logits"]).max() <= max(bound_for(model, ref), 1e-5)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_quantized_base_with_float_adapter(quant, backend):
    # the adapter stays float over a quantized base: the update equals PEFT's update on top
    # of the quantized model's own logits (native: the kernels' float16 copy of the factors)
    model = load_base("llama", backend, quant)
    ref = reference("llama")
    weights = load_peft(LORA_FIXTURES / "llama", model)
    got = forward_with(model, weights, ref["prompt_ids"])
    f32 = load_base("llama", "numpy")
    want = forward_with(f32, load_peft(LORA_FIXTURES / "llama", f32), ref["prompt_ids"])
    base_gap = np.abs(model.forward(ref["prompt_ids"], model.make_cache(batch=2)) -
                      f32.forward(ref["prompt_ids"], f32.make_cache(batch=2))).max()
    # the adapter adds no error of its own beyond the base format's
    assert np.abs(got - want).max() <= 3 * base_gap + 1e-5


@pytest.mark.parametrize("base", BASES)
def test_saved_adapter_loads_back_to_the_same_logits(base, tmp_path):
    model = load_base(base)
    ref = reference(base)
    weights = load_peft(LORA_FIXTURES / base, model)
    save_peft_safetensors(weights, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    again = load_peft(tmp_path / "saved", model)
    got = forward_with(model, again, ref["prompt_ids"])
    assert np.abs(got - ref["logits"]).max() <= max(bound_for(model, ref), 1e-5)


def test_merge_equals_unmerged():
    model = load_base("qwen3")
    ref = reference("qwen3")
    merge(model, load_peft(LORA_FIXTURES / "qwen3", model))
    got = model.forward(ref["prompt_ids"], model.make_cache(batch=2))
    assert np.abs(got - ref["logits"]).max() <= max(bound_for(model, ref), 1e-5)
