"""Prompt lookup: which tokens the n-gram drafter proposes, and its option checks."""

from __future__ import annotations

import numpy as np
import pytest

from lattice_engine.errors import ConfigError
from lattice_spec_decode import NgramDrafter
from lattice_spec_decode.ngram import lookup


def test_lookup_takes_the_latest_longest_match():
    toks = np.array([1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 7, 1, 2, 3])
    assert lookup(toks, 3, 1, 3) == [5, 6, 7]   # latest match of (1, 2, 3)
    assert lookup(toks, 2, 1, 3) == [5, 6]
    assert lookup(np.array([8, 1, 2, 7, 1, 2]), 4, 2, 2) == [7, 1, 2]
    assert lookup(np.array([1, 2, 3]), 4, 1, 3) == []
    # the longest n wins: (7, 2, 3) matched at 0 gives 8, though (2, 3) recurs later (-> 4)
    assert lookup(np.array([7, 2, 3, 8, 9, 2, 3, 4, 7, 2, 3]), 1, 2, 3) == [8]


def test_lookup_at_the_end_of_a_repeat_proposes_what_follows():
    toks = np.array([5, 6, 5, 6, 5, 6])
    assert lookup(toks, 3, 2, 2) == [5, 6]  # the match at 2 is followed by 2 tokens


@pytest.mark.parametrize("options, message", [
    ({"prompt_lookup_min": 0}, r"prompt_lookup_min = 0 is out of range"),
    ({"prompt_lookup_max": 100}, r"prompt_lookup_max = 100 is out of range"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 3}, r"min <= max"),
    ({"promt_lookup_max": 3}, r"promt_lookup_max are not ngram options; ngram takes"),
])
def test_bad_options_name_the_value_and_the_choices(options, message):
    with pytest.raises(ConfigError, match=message):
        NgramDrafter.build(None, None, options)
