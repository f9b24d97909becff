"""Logits processors and samplers, against hand-computed expectations."""

import numpy as np
import pytest

from lattice_engine.errors import RequestError
from lattice_engine.plugins import PluginManager
from lattice_engine.sampling import (SamplingParams, make_sampler, min_p, repetition_penalty,
                                     top_k, top_p)

REGISTRY = PluginManager(allowlist=[]).registry
LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.1], np.float32))


def kept(processor, logits=LOGITS):
    return np.flatnonzero(np.isfinite(processor([], logits.copy()))).tolist()


def test_top_k_keeps_k_largest():
    assert kept(top_k(2)) == [0, 1]
    assert top_k(0) is None


def test_top_p_keeps_smallest_set_reaching_p():
    assert kept(top_p(0.5)) == [0]
    assert kept(top_p(0.7)) == [0, 1]
    assert kept(top_p(0.76)) == [0, 1, 2]
    assert top_p(1.0) is None


def test_min_p_drops_tokens_below_fraction_of_top():
    assert kept(min_p(0.3)) == [0, 1]  # 0.15 < 0.3 * 0.5
    assert kept(min_p(0.2)) == [0, 1, 2]


def test_repetition_penalty_is_ctrl_style():
    out = repetition_penalty(2.0)([1, 3, 3], np.array([1.0, 4.0, -1.0, -2.0], np.float32))
    np.testing.assert_allclose(out, [1.0, 2.0, -1.0, -4.0])


def test_greedy_at_temperature_zero():
    sampler = make_sampler(SamplingParams(temperature=0), REGISTRY)
    assert sampler([], np.array([0.1, 3.0, 2.0], np.float32)) == 1


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)

    def draw(seed):
        sampler = make_sampler(SamplingParams(temperature=1.0, seed=seed), REGISTRY)
        return [sampler([], logits) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_sampling_follows_the_distribution():
    sampler = make_sampler(SamplingParams(temperature=1.0, seed=0), REGISTRY)
    counts = np.bincount([sampler([], LOGITS) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)


def test_truncation_then_sampling_never_picks_a_removed_token():
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=2, seed=1), REGISTRY)
    assert {sampler([], LOGITS) for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_k", -2), ("top_p", 0.0),
                                         ("min_p", 1.0), ("repetition_penalty", 0.0),
                                         ("max_tokens", 0)])
def test_out_of_range_params_are_rejected(field, value):
    with pytest.raises(RequestError, match=f"{field}="):
        SamplingParams(**{field: value})


def test_unknown_processor_and_sampler_names_list_choices():
    with pytest.raises(RequestError, match="unknown logits processor"):
        make_sampler(SamplingParams(processors={"nope": 1}), REGISTRY)
    with pytest.raises(RequestError, match="unknown sampler 'nope'; registered: greedy"):
        make_sampler(SamplingParams(sampler="nope"), REGISTRY)


def openai_reference(logits, generated, bias, presence, frequency):
    """OpenAI's documented formula, one token at a time in float64:
    mu[j] - c[j] * frequency - (c[j] > 0) * presence, plus logit_bias[j]."""
    out = logits.astype(np.float64).copy()
    for j in range(out.size):
        c = list(generated).count(j)
        out[j] += bias.get(j, 0.0) - c * frequency - (1.0 if c > 0 else 0.0) * presence
    return out


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (0.7, 0.0), (0.0, -1.3),
                                                (1.5, 2.0), (-2.0, 0.4)])
def test_penalties_and_logit_bias_follow_openais_formula(presence, frequency):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=50).astype(np.float32) * 4
    prompt = [1, 2, 3, 3, 7]            # the prompt does not count
    generated = [3, 9, 9, 9, 12, 40, 3]
    bias = {0: -100.0, 9: 2.5, 49: 100.0, 12: -0.25}
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency,
                            logit_bias=bias)
    sampler = make_sampler(params, REGISTRY)
    token = sampler(prompt + generated, logits, len(prompt))
    want = openai_reference(logits, generated, bias, presence, frequency)
    # float32 arithmetic on values up to ~110: a few ulps of 128
    np.testing.assert_allclose(sampler.processed, want, rtol=0, atol=4 * 2.0 ** -17)
    assert token == int(np.argmax(want))


def test_logit_bias_and_penalty_ranges_are_checked():
    for kwargs, words in [(dict(logit_bias={3: 100.5}), "logit_bias[3] = 100.5"),
                          (dict(logit_bias={-1: 1.0}), "logit_bias: key -1"),
                          (dict(presence_penalty=2.5), "presence_penalty=2.5"),
                          (dict(frequency_penalty=float("nan")), "frequency_penalty=nan"),
                          (dict(logprobs=21), "logprobs=21"),
                          (dict(max_tokens=0), "max_tokens=0")]:
        with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
            SamplingParams(**kwargs)
    SamplingParams(max_tokens=0, prompt_logprobs=0)  # scoring a prompt: no new tokens
    sampler = make_sampler(SamplingParams(logit_bias={60: 1.0}), REGISTRY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        sampler([], np.zeros(50, np.float32))


@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0, logit_bias={3: 1.0}),
                                    dict(temperature=0.7, seed=1)],
                         ids=["greedy", "greedy-with-bias", "categorical"])
def test_broken_logits_are_the_checkpoints_fault_and_masks_the_requests(params):
    """NaN or +inf anywhere in a row is a CheckpointError (counted), a row with every token
    masked a RequestError, on the plain greedy path (one argmax pass, no copy) as on the
    others; a good row is left as it was and greedy picks its argmax."""
    from lattice_engine.errors import CheckpointError
    sampler = make_sampler(SamplingParams(**params), REGISTRY)
    rng = np.random.default_rng(0)
    for bad, count in ((np.nan, 2), (np.inf, 2)):
        row = rng.standard_normal(50).astype(np.float32)
        row[[7, 40]] = bad
        with pytest.raises(CheckpointError, match=f"produced {count} NaN or infinite"):
            sampler([1, 2], row)
    with pytest.raises(RequestError, match="no token is left"):
        sampler([1, 2], np.full(50, -np.inf, np.float32))
    row = rng.standard_normal(50).astype(np.float32)
    row[11] = 9.0
    kept = row.copy()
    token = sampler([1, 2], row)
    np.testing.assert_array_equal(row, kept)
    if params.get("temperature") == 0:
        assert token == (3 if params.get("logit_bias") and kept[3] + 1.0 > 9.0 else 11)
