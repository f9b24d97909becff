"""A separate draft model: a smaller checkpoint with the target's tokenizer drafts k tokens
greedily (greedy requests) or by sampling from its own processed distribution q (sampled
requests; q travels with the draft so the rejection sampler stays exact).

One request at a time (`propose`, the single-request path) each request keeps a dense KV
cache of the draft model in `DraftRequest.state`. Under continuous batching
(`propose_batch`) the draft model has its own paged KV pool (`kv_cache_tokens`, default
8192) and drafts for every speculating sequence of the step in one batched forward per
draft position, as the target decodes. Either way, before drafting a request's draft cache
is cut back to the longest prefix it shares with the request's tokens (drafts the target
rejected are dropped there) and fed the tokens it has not seen. On the native backend every
one of those forwards after the prompt is one fused C call of the draft model: the catch-up
(the last kept draft and the target's token) through the multi-row step, each further
draft through the one-row decode step. A request the pool has no
room for drafts nothing that step (it decodes plainly).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from lattice_engine.cache.dense import KVCache
from lattice_engine.cache.paged import SequenceBlocks
from lattice_engine.contract import is_servable
from lattice_engine.models.paged_forward import PagedBatch
from lattice_engine.errors import ConfigError
from lattice_engine.speculative import Draft

from .rejection import RejectionVerifier

OPTIONS = ("model", "quant", "backend", "kv_cache_tokens")
BLOCK_SIZE = 16
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


def weight_bytes_ratio(draft_model, target) -> float:
    """The weight bytes one decoded token reads in the draft model over the target's: what
    a draft token costs against a target step while both are memory-bound (an estimate on
    the low side: the draft's per-call overhead is left out; 0 when either is unknown)."""
    from lattice_engine.models.moe import decode_weight_bytes
    try:
        target_bytes = decode_weight_bytes(target)
        return decode_weight_bytes(draft_model) / target_bytes if target_bytes else 0.0
    except (AttributeError, TypeError):  # a model without `layers`: no estimate
        return 0.0


class DraftModelDrafter(RejectionVerifier):
    def __init__(self, draft_model, name: str = "draft model", kv_cache_tokens: int = 8192,
                 relative_cost: float = 0.0):
        self.model = draft_model
        self.name = name
        self.kv_cache_tokens = kv_cache_tokens
        self.relative_cost = relative_cost  # (contract.Drafter) a draft token / a target step
        self._pool = None  # the draft model's paged KV pool (continuous batching), lazily

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
        tokens = options.get("kv_cache_tokens", 8192)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not \
                BLOCK_SIZE <= tokens <= 1 << 22:
            raise ConfigError(f"speculative.kv_cache_tokens = {tokens!r} is out of range: it "
                              f"must be an integer in [{BLOCK_SIZE}, {1 << 22}] (the draft "
                              f"model's KV pool under continuous batching)")
        from lattice_engine.loading import load
        from lattice_engine.quant.methods import QuantSpec
        loaded = load(options["model"], quant=QuantSpec(options.get("quant")),
                      backend=options.get("backend", "auto"))
        drafter = cls.for_model(target, tokenizer, loaded.model, loaded.tokenizer,
                                options["model"])
        drafter.kv_cache_tokens = tokens
        return drafter

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
        if type(draft_model.make_cache(batch=1, capacity=1)) is not KVCache or \
                not is_servable(draft_model):
            raise ConfigError(f"draft model {name!r} ({type(draft_model).__name__}) keeps "
                              f"recurrent state, which cannot be cut back after a rejected "
                              f"draft; use an attention-only draft model (llama / qwen2 "
                              f"family)")
        return cls(draft_model, name, relative_cost=weight_bytes_ratio(draft_model, target))

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

    # ---- continuous batching: one batched draft forward per position ---------------------
    def _pool_cache(self):
        if self._pool is None:
            blocks = -(-self.kv_cache_tokens // BLOCK_SIZE)
            self._pool = self.model.make_paged_cache(blocks, BLOCK_SIZE, f"draft:{id(self)}")
        return self._pool

    def _pick(self, request, row, history, probs: list) -> int:
        if request.greedy:
            return int(np.argmax(row))
        st = request.state
        if "sampler" not in st:
            from lattice_engine.sampling import make_sampler
            st["sampler"] = make_sampler(replace(request.params, seed=None, sampler=None))
        q = st["sampler"].probabilities(st["sampler"].process(history, row))
        probs.append(q)
        return int(request.rng.choice(q.size, p=q))

    def propose_batch(self, requests, ks) -> list[Draft]:
        """Drafts for several requests at once: their unseen tokens in one batched forward
        of the draft model, then one batched forward per further draft position."""
        cache = self._pool_cache()
        live = []  # [request, k, blocks, position of the next row, history, drafts, probs]
        out = {id(r): Draft([]) for r in requests}
        for req, k in zip(requests, ks):
            st = req.state
            blocks = st.setdefault("blocks", SequenceBlocks())
            seen = st.setdefault("pool_ids", [])
            tokens = req.token_ids
            common = 0
            limit = min(len(seen), len(tokens) - 1)
            while common < limit and seen[common] == tokens[common]:
                common += 1
            del seen[common:]
            cache.trim(blocks, common)
            if k <= 0 or not cache.reserve(blocks, len(tokens) + k - 1):
                continue  # no room in the draft pool: this request decodes plainly now
            live.append([req, k, blocks, common, list(tokens), [], []])
        rows = [(blocks, hist[pos:], pos, 1) for _, _, blocks, pos, hist, _, _ in live]
        while live:
            logits = self.model.forward_paged(PagedBatch.build(cache, rows), cache)
            rows, still = [], []
            for entry, row in zip(live, logits):
                req, k, blocks, pos, hist, drafts, probs = entry
                pos = len(hist)  # every token of hist is in the pool now
                token = self._pick(req, row, hist, probs)
                drafts.append(token)
                hist.append(token)
                if len(drafts) < k:
                    entry[3] = pos
                    rows.append((blocks, [token], pos, 1))
                    still.append(entry)
                else:
                    req.state["pool_ids"] = hist[:-1]
                    out[id(req)] = Draft(drafts, np.stack(probs) if probs else None)
            live = still
        return [out[id(r)] for r in requests]

    def release(self, request) -> None:
        blocks = request.state.get("blocks")
        if blocks is not None and self._pool is not None:
            self._pool.free(blocks)
        request.state.clear()
