"""Rejection sampling that keeps the target's distribution (Leviathan et al. 2023, "Fast
Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating
Large Language Model Decoding with Speculative Sampling").

For drafts d_1..d_k drawn from q_1..q_k and target distributions p_0..p_k (p_i after the
first i drafts): draft d_{i+1} is kept with probability min(1, p_i(d) / q_{i+1}(d)); at the
first rejection the token is drawn from norm(max(0, p_i - q_{i+1})) and verification
stops; when every draft is kept a bonus token is drawn from p_k. Each emitted token is then
distributed exactly as p (the proof: P(emit x) = min(p, q)(x) + (1 - sum min(p, q)) *
max(0, p - q)(x) / sum max(0, p - q) = p(x), since sum max(0, p - q) = 1 - sum min(p, q)).

A deterministic drafter (n-gram lookup) has q one-hot at its token: the draft is kept with
probability p(d) and a rejection draws from p with d removed. A greedy request has p
one-hot at the processed argmax: drafts are kept while they equal it, and the token after
them is that argmax, exactly what plain greedy decoding would emit.
"""

from __future__ import annotations

import numpy as np


def rejection_sample(rows, draft, rng: np.random.Generator) -> list[int]:
    """Kept drafts plus one more token (see the module docstring). `rows` is a
    `lattice_engine.speculative.TargetRows` (or anything with `greedy`, `processed(i)` and
    `probs(i)`), `draft` a `Draft`, `rng` the request's generator."""
    out: list[int] = []
    for i, token in enumerate(draft.tokens):
        if rows.greedy:
            best = int(np.argmax(rows.processed(i)))
            out.append(best)
            if best != token:
                return out
            continue
        p = rows.probs(i)
        if draft.probs is None:  # q one-hot at token
            q_token = 1.0
        else:
            q = draft.probs[i]
            q_token = float(q[token])
        p_token = float(p[token])
        if q_token > 0 and (p_token >= q_token or rng.random() * q_token < p_token):
            out.append(token)
            continue
        out.append(_residual_sample(p, None if draft.probs is None else draft.probs[i],
                                    token, rng))
        return out
    k = len(draft.tokens)
    if rows.greedy:
        out.append(int(np.argmax(rows.processed(k))))
    else:
        p = rows.probs(k)
        out.append(int(rng.choice(p.size, p=p)))
    return out


def _residual_sample(p: np.ndarray, q, token: int, rng: np.random.Generator) -> int:
    """A draw from norm(max(0, p - q)); q None means one-hot at token."""
    if q is None:
        residual = p.copy()
        residual[token] = max(0.0, residual[token] - 1.0)
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if not total > 0:  # p <= q everywhere: p == q up to rounding, and rejection had
        residual, total = p, p.sum()  # probability ~0; p itself is the right law
    return int(rng.choice(residual.size, p=residual / total))


class RejectionVerifier:
    """The verify half of a drafter: rejection sampling against the target rows."""

    wants_hidden = False

    def verify(self, rows, draft, rng: np.random.Generator) -> list[int]:
        return rejection_sample(rows, draft, rng)

    def accepted(self, request, drafted: int, kept: int) -> None:
        """Nothing to roll back by default (a drafter with its own cache overrides)."""

    def release(self, request) -> None:
        request.state.clear()
