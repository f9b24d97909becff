"""A separate draft model: a smaller checkpoint with the target's tokenizer drafts k tokens
greedily (greedy requests) or by sampling from its own processed distribution q (sampled
requests; q travels with the draft so the rejection sampler stays exact).

Each request keeps the draft model's own KV cache in `DraftRequest.state`; before drafting,
the cache is cut back to the longest prefix it shares with the request's tokens (drafts the
target rejected are dropped there) and fed the tokens it has not seen.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from lattice_engine.cache.dense import KVCache
from lattice_engine.errors import ConfigError
from lattice_engine.speculative import Draft

from .rejection import RejectionVerifier

OPTIONS = ("model", "quant", "backend")
PREFILL_CHUNK = 512


def same_vocabulary(a, b) -> bool:
    """Whether two TextTokenizers map every token to the same id (and back)."""
    if a.vocab_size != b.vocab_size:
        return False
    inner_a, inner_b = getattr(a, "tokenizer", None), getattr(b, "tokenizer", None)
    if hasattr(inner_a, "get_vocab") and hasattr(inner_b, "get_vocab"):
        return inner_a.get_vocab(with_added_tokens=True) == \
            inner_b.get_vocab(with_added_tokens=True)
    return all(a.token_text(i) == b.token_text(i) for i in range(a.vocab_size))


class DraftModelDrafter(RejectionVerifier):
    def __init__(self, draft_model, name: str = "draft model"):
        self.model = draft_model
        self.name = name

    @classmethod
    def build(cls, target, tokenizer, options: Mapping[str, Any]) -> "DraftModelDrafter":
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"speculative option(s) {', '.join(unknown)} are not draft_model "
                              f"options; draft_model takes: {', '.join(OPTIONS)}")
        if not isinstance(options.get("model"), str) or not options["model"]:
            raise ConfigError("speculative method \"draft_model\" needs speculative.model = "
                              "the draft checkpoint (a path or catalog name) sharing the "
                              "target's tokenizer")
        from lattice_engine.loading import load
        from lattice_engine.quant.methods import QuantSpec
        loaded = load(options["model"], quant=QuantSpec(options.get("quant")),
                      backend=options.get("backend", "auto"))
        return cls.for_model(target, tokenizer, loaded.model, loaded.tokenizer,
                             options["model"])

    @classmethod
    def for_model(cls, target, tokenizer, draft_model, draft_tokenizer,
                  name: str = "draft model") -> "DraftModelDrafter":
        """Check the pair and build the drafter (tests build it from loaded models)."""
        tv, dv = target.config.vocab_size, draft_model.config.vocab_size
        if tokenizer is None or draft_tokenizer is None:
            raise ConfigError(f"draft model {name!r}: both the target and the draft need a "
                              f"tokenizer, so that their token ids can be checked to agree")
        if not same_vocabulary(tokenizer, draft_tokenizer):
            raise ConfigError(f"draft model {name!r} has another tokenizer than the target "
                              f"({draft_tokenizer.vocab_size} vs {tokenizer.vocab_size} "
                              f"tokens, or different ids): its drafts would be other tokens; "
                              f"pick a draft model of the target's family (same tokenizer)")
        if tv != dv:
            raise ConfigError(f"draft model {name!r} has vocab_size {dv} but the target "
                              f"{tv}: their logits rows must have one length; pick a draft "
                              f"of the same family and vocabulary size")
        if type(draft_model.make_cache(batch=1, capacity=1)) is not KVCache:
            raise ConfigError(f"draft model {name!r} ({type(draft_model).__name__}) keeps "
                              f"recurrent state, which cannot be cut back after a rejected "
                              f"draft; use an attention-only draft model (llama / qwen2 "
                              f"family)")
        return cls(draft_model, name)

    def propose(self, request, k: int) -> Draft:
        st = request.state
        cache = st.get("cache")
        if cache is None:
            cache = st["cache"] = self.model.make_cache(batch=1)
            st["ids"] = []
        if not request.greedy and "sampler" not in st:
            from lattice_engine.sampling import make_sampler
            st["sampler"] = make_sampler(replace(request.params, seed=None, sampler=None))
        tokens = request.token_ids
        seen = st["ids"]
        common = 0
        limit = min(len(seen), len(tokens) - 1)  # the last token is always fed: its logits
        while common < limit and seen[common] == tokens[common]:
            common += 1
        cache.truncate(common)
        ids = np.asarray(tokens[common:], dtype=np.int64)[None, :]
        for start in range(0, ids.shape[1], PREFILL_CHUNK):
            logits = self.model.forward(ids[:, start:start + PREFILL_CHUNK], cache,
                                        last_only=True)
        history = list(tokens)
        drafts, probs = [], []
        for i in range(k):
            row = logits[0, -1]
            if request.greedy:
                token = int(np.argmax(row))
            else:
                sampler = st["sampler"]
                q = sampler.probabilities(sampler.process(history, row))
                token = int(request.rng.choice(q.size, p=q))
                probs.append(q)
            drafts.append(token)
            history.append(token)
            if i + 1 < k:
                logits = self.model.forward(np.array([[token]], dtype=np.int64), cache,
                                            last_only=True)
        st["ids"] = history[:-1] if drafts else list(tokens)
        return Draft(drafts, np.stack(probs) if probs else None)
