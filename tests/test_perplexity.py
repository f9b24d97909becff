"""The sliding-window perplexity recipe."""

import math

import numpy as np
import pytest

from conftest import FIXTURES
from lattice_engine.errors import RequestError
from lattice_engine.eval.perplexity import perplexity, windows
from lattice_engine.loading import load
from lattice_engine.sampling import log_softmax


def test_windows_score_every_token_but_the_first_exactly_once():
    for n, window, stride in [(2000, 512, 256), (512, 512, 256), (700, 512, 256), (37, 8, 3)]:
        scored = []
        for w in windows(n, window, stride):
            assert w.end - w.begin <= window
            scored.extend(range(w.score_from, w.end))
        assert scored == list(range(1, n))


def test_bad_window_settings_are_rejected():
    with pytest.raises(RequestError, match="stride"):
        list(windows(100, 16, 32))


def test_single_window_equals_direct_computation():
    model = load(FIXTURES / "llama", backend="numpy").model
    ids = np.random.default_rng(0).integers(0, 256, 40)
    logits = model.forward(ids[None], model.make_cache())[0]
    nll = -np.mean(log_softmax(logits[:-1])[np.arange(39), ids[1:]])
    result = perplexity(model, ids, window=64, stride=32)
    assert result["scored"] == 39 and result["windows"] == 1
    assert result["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)


def test_sliding_windows_use_context_from_the_previous_window():
    model = load(FIXTURES / "llama", backend="numpy").model
    ids = np.random.default_rng(1).integers(0, 256, 50)
    result = perplexity(model, ids, window=20, stride=10)
    nll = 0.0
    for w in windows(50, 20, 10):
        logits = model.forward(ids[None, w.begin:w.end], model.make_cache())[0]
        for pos in range(w.score_from, w.end):
            nll -= log_softmax(logits[pos - w.begin - 1])[ids[pos]]
    assert result["scored"] == 49
    assert result["nll"] == pytest.approx(nll / 49, rel=1e-6)
