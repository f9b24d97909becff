"""`BatchRunner`: continuous batching over a paged KV cache for one model.

`add_request` queues a sequence, `step` runs one scheduler step (one batched forward) and
returns what each affected request produced, `abort` drops a request and frees its blocks.
Text is detokenized incrementally per request with the same stop handling as
`generate.stream_generate` (stop tokens, stop strings held back until decided, max_tokens).

Each request samples with its own `Sampler` (its own seeded RNG) from its own logits row,
so its tokens do not depend on which other requests share the step; with the native
kernels its logits have the same bits too (every matmul path sums a row in one order, and
attention reads only the row's own sequence; see tests/test_batching.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence as Seq

import numpy as np

from .errors import ConfigError, LatticeError, RequestError
from .generate import token_logprob
from .text_stream import TextStream
from .models.paged_forward import PagedBatch
from .multimodal import EncodedCache, EncodeJob
from .prefill_pacer import PrefillPacer
from .sampling import SamplingParams, make_sampler
from .scheduler import LogitsMask, Scheduler, Sequence, Status
from .spec_batching import ProbeSchedule, SpeculativeSteps, Speculating
from .speculative import DraftLength, can_speculate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingOptions:
    """KV pool size and per-step budgets (the [server] config section sets them)."""

    kv_cache_tokens: int = 16384  # pool size in tokens (rounded up to whole blocks)
    block_size: int = 16
    max_running: int = 16         # sequences decoding at once
    step_tokens: int = 512        # tokens per forward when nothing decodes
    interleave_tokens: int = 64   # at most this many prefill tokens per forward while
                                  # others decode ...
    max_itl_rise: float = 2.0     # ... and fewer if a step would take longer than this
                                  # many decode-only steps (measured); 0 turns that off
    prefill_step_seconds: float = 0.5  # a step with no decoders prefills as many tokens
                                  # as take about this long (measured), so a request that
                                  # arrives meanwhile is admitted soon; 0: step_tokens

    def __post_init__(self):
        for name in ("kv_cache_tokens", "block_size", "max_running", "step_tokens",
                     "interleave_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"{name}={value!r} is out of range: it must be an integer >= 1")
        if not (self.max_itl_rise == 0 or self.max_itl_rise > 1):
            raise RequestError(f"max_itl_rise={self.max_itl_rise!r} is out of range: it must "
                               f"be 0 (off) or > 1")
        if not (isinstance(self.prefill_step_seconds, (int, float)) and
                0 <= self.prefill_step_seconds <= 60):
            raise RequestError(f"prefill_step_seconds={self.prefill_step_seconds!r} is out of "
                               f"range: it must be 0 (off) or seconds up to 60")


@dataclass
class RequestOutput:
    """What one request produced in one step: the new text (pieces concatenate to the
    final output) and tokens; finish_reason on the last one ("stop", "length", "abort", or
    "error" with `error` saying why: one request's failure ends only that request)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Optional[str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # finish_reason "error": what went wrong, safe to show the client, and its OpenAI type
    # ("invalid_request_error" for the request's own options, "server_error" for a bug)
    error: Optional[str] = None
    error_type: Optional[str] = None
    # SamplingParams.logprobs: per token in token_ids, its most likely alternatives as
    # (token id, logprob), most likely first (empty lists when not asked for)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: once, in the first output after the prompt is
    # computed: per prompt token (logprob, alternatives), None for the first token
    prompt_logprobs: Optional[list] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Histogram:
    """Cumulative Prometheus-style histogram (seconds)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.BUCKETS) and value > self.BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1


@dataclass
class BatchStats:
    requests_added: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0          # prompt tokens of admitted requests
    tokens_computed: int = 0        # tokens run through the model (prefill + decode)
    generated_tokens: int = 0
    steps: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)


@dataclass
class _Output:
    """Per-request output state: its text (`TextStream`, shared with `generate`) and the
    tokens sampled since the last output."""

    text: TextStream
    new_tokens: list[int] = field(default_factory=list)
    new_logprobs: list[float] = field(default_factory=list)
    new_top: list[list[tuple[int, float]]] = field(default_factory=list)
    # prompt_logprobs: an entry per prompt token, filled as the prompt's rows are computed;
    # handed out once, then None
    prompt: Optional[list] = None
    prompt_left: int = 0


def logprobs_of(row: np.ndarray, token: int, top: int,
                exact: bool = False) -> tuple[float, list[tuple[int, float]]]:
    """log softmax(row)[token] and the `top` most likely tokens with theirs (most likely
    first; tokens at -inf, masked out, are left off). `exact`: a float64 log-sum-exp, for
    values a client reads (within ~1e-12 of the row's true log-softmax); otherwise the
    native float32 one (~1e-5 over a 50k vocabulary, enough for the counters)."""
    if exact:
        row = row.astype(np.float64)
    logprob = token_logprob(row, token)
    if not top:
        return logprob, []
    lse = float(row[token]) - logprob
    best = np.argpartition(-row, top - 1)[:top] if top < row.size else np.arange(row.size)
    best = best[np.argsort(-row[best], kind="stable")]
    return logprob, [(int(t), float(row[t]) - lse) for t in best if np.isfinite(row[t])]


# make_sequence's speculation argument when the request did not choose: the runner's own
DEFAULT_SPECULATION = object()


class BatchRunner(SpeculativeSteps):
    def __init__(self, model, tokenizer, registry=None,
                 options: BatchingOptions = BatchingOptions(), variant: str = "",
                 speculation=None):
        self.model = model
        # speculative decoding (a `speculative.Speculation`): the default of every request
        self.speculation = speculation
        # every Speculation a request of this runner used (their counters feed /metrics)
        self.speculations: dict[int, object] = {}
        self.spec_probes = ProbeSchedule()  # drafting anyway after refused steps
        if speculation is not None:
            self._check_speculation(speculation)
            self.speculations[id(speculation)] = speculation
        self.tokenizer = tokenizer
        self.registry = registry
        self.options = options
        blocks = -(-options.kv_cache_tokens // options.block_size)
        self.cache = model.make_paged_cache(blocks, options.block_size, variant,
                                            max_sequences=options.max_running)
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.scheduler = Scheduler(self.cache, max_running=options.max_running,
                                   step_tokens=options.step_tokens,
                                   interleave_tokens=options.interleave_tokens,
                                   max_model_len=self.max_model_len)
        self.stats = BatchStats()
        # sequences whose images are still being encoded (one unit per step while others
        # decode); they join the scheduler's queue when every image they need is encoded
        self.encoding: deque[Sequence] = deque()
        self.encoded = EncodedCache()  # the engine shares its own (see Engine.start_batching)
        self.pacer = PrefillPacer(options.max_itl_rise, options.interleave_tokens,
                                  options.prefill_step_seconds, options.step_tokens)
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, *,
                    request_id: Optional[str] = None,
                    logits_mask: Optional[LogitsMask] = None, images=None,
                    encoder=None) -> str:
        """Queue a request; returns its id. Raises RequestError for an empty or too long
        prompt or bad sampling options, before anything is queued. `images`: the
        `multimodal.MultimodalPrompt` behind prompt_ids, encoded by `encoder` (a
        `LoadedInputEncoder`) as the steps go."""
        seq = self.make_sequence(prompt_ids, params, request_id=request_id,
                                 logits_mask=logits_mask, images=images, encoder=encoder)
        self.enqueue(seq)
        return seq.request_id

    @staticmethod
    def _check_speculation(speculation) -> None:
        """A speculation must come with a drafter (built and checked by Speculation.build)."""
        if getattr(speculation, "drafter", None) is None:
            raise ConfigError("a speculation without a drafter cannot serve requests")

    def make_sequence(self, prompt_ids: Seq[int], params: SamplingParams, *,
                      request_id: Optional[str] = None,
                      logits_mask: Optional[LogitsMask] = None,
                      ignore_eos: bool = False,
                      prefix_leader: Optional[Sequence] = None, images=None,
                      encoder=None, speculation=DEFAULT_SPECULATION,
                      adapter=None) -> Sequence:
        """Validate a request and build its `Sequence` without touching the queues (safe
        from another thread than the one that steps). ignore_eos keeps generating past the
        model's end-of-sequence tokens (benchmarks want fixed lengths). prefix_leader: a
        sequence with the same prompt queued before this one (the copies of an n > 1
        request): this one is admitted once the leader computed the prompt's full blocks,
        and takes them from the prefix cache. `speculation` (a `speculative.Speculation`,
        or None for none) overrides the runner's default. adapter: (slot, prefix-cache
        variant, release) from `Engine.adapter_for_request`, released when the sequence
        ends."""
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise RequestError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens but the model's "
                               f"context is {self.max_model_len}; shorten the prompt")
        vocab = self.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise RequestError(f"a prompt token id is outside the vocabulary [0, {vocab})")
        need = self.cache.blocks_for(len(prompt_ids) + 1)
        if need > self.cache.num_blocks:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens, more than the KV "
                               f"cache holds ({self.cache.num_blocks} blocks of "
                               f"{self.cache.block_size}); shorten it or enlarge the cache")
        request_id = request_id or f"req-{next(self._ids)}"
        seq = Sequence(request_id, prompt_ids, params, make_sampler(params, self.registry),
                       logits_mask, prefix_leader=prefix_leader)
        if self.tokenizer is None and params.stop:
            raise RequestError("stop strings need a tokenizer, and this model has none; "
                               "use stop_token_ids")
        # without a tokenizer (a checkpoint with weights only) requests run on token ids:
        # no text, and no end-of-sequence ids but the ones the request names
        eos = () if ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
        seq.detail["out"] = _Output(TextStream(self.tokenizer, params.stop,
                                               set(params.stop_token_ids) | set(eos)))
        if params.prompt_logprobs is not None:
            seq.detail["out"].prompt = [None] * len(prompt_ids)
            seq.detail["out"].prompt_left = len(prompt_ids) - 1
        if images is not None:
            if list(images.tokens) != prompt_ids or encoder is None:
                raise ValueError("images must be the MultimodalPrompt of prompt_ids, with "
                                 "the encoder that prepared them")
            seq.prompt_key_ids = images.key_ids()
            seq.detail["images"], seq.detail["encoder"] = images, encoder
        spec = self.speculation if speculation is DEFAULT_SPECULATION else speculation
        if spec is not None and can_speculate(seq.sampler, logits_mask):
            if spec is not self.speculation:
                self._check_speculation(spec)
                self.speculations.setdefault(id(spec), spec)
            seq.detail["spec"] = Speculating(
                spec, spec.request(request_id, seq.token_ids, seq.sampler, vocab, params),
                DraftLength(spec.options.num_draft_tokens, spec.options.adaptive))
        if adapter is not None:
            slot, variant, release = adapter
            seq.detail["adapter_slot"], seq.detail["on_free"] = slot, release
            seq.blocks.variant = variant
        return seq

    def enqueue(self, seq: Sequence) -> None:
        images = seq.detail.get("images")
        if images is not None and images.unencoded():
            self.encoding.append(seq)
        else:
            self.scheduler.add(seq)
        self.stats.requests_added += 1

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; False if it is unknown or done."""
        for waiting in self.encoding:
            if waiting.request_id == request_id:
                self.encoding.remove(waiting)
                waiting.status = Status.FINISHED
                waiting.finish_reason = "abort"
                self._release_draft(waiting)
                self._let_go(waiting)
                self._count_finish("abort")
                return True
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            self._release_draft(seq)
            self._count_finish("abort")
        return seq is not None

    def has_unfinished(self) -> bool:
        return bool(self.encoding) or self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.encoding)

    def pending(self) -> list[Sequence]:
        """Every unfinished sequence: being encoded, waiting or running."""
        return list(self.encoding) + list(self.scheduler.running) + \
            list(self.scheduler.waiting)

    # ---- images --------------------------------------------------------------------------
    def _encode_some(self) -> list[RequestOutput]:
        """Advance the image encoding of the sequence at the head of `encoding` by one unit
        when others decode (so their next token is not held up by a whole image), to the
        end when nothing runs. An image whose tokens the prefix cache holds, or that the
        encoded-image cache has, is not encoded. Returns outputs of requests that failed."""
        outputs = []
        budget_one_unit = bool(self.scheduler.running)
        while self.encoding:
            seq = self.encoding[0]
            try:
                done = self._advance_images(seq)
            except Exception as exc:  # a broken image ends its request only
                self.encoding.popleft()
                outputs.append(self._fail(seq, exc))
                continue
            if not done:
                if budget_one_unit:
                    break
                continue
            self.encoding.popleft()
            self.scheduler.add(seq)
            if budget_one_unit:
                break
        return outputs

    def _advance_images(self, seq: Sequence) -> bool:
        """One unit of work on seq's images; True when none is left to encode."""
        images = seq.detail["images"]
        cached = self.cache.cached_prefix(seq.hash_ids)
        skip = seq.detail.setdefault("skipped", set())
        for i in images.unencoded():
            if i in skip:
                continue
            start, n = images.starts[i], images.inputs[i].num_tokens
            if start + n <= cached:  # its K/V is cached: the embeddings are not needed
                skip.add(i)
                self.encoded.skipped += 1
                continue
            hit = self.encoded.get(images.inputs[i].key)
            if hit is not None:
                images.encode(i, hit)
                self.encoded.skipped += 1
                continue
            job = seq.detail.get("job")
            if job is None or job.prepared is not images.inputs[i]:
                job = seq.detail["job"] = EncodeJob(seq.detail["encoder"], images.inputs[i])
            result = job.advance()
            if result is None:
                return False
            images.encode(i, result)
            self.encoded.encodes += 1
            self.encoded.put(result)
            seq.detail.pop("job", None)
        return True

    def _inputs(self, seq: Sequence, start: int, count: int):
        """The `ForwardInputs` of seq's tokens start..start+count-1, or None for text.
        Images skipped because their K/V was cached are encoded here if that cache entry
        was evicted meanwhile (or the sequence was preempted and recomputes)."""
        images = seq.detail.get("images")
        if images is None:
            return None
        for i in images.unencoded(start, start + count):
            images.encode(i, self.encoded.encode(seq.detail["encoder"], images.inputs[i]))
        return images.inputs_for(start, start + count)

    def _forward(self, items) -> tuple[list, list, list]:
        """Per item: its logits rows ([logits_wanted, V]: the sampling row, or every row of
        a verify; None when it wants none), None or (first prompt position, the logits rows
        that score its prompt tokens), and the final hidden states of its logits rows when
        a drafter reads them (else None). Items whose rows take image embeddings run in a
        forward of their own, so text sequences always take the model's usual path (the
        fused C step) and keep their bits whatever else is in the step."""
        inputs = [self._inputs(it.sequence, it.start, it.count) for it in items]
        groups = [[i for i, inp in enumerate(inputs) if inp is None or not inp.replaces],
                  [i for i, inp in enumerate(inputs) if inp is not None and inp.replaces]]
        logits: list = [None] * len(items)
        scored: list = [None] * len(items)
        hidden: list = [None] * len(items)
        for group in groups:
            if not group:
                continue
            sub = [items[i] for i in group]
            batch = PagedBatch.build(self.cache, [
                (it.sequence.blocks, it.tokens, it.start, it.logits_wanted) for it in sub],
                [inputs[i] for i in group])
            batch.want_hidden = self._wants_hidden(sub)
            spans = self._prompt_rows(sub, batch)
            out = self._run_forward(batch, sub)
            row = 0
            for j, i in enumerate(group):
                if spans is not None and spans[j] is not None:
                    first, count = spans[j]
                    scored[i] = (first, out[row:row + count])
                    row += count
                wanted = items[i].logits_wanted
                if wanted:
                    logits[i] = out[row:row + wanted]
                    if batch.hidden is not None:
                        hidden[i] = batch.hidden[row:row + wanted]
                    row += wanted
        return logits, scored, hidden

    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---- one step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one forward over the scheduled work; return the requests' new output."""
        self.scheduler.interleave_tokens = self.pacer.budget()
        self.scheduler.prefill_tokens = self.pacer.prefill_budget()
        started = time.perf_counter()
        outputs = self._encode_some() if self.encoding else []
        drafting = time.perf_counter()
        outputs += self._draft()
        drafting = time.perf_counter() - drafting
        plan = self.scheduler.schedule()
        outputs += [self._finish(seq, "length") for seq in plan.out_of_memory]
        for seq in self.scheduler.running:
            seq.draft = []  # a draft lives for one step (the item keeps its own copy)
        if not plan.items:
            return outputs
        self.stats.steps += 1
        computed = sum(it.count for it in plan.items)  # (a verify's count shrinks to the kept)
        # rows of decoders and verifies, every computed row counted (a verify's rejected
        # drafts cost the forward as much as its kept ones)
        decode_rows = sum(it.count for it in plan.items if it.sample and
                          (it.count == 1 or it.draft))
        verify_started = time.perf_counter()
        logits, scored, hidden = self._forward(plan.items)
        verify_seconds = time.perf_counter() - verify_started
        self.scheduler.complete([it for it in plan.items if not it.draft])
        now = time.perf_counter()
        for i, it in enumerate(plan.items):
            seq = it.sequence
            self.stats.tokens_computed += it.count
            if scored[i] is not None:
                first, rows = scored[i]
                self._score_prompt(seq, rows, first)
            if not it.logits_wanted:
                continue
            self._hand_hidden(seq, hidden[i], 0, it.logits_wanted)
            try:
                if it.draft:
                    out = self._verify(it, logits[i], now, verify_seconds * it.count / computed)
                else:
                    out = self._sample(seq, logits[i][0], now)
            except Exception as exc:  # this request's failure (its sampling options, its
                out = self._fail(seq, exc)  # mask, NaN logits) must not end the others
            if out is not None:
                outputs.append(out)
        # the whole step (sampling and detokenizing too) is what the decoders wait for;
        # drafting is not: the pacer's step costs are those of rows through the model
        # (batch_draft_lengths adds each drafter's own measured cost to them)
        self.pacer.record(decode_rows, computed - decode_rows,
                          time.perf_counter() - started - drafting)
        return outputs

    def _run_forward(self, batch: PagedBatch, items) -> np.ndarray:
        """The model's forward over the batch, each row with its sequence's adapter."""
        slots = getattr(self.model, "adapter_slots", None)
        if slots is None:
            return self.model.forward_paged(batch, self.cache)
        per_row = np.concatenate([np.full(it.count, it.sequence.detail.get("adapter_slot", -1),
                                          np.int32) for it in items])
        if not (per_row >= 0).any():
            per_row = None
        with slots.selecting(per_row=per_row):
            return self.model.forward_paged(batch, self.cache)

    def _prompt_rows(self, items, batch: PagedBatch) -> Optional[list]:
        """For requests with prompt_logprobs: the rows of this step that predict prompt
        tokens are added to batch.logit_rows (before the item's sampling row); returns per
        item (first position, rows) or None, or None when no request asks."""
        if all(it.sequence.detail["out"].prompt is None for it in items):
            return None
        rows: list[int] = []
        spans: list = []
        for i, it in enumerate(items):
            st: _Output = it.sequence.detail["out"]
            span = None
            if st.prompt is not None:
                # position p predicts the token at p + 1; the last prompt position predicts
                # the first generated token (the sampling row)
                end = min(it.start + it.count, len(it.sequence.prompt_ids) - 1)
                if end > it.start:
                    first_row = int(batch.q_start[i])
                    rows.extend(range(first_row, first_row + end - it.start))
                    span = (it.start, end - it.start)
            spans.append(span)
            if it.logits_wanted:  # the sampling row, or every row of a verify
                last = int(batch.q_start[i + 1])
                rows.extend(range(last - it.logits_wanted, last))
        batch.logit_rows = np.asarray(rows, np.int64)
        return spans

    def _score_prompt(self, seq: Sequence, logits: np.ndarray, first: int) -> None:
        st: _Output = seq.detail["out"]
        top = seq.params.prompt_logprobs or 0
        for j in range(logits.shape[0]):
            pos = first + j + 1  # the prompt token this row predicts
            if st.prompt[pos] is None:  # (a preempted request computes its prompt again)
                st.prompt[pos] = logprobs_of(logits[j], seq.prompt_ids[pos], top, exact=True)
                st.prompt_left -= 1

    # ---- sampling and emitting ---------------------------------------------------------
    def _sample(self, seq: Sequence, row: np.ndarray, now: float) -> Optional[RequestOutput]:
        if seq.params.max_tokens == 0:  # nothing to generate (prompt logprobs only)
            return self._finish(seq, "length")
        model_row = row
        if seq.logits_mask is not None:
            row = row.copy()  # the logprob reported is the model's, not the masked one's
            masked = seq.logits_mask.apply(row)
            row = row if masked is None else masked
        token = seq.sampler(seq.token_ids, row, len(seq.prompt_ids))
        params = seq.params
        if params.logprobs_mode == "processed":
            logprob, top = logprobs_of(seq.sampler.processed.astype(np.float64), token,
                                       params.logprobs or 0)
        else:
            logprob, top = logprobs_of(model_row, token, params.logprobs or 0,
                                       exact=params.logprobs is not None)
        if seq.logits_mask is not None:
            seq.logits_mask.accept(token)  # raising ends this request alone (see step)
        # a complete constraint allows nothing more (a tokenizer without an end token):
        # this token is kept and the request stops
        constraint_done = seq.logits_mask is not None and seq.logits_mask.is_terminated()
        return self._take(seq, token, logprob, top, now, constraint_done)

    def _take(self, seq: Sequence, token: int, logprob: float, top: list, now: float,
              constraint_done: bool) -> Optional[RequestOutput]:
        """Append a chosen token to seq and apply the stop rules; the output to send, if
        any (None: nothing to send yet)."""
        if seq.first_token_time is None:
            seq.first_token_time = now
            self.stats.ttft.observe(now - seq.arrival_time)
            self.stats.prompt_tokens += len(seq.prompt_ids)
        elif seq.last_token_time is not None:
            self.stats.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        self.stats.generated_tokens += 1
        st: _Output = seq.detail["out"]
        if st.text.is_stop_token(token):
            return self._finish(seq, "stop")
        seq.token_ids.append(token)
        st.new_tokens.append(token)
        st.new_logprobs.append(logprob)
        st.new_top.append(top)
        text, stopped = st.text.push(token)
        if stopped:
            return self._finish(seq, "stop", text)
        if constraint_done:
            return self._finish(seq, "stop", text)
        if seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, "length", text)
        if self.tokenizer is None:
            return self._emit(seq, "", None)
        if not text:
            return None
        return self._emit(seq, text, None)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """End seq alone after its own computation raised. A RequestError is the
        request's fault (a 400); another LatticeError (NaN logits from a broken checkpoint)
        is the server's, with a message meant for users all the same; anything else is a
        bug whose text stays in the log, and the client gets the request id to find it."""
        if isinstance(exc, LatticeError):
            log.warning("request %s ended: %s", seq.request_id, exc)
            message = str(exc)
            kind = "invalid_request_error" if isinstance(exc, RequestError) else "server_error"
        else:
            log.error("request %s failed", seq.request_id, exc_info=exc)
            message, kind = (f"internal error while computing this request; the server log "
                             f"has the details under request id {seq.request_id}"), \
                "server_error"
        out = self._finish(seq, "error", flush=False)
        out.error, out.error_type = message, kind
        return out

    def _finish(self, seq: Sequence, reason: str, text: str = "",
                flush: bool = True) -> RequestOutput:
        """End seq: free its blocks, release held-back text (unless a stop string ended
        it: what follows the stop string is dropped)."""
        st: _Output = seq.detail["out"]
        if flush:
            rest, stopped = st.text.finish()  # up to a stop string in the held-back tail
            text += rest
            reason = "stop" if stopped else reason
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, reason)
        self._let_go(seq)  # (the scheduler does it for the sequences it knows)
        self._release_draft(seq)
        self._count_finish(reason)
        return self._emit(seq, text, reason)

    @staticmethod
    def _let_go(seq: Sequence) -> None:
        """Release what an ended sequence still holds (its adapter reference): one still
        being encoded never reached the scheduler, whose abort does this for the rest."""
        on_free = seq.detail.pop("on_free", None)
        if on_free is not None:
            on_free()

    def _emit(self, seq: Sequence, text: str, reason: Optional[str]) -> RequestOutput:
        st: _Output = seq.detail["out"]
        out = RequestOutput(seq.request_id, text, st.new_tokens, st.new_logprobs, reason,
                            len(seq.prompt_ids), len(st.text.generated), seq.cached_tokens,
                            top_logprobs=st.new_top)
        if st.prompt is not None and (st.prompt_left == 0 or reason is not None):
            out.prompt_logprobs, st.prompt = st.prompt, None
        st.new_tokens, st.new_logprobs, st.new_top = [], [], []
        return out

    def _count_finish(self, reason: str) -> None:
        self.stats.requests_finished[reason] = self.stats.requests_finished.get(reason, 0) + 1
