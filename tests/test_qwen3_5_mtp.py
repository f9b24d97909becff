"""Qwen3.5's MTP head against an independent float32 torch reference written from vLLM's
structure (scripts/make_qwen3_5_mtp_fixture.py, fixture qwen3_5_vl/mtp_reference), on both
op sets; rows split over calls and a rollback (drop_from) give the same logits."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, backends
from lattice_engine.errors import CheckpointError
from lattice_engine.loading import load
from lattice_engine.quant.methods import QuantSpec

TOL = 1e-4  # the bound; the float32 error model gives ~1e-6 at these magnitudes


@pytest.fixture(scope="module")
def reference():
    return load_file(str(FIXTURES / "qwen3_5_vl" / "mtp_reference.safetensors"))


@pytest.mark.parametrize("backend", backends())
def test_mtp_logits_match_the_torch_reference(reference, backend):
    model = load(str(FIXTURES / "qwen3_5_vl"), backend=backend).model
    head = model.mtp_head()
    ref = reference
    cache = head.make_cache()
    states = head.hidden(ref["next_ids"], ref["hidden"], ref["positions"], cache)
    logits = head.logits(states)
    assert np.abs(logits - ref["logits"]).max() <= TOL
    # chained: greedy token, the head's own output state as h, the next position
    last, pos = states[-1:], int(ref["positions"][-1])
    for i, want in enumerate(ref["chain_logits"]):
        tok = int(np.argmax(head.logits(last)[0]))
        assert tok == int(ref["chain_ids"][i])
        pos += 1
        last = head.hidden([tok], last, [pos], cache, chained=True)
        assert np.abs(head.logits(last)[0] - want).max() <= TOL
    # the same rows in two calls, after a chain rolled back: same logits
    cache.drop_from(int(ref["positions"][3]))
    assert cache.rows == 3
    again = head.hidden(ref["next_ids"][3:], ref["hidden"][3:], ref["positions"][3:], cache)
    assert np.abs(head.logits(again) - ref["logits"][3:]).max() <= TOL
    with pytest.raises(ValueError, match="drop_from"):
        head.hidden(ref["next_ids"][:1], ref["hidden"][:1], ref["positions"][:1], cache)


def test_mtp_under_q8_0_stays_close(reference):
    """q8_0 weights: the head runs on the quantized matrices (the bench's format)."""
    model = load(str(FIXTURES / "qwen3_5_vl"), quant=QuantSpec("q8_0")).model
    head = model.mtp_head()
    logits = head.logits(head.hidden(reference["next_ids"], reference["hidden"],
                                     reference["positions"], head.make_cache()))
    scale = np.abs(reference["logits"]).max()
    assert np.abs(logits - reference["logits"]).max() <= 0.05 * scale


def test_a_checkpoint_without_mtp_weights_is_a_clear_error():
    model = load(str(FIXTURES / "qwen3_5_text")).model
    with pytest.raises(CheckpointError, match="no MTP head"):
        model.mtp_head()
