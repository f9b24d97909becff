"""Every architecture against transformers' float32 logits (tests/fixtures, made by
scripts/make_golden_fixtures.py): prefill of a batch of 2, then token-by-token decode."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ARCHITECTURES, FIXTURES, backends
from lattice_engine.loading import get_ops, load

TOLERANCE = 1e-4


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prefill_and_decode_match_transformers(name, backend):
    model = load(FIXTURES / name, backend=backend).model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    cache = model.make_cache(batch=2, capacity=4)  # small on purpose: exercises growth
    prefill = model.forward(golden["prompt_ids"], cache)
    assert prefill.shape == golden["prefill_logits"].shape
    assert np.abs(prefill - golden["prefill_logits"]).max() <= TOLERANCE

    steps = golden["decode_ids"]
    decode = np.concatenate([model.forward(steps[:, i:i + 1], cache)
                             for i in range(steps.shape[1])], axis=1)
    assert np.abs(decode - golden["decode_logits"]).max() <= TOLERANCE
    assert (decode.argmax(-1) == golden["decode_logits"].argmax(-1)).all()
    # greedy from our own logits reproduces the reference's greedy continuation
    ours = np.concatenate([prefill[:, -1:], decode[:, :-1]], axis=1).argmax(-1)
    assert (ours == steps).all()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_batch_rows_equal_single_sequences(name):
    model = load(FIXTURES / name, backend="numpy").model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    both = model.forward(golden["prompt_ids"], model.make_cache(batch=2))
    for row in range(2):
        alone = model.forward(golden["prompt_ids"][row:row + 1], model.make_cache(batch=1))
        np.testing.assert_allclose(alone[0], both[row], atol=1e-5)


def test_last_only_equals_last_row_of_full_logits():
    model = load(FIXTURES / "qwen3", backend="numpy").model
    ids = load_file(str(FIXTURES / "qwen3" / "golden.safetensors"))["prompt_ids"]
    full = model.forward(ids, model.make_cache(batch=2))
    last = model.forward(ids, model.make_cache(batch=2), last_only=True)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_numpy_backend_is_selectable():
    from lattice_engine import ops
    assert get_ops("numpy") is ops
