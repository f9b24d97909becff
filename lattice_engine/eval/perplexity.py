"""Perplexity by the fixed-length sliding-window recipe (README.md, "How it is measured").

Tokenize the whole text once without BOS; windows of `window` tokens start every `stride`
tokens; each window scores only the tokens the previous window did not (the first scores
all but its first token). This is transformers' documented recipe, so numbers are
comparable with any engine fed the same token ids.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import RequestError
from ..sampling import log_softmax


@dataclass(frozen=True)
class Window:
    begin: int        # first token of the window
    end: int          # one past its last token
    score_from: int   # first position (absolute) whose token this window scores


def windows(n_tokens: int, window: int, stride: int) -> Iterator[Window]:
    if window < 2 or not 1 <= stride <= window:
        raise RequestError(f"window={window}, stride={stride}: need window >= 2 and "
                           f"1 <= stride <= window")
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        yield Window(begin, end, max(prev_end, begin + 1))
        prev_end = end
        if end == n_tokens:
            break


def perplexity(model, token_ids: Sequence[int], *, window: int = 512, stride: int = 256,
               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Score token_ids with `model`; returns ppl, mean nll, counts and timing."""
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.size < 2:
        raise RequestError(f"perplexity needs at least 2 tokens, got {ids.size}")
    spans = list(windows(ids.size, window, stride))
    nll_sum, scored = 0.0, 0
    start = time.perf_counter()
    for i, w in enumerate(spans):
        cache = model.make_cache(batch=1, capacity=w.end - w.begin)
        hidden = model.hidden_states(ids[None, w.begin:w.end], cache)
        # position p's token is predicted by the hidden state at p - 1
        first = w.score_from - w.begin - 1
        logits = model.logits(hidden[:, first:w.end - w.begin - 1])[0]
        targets = ids[w.score_from:w.end]
        logp = log_softmax(logits)[np.arange(targets.size), targets]
        nll_sum -= float(logp.sum())
        scored += targets.size
        if progress:
            progress(i + 1, len(spans))
    nll = nll_sum / scored
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(ids.size), "scored": scored,
            "windows": len(spans), "window": window, "stride": stride,
            "seconds": round(time.perf_counter() - start, 3)}
