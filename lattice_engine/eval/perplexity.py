"""Perplexity by the fixed-length sliding-window recipe (README.md, "How it is measured").

Tokenize the whole text once without BOS; windows of `window` tokens start every `stride`
tokens; each window scores only the tokens the previous window did not (the first scores
all but its first token). This is transformers' documented recipe, so numbers are
comparable with any engine fed the same token ids. Logits are computed and scored a few
rows at a time (`LOGIT_ROWS`), so memory does not grow with the window times the vocabulary.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import RequestError


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


def leading_tokens(encode: Callable[[str], list[int]], text: str,
                   limit: Optional[int] = None, margin: int = 64) -> list[int]:
    """The first `limit` token ids of `text` (every one when None), tokenizing only as much
    of the text as they need: a prefix that yields `margin` tokens more than asked. Tokens
    well before a cut do not depend on the text after it (pre-tokenization and merges are
    local), and the last few, which may, are dropped; a 32,768-token run over WikiText-2
    so holds one tenth of its encoding instead of all 309k tokens' (~160 MB)."""
    if limit is None:
        return encode(text)
    chars = max(8 * limit, 4096)
    while True:
        ids = encode(text[:chars])
        if chars >= len(text) or len(ids) >= limit + margin:
            return ids[:limit]
        chars *= 2


# positions whose logits exist at once: a window's logits are computed and scored this many
# rows at a time (64 x 151,936 float32 = 39 MB), never all 511 rows (310 MB) together
LOGIT_ROWS = 64


def target_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[i, targets[i]] per row, in float64, with one float32 temporary
    the size of `logits` instead of float64 copies of it: the max and the target logit are
    exact, the exponentials float32, their sum float64."""
    rows = np.arange(targets.size)
    target = logits[rows, targets].astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    shifted = np.subtract(logits, top, dtype=np.float32)
    np.exp(shifted, out=shifted)
    total = shifted.sum(axis=-1, dtype=np.float64)
    return target - top[:, 0].astype(np.float64) - np.log(total)


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
        del cache
        # position p's token is predicted by the hidden state at p - 1
        for a in range(w.score_from, w.end, LOGIT_ROWS):
            b = min(a + LOGIT_ROWS, w.end)
            logits = model.logits(hidden[:, a - w.begin - 1:b - w.begin - 1])[0]
            nll_sum -= float(target_logprobs(logits, ids[a:b]).sum())
        scored += w.end - w.score_from
        if progress:
            progress(i + 1, len(spans))
    nll = nll_sum / scored
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(ids.size), "scored": scored,
            "windows": len(spans), "window": window, "stride": stride,
            "seconds": round(time.perf_counter() - start, 3)}
