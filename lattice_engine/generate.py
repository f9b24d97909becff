"""Token generation for one sequence: a step generator and a text streamer on top of it.

`generate_step` yields token ids (prefill once, then one decode step per token);
`stream_generate` detokenizes incrementally, applies stop strings and stop tokens, and
yields `GenerationChunk`s whose `text` pieces concatenate to the final output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import RequestError
from .sampling import Sampler, SamplingParams, make_sampler
from .text_stream import TextStream

PREFILL_CHUNK = 512  # bounds the activation memory of very long prompts


@dataclass
class GenerationChunk:
    """One streamed piece. `finish_reason` is set on the last chunk: "stop" or "length"."""

    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: Optional[str] = None


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    logprobs: list[float] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        n = len(self.tokens) - 1  # the first token comes from the prefill
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token] without materialising the whole distribution (the native
    log-sum-exp when the kernels are built: ~1 ms -> ~0.05 ms over a 150k vocabulary, which
    a batched decode step pays once per sequence)."""
    if logits.dtype == np.float32 and logits.ndim == 1 and _native_kernels() is not None:
        return float(logits[token]) - float(_native_kernels().log_sum_exp(logits))
    peak = float(logits.max())
    return float(logits[token]) - peak - float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))


def _native_kernels():
    """lattice_engine.kernels when it is built, else None (checked once)."""
    global _KERNELS
    if _KERNELS is False:
        try:
            from . import kernels
            _KERNELS = kernels if kernels.available() else None
        except ImportError:
            _KERNELS = None
    return _KERNELS


_KERNELS = False


def generate_step(model, prompt_ids: Sequence[int], sampler: Sampler, *,
                  max_tokens: int, cache=None, grammar=None,
                  inputs=None, speculation=None) -> Iterator[tuple[int, float]]:
    """Yield (token, logprob) for up to max_tokens new tokens after prompt_ids.

    The caller stops early by closing the generator. The cache (a fresh one by default)
    holds prompt and generated tokens when the generator ends (the last one excepted:
    it is computed when the next token is asked for). `grammar` (a
    `lattice_engine.grammar.GrammarMatcher`) masks each step's logits before sampling and
    accepts the sampled token; logprobs stay those of the unmasked model distribution.
    `inputs` (a `multimodal.MultimodalPrompt` whose inputs are encoded, prompt_ids its
    tokens) gives each forward its rotary positions and image embeddings.
    `speculation` (a `speculative.Speculation`) drafts tokens and verifies them k + 1 at a
    time; the tokens are distributed as without it (identical for greedy sampling).
    """
    if len(prompt_ids) == 0:
        raise RequestError("the prompt is empty; give at least one token")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and len(prompt_ids) >= limit:
        raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the model's context "
                           f"is {limit}; shorten the prompt")
    cache = cache if cache is not None else model.make_cache(batch=1)
    history = list(prompt_ids)
    ids = np.asarray(prompt_ids, dtype=np.int64)[None, :]

    def extra(start: int, end: int) -> dict:
        return {} if inputs is None else {"inputs": inputs.inputs_for(start, end)}

    spec = speculation.begin(model, history, sampler, grammar, inputs=inputs) \
        if speculation is not None else None
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        end = min(start + PREFILL_CHUNK, ids.shape[1])
        chunk = ids[:, start:end]
        if spec is not None and end >= ids.shape[1]:
            logits = spec.forward_last(cache, chunk)  # hands the drafter hidden states
        else:
            logits = model.forward(chunk, cache, last_only=True, **extra(start, end))
    generated = 0
    try:
        while generated < max_tokens:
            if spec is not None and generated:
                k = min(max_tokens - generated, (limit or 1 << 62) - len(history)) - 1
                out = spec.step(cache, k) if k > 0 else None
                if out is not None:
                    for token, logprob in out:
                        yield token, logprob
                        history.append(token)
                        generated += 1
                    if limit and len(history) >= limit:
                        return
                    continue
            if generated and spec is not None:  # speculating: computed only when needed
                logits = spec.decode(cache, history[-1])
            row = logits[0, -1]
            if grammar is None:
                token = sampler(history, row, len(prompt_ids))
            else:
                allowed = row.copy()
                grammar.apply(allowed)
                token = sampler(history, allowed, len(prompt_ids))
                grammar.accept(token)
            yield token, token_logprob(row, token)
            history.append(token)
            generated += 1
            if limit and len(history) >= limit:
                return
            if spec is None:
                n = len(history) - 1
                logits = model.forward(np.array([[token]], dtype=np.int64), cache,
                                       last_only=True, **extra(n, n + 1))
    finally:
        if spec is not None:
            spec.close()


def stream_generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                    registry=None, *, grammar=None, inputs=None,
                    speculation=None) -> Iterator[GenerationChunk]:
    """Stream text for prompt_ids, honouring stop strings, stop tokens and max_tokens (the
    text rules are `text_stream.TextStream`'s, shared with continuous batching).

    With `grammar` (a fresh `GrammarMatcher`), every token follows it and generation stops
    ("stop") when the matcher terminates.
    """
    sampler = make_sampler(params, registry)
    stop_ids = set(params.stop_token_ids) | set(tokenizer.eos_token_ids)
    if grammar is not None:
        stop_ids |= set(grammar.stop_token_ids)
    text = TextStream(tokenizer, params.stop, stop_ids)
    new_tokens: list[int] = []    # sampled since the last chunk
    new_logprobs: list[float] = []
    finish = "length"
    steps = generate_step(model, prompt_ids, sampler, max_tokens=params.max_tokens,
                          grammar=grammar, inputs=inputs, speculation=speculation)
    try:
        for token, logprob in steps:
            if text.is_stop_token(token):
                finish = "stop"
                break
            new_tokens.append(token)
            new_logprobs.append(logprob)
            out, stopped = text.push(token)
            # a matcher without stop tokens ends on the token that completes the grammar
            if grammar is not None and grammar.is_terminated():
                finish = "stop"
                if out:
                    yield GenerationChunk(out, new_tokens, new_logprobs)
                    new_tokens, new_logprobs = [], []
                break
            if stopped:
                finish = "stop"
            if out or stopped:
                yield GenerationChunk(out, new_tokens, new_logprobs)
                new_tokens, new_logprobs = [], []
            if stopped:
                break
    finally:
        steps.close()
    rest, stopped = text.finish()  # text held back as a possible stop-string prefix
    yield GenerationChunk(rest, new_tokens, new_logprobs, "stop" if stopped else finish)


def generate(model, tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
             registry=None, *, grammar=None, inputs=None,
             speculation=None) -> GenerationResult:
    """Run `stream_generate` to the end and collect text, tokens and timings."""
    start = time.perf_counter()
    first = None
    text, tokens, logprobs = [], [], []
    finish = "length"
    for chunk in stream_generate(model, tokenizer, prompt_ids, params, registry,
                                 grammar=grammar, inputs=inputs,
                                 speculation=speculation):
        if first is None:
            first = time.perf_counter()
        text.append(chunk.text)
        tokens.extend(chunk.tokens)
        logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            finish = chunk.finish_reason
    end = time.perf_counter()
    first = first or end
    return GenerationResult("".join(text), tokens, finish, len(prompt_ids), first - start,
                            end - first, logprobs)
