"""N-gram prompt lookup: draft the tokens that followed the most recent earlier occurrence
of the sequence's last n tokens (n from `prompt_lookup_max` down to `prompt_lookup_min`,
as vLLM's options of those names; llama.cpp's prompt lookup does the same). No weights:
it pays where the output repeats its input (edits of a given file, quoting summaries)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lattice_engine.errors import ConfigError
from lattice_engine.speculative import Draft

from .rejection import RejectionVerifier

OPTIONS = ("prompt_lookup_min", "prompt_lookup_max")
MAX_NGRAM = 64


def lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the last n tokens of
    `tokens` (int64 [L]), trying the longest n first; [] when nothing matches."""
    size = tokens.size
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        tail = tokens[size - n:]
        # candidate starts i (i + n < size, so something follows) whose first token matches
        starts = np.flatnonzero(tokens[:size - n] == tail[0])
        for i in starts[::-1]:  # latest first
            if np.array_equal(tokens[i:i + n], tail):
                follow = tokens[i + n:i + n + k]
                if follow.size:
                    return [int(t) for t in follow]
    return []


class NgramDrafter(RejectionVerifier):
    """Deterministic drafts (q one-hot), verified by rejection sampling."""

    def __init__(self, prompt_lookup_min: int = 2, prompt_lookup_max: int = 4):
        for name, value in (("prompt_lookup_min", prompt_lookup_min),
                            ("prompt_lookup_max", prompt_lookup_max)):
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not 1 <= value <= MAX_NGRAM:
                raise ConfigError(f"speculative.{name} = {value!r} is out of range: it must "
                                  f"be an integer in [1, {MAX_NGRAM}]")
        if prompt_lookup_min > prompt_lookup_max:
            raise ConfigError(f"speculative.prompt_lookup_min = {prompt_lookup_min} is above "
                              f"prompt_lookup_max = {prompt_lookup_max}; make min <= max")
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max

    @classmethod
    def build(cls, target, tokenizer, options: Mapping[str, Any]) -> "NgramDrafter":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"speculative option(s) {', '.join(unknown)} are not ngram "
                              f"options; ngram takes: {', '.join(OPTIONS)}")
        return cls(**dict(options))

    def propose(self, request, k: int) -> Draft:
        tokens = np.asarray(request.token_ids, dtype=np.int64)
        return Draft(lookup(tokens, k, self.n_min, self.n_max))
