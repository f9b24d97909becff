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


def test_windows_longer_than_the_logit_rows_score_every_chunk(monkeypatch):
    from lattice_engine.eval import perplexity as ppl_module

    model = load(FIXTURES / "llama", backend="numpy").model
    ids = np.random.default_rng(2).integers(0, 256, 45)
    whole = perplexity(model, ids, window=30, stride=12)
    monkeypatch.setattr(ppl_module, "LOGIT_ROWS", 7)
    chunked = perplexity(model, ids, window=30, stride=12)
    assert chunked["scored"] == whole["scored"] == 44
    assert chunked["nll"] == pytest.approx(whole["nll"], rel=1e-6)


def test_target_logprobs_equal_log_softmax():
    from lattice_engine.eval.perplexity import target_logprobs

    logits = (np.random.default_rng(3).standard_normal((9, 1000)) * 8).astype(np.float32)
    targets = np.random.default_rng(4).integers(0, 1000, 9)
    want = log_softmax(logits)[np.arange(9), targets]
    np.testing.assert_allclose(target_logprobs(logits.copy(), targets), want, rtol=1e-6)


class WideVocabModel:
    """A stand-in with a 65,536-token vocabulary: a whole 512-token window of its logits
    is 134 MB of float32."""

    vocab_size = 1 << 16

    def __init__(self):
        self.head = np.random.default_rng(5).standard_normal((8, self.vocab_size),
                                                             dtype=np.float32)

    def make_cache(self, batch=1, capacity=0):
        return None

    def hidden_states(self, tokens, cache):
        return np.cos(tokens[..., None] * np.arange(1, 9, dtype=np.float32)).astype(np.float32)

    def logits(self, hidden):
        return hidden @ self.head


def test_perplexity_never_holds_a_whole_window_of_logits():
    from lattice_engine.testing.memory import traced_peak

    model = WideVocabModel()
    ids = np.random.default_rng(6).integers(0, model.vocab_size, 1024)
    result, peak = traced_peak(lambda: perplexity(model, ids, window=512, stride=256))
    window_logits = 511 * model.vocab_size * 4
    assert result["scored"] == 1023
    assert peak < window_logits / 3, f"traced peak {peak >> 20} MB"


def test_leading_tokens_equal_the_whole_texts_first_tokens():
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lattice_engine.eval.perplexity import leading_tokens

    text = (Path(__file__).resolve().parent.parent / "data" / "wikitext-2" /
            "wiki.test.raw").read_text(encoding="utf-8")[:60000]
    # a byte-level BPE with GPT-2's pre-tokenizer regex and 1,500 merges learnt on the text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=1800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    encode = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    whole = encode(text)
    for limit in (2, 500, 3000, len(whole) - 10):
        assert leading_tokens(encode, text, limit) == whole[:limit]
    assert leading_tokens(encode, text, None) == whole
    assert leading_tokens(encode, text, len(whole) + 100) == whole
