"""Every architecture against transformers' float32 logits (tests/fixtures, made by
scripts/make_golden_fixtures.py): prefill of a batch of 2, then token-by-token decode.

Tolerances: two float32 evaluations in different summation orders (torch against numpy or
our kernels) differ by at most `testing.tolerance.logits_bound`, derived from the model's
dot-product lengths and the logits' magnitude, not fitted to one machine's BLAS."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ARCHITECTURES, FIXTURES, backends
from lattice_engine.loading import get_ops, load
from lattice_engine.quant.methods import QuantSpec
from lattice_engine.testing.tolerance import logits_bound


def golden_bound(model, golden) -> float:
    """The float32 bound for this model's logits over the golden run's whole context."""
    hidden = model.hidden_states(golden["prompt_ids"], model.make_cache(batch=2))
    return logits_bound(model, hidden, golden["prompt_ids"].shape[1] + golden["decode_ids"].shape[1])


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prefill_and_decode_match_transformers(name, backend):
    model = load(FIXTURES / name, backend=backend).model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    bound = golden_bound(model, golden)
    cache = model.make_cache(batch=2, capacity=4)  # small on purpose: exercises growth
    prefill = model.forward(golden["prompt_ids"], cache)
    assert prefill.shape == golden["prefill_logits"].shape
    assert np.abs(prefill - golden["prefill_logits"]).max() <= bound

    steps = golden["decode_ids"]
    decode = np.concatenate([model.forward(steps[:, i:i + 1], cache)
                             for i in range(steps.shape[1])], axis=1)
    assert np.abs(decode - golden["decode_logits"]).max() <= bound
    assert (decode.argmax(-1) == golden["decode_logits"].argmax(-1)).all()
    # greedy from our own logits reproduces the reference's greedy continuation
    ours = np.concatenate([prefill[:, -1:], decode[:, :-1]], axis=1).argmax(-1)
    assert (ours == steps).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_batch_rows_equal_single_sequences(name):
    # numpy: BLAS may block a 2-row and a 1-row product differently, so the rows agree
    # within the float32 bound of two summation orders
    model = load(FIXTURES / name, backend="numpy").model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    bound = golden_bound(model, golden)
    both = model.forward(golden["prompt_ids"], model.make_cache(batch=2))
    for row in range(2):
        alone = model.forward(golden["prompt_ids"][row:row + 1], model.make_cache(batch=1))
        assert np.abs(alone[0] - both[row]).max() <= bound


@pytest.mark.native
@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_native_batch_rows_and_split_prefill_are_bit_identical(name, quant, kernel_variant):
    # the C kernels compute each output row in an order that does not depend on the other
    # rows or on where a prompt was cut, so here the claim is exact
    model = load(FIXTURES / name, quant=QuantSpec(quant), backend="native").model
    ids = load_file(str(FIXTURES / name / "golden.safetensors"))["prompt_ids"]
    both = model.forward(ids, model.make_cache(batch=2))
    for row in range(2):
        np.testing.assert_array_equal(model.forward(ids[row:row + 1], model.make_cache(batch=1))[0],
                                      both[row])
    cache, cut = model.make_cache(batch=2), ids.shape[1] // 2 + 1
    parts = [model.forward(ids[:, :cut], cache), model.forward(ids[:, cut:], cache)]
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), both)


@pytest.mark.parametrize("backend", backends())
def test_last_only_equals_last_row_of_full_logits(backend):
    # one row through the lm_head against all rows: BLAS may block them differently
    model = load(FIXTURES / "qwen3", backend=backend).model
    ids = load_file(str(FIXTURES / "qwen3" / "golden.safetensors"))["prompt_ids"]
    full = model.forward(ids, model.make_cache(batch=2))
    last = model.forward(ids, model.make_cache(batch=2), last_only=True)
    bound = logits_bound(model, model.hidden_states(ids, model.make_cache(batch=2)), ids.shape[1])
    assert np.abs(last[:, 0] - full[:, -1]).max() <= bound


def test_numpy_backend_is_selectable():
    from lattice_engine import ops
    assert get_ops("numpy") is ops
