"""Speculative decoding: what the core shares with drafter plugins.

A drafter (registered through the `register_drafters` hook; `contract.Drafter`) proposes
k tokens after a sequence; the target model scores the pending token and the k drafts in
one verify forward (k + 1 rows of logits, one per position); the drafter's `verify` (the
spec_decode plugin's rejection sampler) decides how many drafts to keep and which token
follows them; the core then rolls the caches and the grammar back to what was kept.

What the core owns here:
- `SpeculativeOptions`: the `[speculative]` config section / a request's choice, checked.
- `Draft`: proposed tokens and, for a sampling drafter, the distribution q each came from.
- `DraftRequest`: what a drafter sees of a sequence (its tokens, sampling options, RNG)
  and a `state` dict it may keep per request.
- `TargetRows`: the verify forward's rows as the distributions plain decoding would sample
  from at each position, after the Sampler's processors and the grammar mask, computed
  lazily with the history the drafts before that position make.
- `DraftLength`: the adaptive draft length of one sequence.
- `SpecStats`: counters for /metrics and the bench.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError, RequestError

MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeOptions:
    """method: a registered drafter name ("ngram", "draft_model", ...) or None (off);
    num_draft_tokens: the most drafts per verify (the adaptive length stays at or below it);
    adaptive: shrink / switch off the draft length per sequence from its acceptance, and
    under continuous batching for the whole step when the drafts' rows would cost more time
    than their expected tokens save (`batch_draft_lengths`); false: always k drafts;
    options: the drafter's own settings (e.g. prompt_lookup_min / max, draft model)."""

    method: Optional[str] = None
    num_draft_tokens: int = 4
    adaptive: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        k = self.num_draft_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise RequestError(f"num_draft_tokens={k!r} is out of range: it must be an "
                               f"integer in [1, {MAX_DRAFT_TOKENS}]")
        if self.method is not None and (not isinstance(self.method, str) or not self.method):
            raise RequestError(f"speculative method={self.method!r} must be a drafter name "
                               f"or unset (off)")
        if not isinstance(self.adaptive, bool):
            raise RequestError(f"speculative adaptive={self.adaptive!r} must be true or false")
        if not isinstance(self.options, Mapping):
            raise RequestError(f"speculative options={self.options!r} must be a table")

    @property
    def enabled(self) -> bool:
        return self.method is not None


def build_drafter(registry, options: SpeculativeOptions, model, tokenizer):
    """The drafter `options.method` names, built for this target model; None when off.
    An unknown name is a ConfigError listing the registered drafters."""
    if not options.enabled:
        return None
    table = registry.items.get("drafters", {})
    if options.method not in table:
        choices = ", ".join(sorted(table)) or "(none: pip install lattice-spec-decode)"
        raise ConfigError(f"speculative method {options.method!r} is not a registered "
                          f"drafter; registered: {choices}")
    drafter = table[options.method](model, tokenizer, dict(options.options))
    from .contract import check_drafter
    check_drafter(options.method, drafter)
    return drafter


@dataclass
class Draft:
    """Proposed tokens; `probs` [len(tokens), V] float64 holds the distribution q each was
    drawn from, or None for a deterministic drafter (q is one-hot at the token)."""

    tokens: list[int]
    probs: Optional[np.ndarray] = None

    def __post_init__(self):
        self.tokens = [int(t) for t in self.tokens]
        if self.probs is not None and self.probs.shape[0] != len(self.tokens):
            raise ValueError(f"a draft of {len(self.tokens)} tokens carries "
                             f"{self.probs.shape[0]} distributions")


@dataclass(eq=False)
class DraftRequest:
    """One sequence as its drafter sees it. token_ids: the prompt and every accepted token
    (a live list, read-only for the drafter); params: its SamplingParams; greedy: whether
    the target samples greedily (a drafter then need not sample); rng: the request's own
    generator (a sampling drafter draws from it, so a seeded run repeats); state: the
    drafter's per-request scratch (its draft cache, ...), dropped on `release`.
    hidden: the target's final hidden states (after the final norm, before the lm_head)
    of the rows the last forward kept for this sequence, float32 [n, H]: the kept rows of a
    verify (the pending token and the kept drafts), or the one row of a plain decode step;
    set only for a drafter whose `wants_hidden` is true (a drafter inside the target, such
    as an MTP head, reads it).
    recurrent: for a model with recurrent layers (Qwen3.5's Gated DeltaNet), the target's
    own state of this sequence, one (conv window, delta-rule memory) pair of arrays per
    linear-attention layer, as it is before the pending token (every accepted token but
    the last folded in); set just before `propose`, valid only during it, and read-only
    (a self-speculating drafter copies it and runs part of the model on the copy)."""

    request_id: str
    token_ids: list[int]
    params: Any
    greedy: bool
    rng: np.random.Generator
    vocab_size: int
    state: dict[str, Any] = field(default_factory=dict)
    hidden: Optional[np.ndarray] = None
    recurrent: Optional[list] = None


class VerifyStop(Exception):
    """Raised by `TargetRows.probs(i)` when the output constraint ended at an accepted
    draft before position i: nothing may follow it, so the verify keeps drafts[:i]."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


class TargetRows:
    """The verify forward's rows as the target distributions p_0 .. p_k.

    Row i is the target's logits after history + drafts[:i]; `processed(i)` passes it
    through what plain decoding applies (the grammar mask, then the request's `Sampler`:
    repetition penalty over that history, temperature, top-k / top-p / min-p, plugin
    processors), `probs(i)` the distribution the sampler would draw from. The grammar is
    advanced over the drafts as positions are asked for, and `mask_rollback(n)` says how
    far to roll it back when n drafts are kept.
    """

    def __init__(self, logits: np.ndarray, history: Sequence[int], draft: Draft, sampler,
                 mask=None, prompt_len: int = 0):
        self.logits = logits
        self.history = history
        self.draft = draft
        self.sampler = sampler
        self.mask = mask
        self.prompt_len = prompt_len  # presence / frequency penalties count what follows
        self.rows: dict[int, np.ndarray] = {}  # processed rows computed so far, by position
        self.greedy = sampler.kind == "greedy"
        self._advanced = 0  # drafts the mask has accepted
        self._steps = [self._mask_steps()]  # mask step count after 0, 1, ... drafts

    def __len__(self) -> int:
        return self.logits.shape[0]

    def _mask_steps(self) -> int:
        """The mask's own count of accepted tokens (a GrammarMatcher's `steps`, which a
        stop token after the grammar's end does not advance), else the drafts it took."""
        steps = getattr(self.mask, "steps", None) if self.mask is not None else 0
        return self._advanced if steps is None else steps

    def processed(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"verify row {i} of {len(self)}")
        if i > len(self.draft.tokens):
            raise IndexError(f"row {i} follows more drafts than the {len(self.draft.tokens)} "
                             f"proposed")
        row = self.logits[i]
        if self.mask is not None:
            while self._advanced < i:
                if self.mask.is_terminated():
                    raise VerifyStop(self._advanced)
                self.mask.accept(self.draft.tokens[self._advanced])
                self._advanced += 1
                self._steps.append(self._mask_steps())
            if self.mask.is_terminated() and not getattr(self.mask, "stop_token_ids", ()):
                raise VerifyStop(i)
            row = row.copy()
            masked = self.mask.apply(row)
            row = row if masked is None else masked
        history = list(self.history) + self.draft.tokens[:i]
        self.rows[i] = self.sampler.process(history, row, self.prompt_len)
        return self.rows[i]

    def probs(self, i: int) -> np.ndarray:
        return self.sampler.probabilities(self.processed(i))

    def mask_rollback(self, kept: int) -> int:
        """Mask steps to undo so that the mask has accepted exactly drafts[:kept]."""
        if kept >= self._advanced:
            return 0
        return self._steps[self._advanced] - self._steps[kept]

    @property
    def mask_advanced(self) -> int:
        return self._advanced


def run_verify(drafter, rows: TargetRows, draft: Draft, rng) -> tuple[list[int], int]:
    """The drafter's verify with the bookkeeping every path shares: returns (tokens, kept):
    the kept drafts plus the token that follows them (none when the output constraint
    ended inside the drafts), and how many drafts were kept; leaves the mask having
    accepted every returned token."""
    try:
        out = [int(t) for t in drafter.verify(rows, draft, rng)]
        final = True
    except VerifyStop as stop:
        out, final = draft.tokens[:stop.position], False
    kept = len(out) - 1 if final else len(out)
    if (final and not out) or kept > len(draft.tokens) or out[:kept] != draft.tokens[:kept]:
        raise RuntimeError(f"drafter {type(drafter).__name__} returned {out} for drafts "
                           f"{draft.tokens}: it must keep a prefix of the drafts and add one "
                           f"token")
    mask = rows.mask
    if mask is not None:
        undo = rows.mask_rollback(kept)
        if kept > rows.mask_advanced:  # drafts kept without their row being asked for
            for t in draft.tokens[rows.mask_advanced:kept]:
                mask.accept(t)
        if undo:
            mask.rollback(undo)
        if final:
            mask.accept(out[-1])
    return out, kept


class DraftLength:
    """The draft length of one sequence from its recent acceptance.

    Starts at the configured maximum. After each verify the acceptance rate (kept / drafted)
    enters an exponential average; the next length is about the count that average makes
    worth verifying (at rate a, the i-th draft is kept with probability a^i: drafting stops
    where that falls below `min_gain`). When the average falls under `off_below`, the
    sequence decodes plainly for `cooldown` steps, then probes again with one draft.
    """

    def __init__(self, maximum: int, adaptive: bool = True, *, smoothing: float = 0.3,
                 min_gain: float = 0.25, off_below: float = 0.15, cooldown: int = 16):
        self.maximum = maximum
        self.adaptive = adaptive
        self.rate = 0.7  # optimistic start: speculation gets its chance
        self.smoothing, self.min_gain, self.off_below = smoothing, min_gain, off_below
        self.cooldown, self._off_for = cooldown, 0

    def next(self, min_gain: Optional[float] = None) -> int:
        """The next draft length. min_gain: the probability of being kept below which a
        draft is not worth its row (`break_even`, from measured costs); None: the
        configured `min_gain`."""
        if not self.adaptive:
            return self.maximum
        if self._off_for > 0:
            self._off_for -= 1
            return 0 if self._off_for > 0 else 1
        floor = self.min_gain if min_gain is None else min_gain
        k, p = 0, 1.0
        while k < self.maximum:
            p *= self.rate
            if p < floor:
                break
            k += 1
        return max(k, 1)

    def update(self, drafted: int, kept: int) -> None:
        if drafted <= 0:
            return
        self.rate += self.smoothing * (kept / drafted - self.rate)
        if self.adaptive and self.rate < self.off_below:
            self._off_for = self.cooldown
            self.rate = self.off_below * 2  # probe from a middling estimate


def break_even(decoders: int, step_time, draft_cost: float) -> Optional[float]:
    """The probability of being kept at which one more draft pays for itself in a step of
    `decoders` decoding rows: its extra row through the model (step_time(rows), the
    pacer's measured step costs, over four extra rows) and its drafting (`draft_cost`
    seconds), against the time plain decoding takes per token. None before the step costs
    are measured. A drafter that costs nothing, on a memory-bound model, drafts far (Qwen2.5
    -Coder-0.5B q8_0: a row costs 1.8 ms against 21 ms a token: p = 0.09); a dear draft
    model or a compute-bound batch drafts little."""
    base, wider = step_time(decoders), step_time(decoders + 4)
    if not base or not wider:
        return None
    row = max(wider - base, 0.0) / 4
    return min(1.0, (row + draft_cost) / (base / decoders))


def expected_kept(rate: float, k: int) -> float:
    """Expected drafts kept of k when each is kept with probability `rate` given the ones
    before it were: rate + rate^2 + ... + rate^k."""
    return sum(rate ** j for j in range(1, k + 1))


def batch_draft_lengths(lengths: Sequence[int], rates: Sequence[float], decoders: int,
                        step_time, draft_costs: Optional[Sequence[float]] = None,
                        setup_costs: Optional[Sequence[float]] = None) -> list[int]:
    """Draft lengths for one continuous-batching step that do not lose to plain decoding.

    lengths: each speculating sequence's adaptive length (its `DraftLength`); rates: their
    acceptance estimates; decoders: every decoding row of the step (speculating or not);
    step_time(rows): the measured cost of a step of that many rows (the prefill pacer's
    estimate; None before any); draft_costs: each sequence's measured seconds per drafted
    token (a draft model's forwards; ~0 for n-gram lookup); setup_costs: seconds each
    sequence costs this step if it drafts at all (its share of a catch-up: `catch_up_share`).
    A plain step makes `decoders` tokens in step_time(decoders); drafts add rows (each
    matmul's M grows, so on a loaded batch they cost real time), their drafting time, and
    expected tokens. Of the full lengths, half and quarter lengths and none, the plan with
    the most expected tokens per second wins, so speculation switches itself off for the
    whole batch when rows are dear and acceptance is low.
    """
    base = step_time(decoders) if decoders else None
    if base is None or not any(lengths):
        return list(lengths)
    best, best_rate = [0] * len(lengths), decoders / base
    for scale in (1.0, 0.5, 0.25):
        plan = [0 if k == 0 else max(1, int(k * scale)) for k in lengths]
        t = step_time(decoders + sum(plan))
        if t is None or t <= 0:
            continue
        t += sum(k * c for k, c in zip(plan, draft_costs or ()))
        t += sum(c for k, c in zip(plan, setup_costs or ()) if k)
        tokens = decoders + sum(expected_kept(r, k) for r, k in zip(rates, plan))
        if tokens / t > best_rate * 1.02:  # a gain within timing noise is no gain
            best, best_rate = plan, tokens / t
    return best


def catch_up_share(missed: int, cost_per_token: float, remaining: int, rate: float,
                   k: int) -> float:
    """The part of a catch-up (`missed` tokens at `cost_per_token`, e.g. a draft model
    reading the prompt) one step carries: the catch-up is paid once and serves every later
    step the sequence drafts in, about remaining / (1 + expected kept) of them for the
    `remaining` tokens it may still generate."""
    if missed <= 0 or cost_per_token <= 0:
        return 0.0
    steps = max(remaining / (1.0 + expected_kept(rate, max(k, 1))), 1.0)
    return missed * cost_per_token / steps


@dataclass
class SpecStats:
    """Speculation counters (cumulative): verifies run, drafts proposed and kept, tokens
    emitted by verifies, and seconds spent drafting and verifying."""

    verifies: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    failures: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        """Tokens emitted per verify (kept drafts + the token after them)."""
        return self.emitted / self.verifies if self.verifies else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"verifies": self.verifies, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_per_verify": self.mean_accepted,
                "draft_seconds": self.draft_seconds, "verify_seconds": self.verify_seconds,
                "failures": self.failures}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def can_speculate(sampler, mask) -> bool:
    """Whether a request can be verified exactly: its sampler's distribution is known (a
    built-in one) and its output constraint, if any, can roll back."""
    return sampler.kind != "custom" and (mask is None or callable(getattr(mask, "rollback",
                                                                          None)))


class Speculation:
    """A drafter with its options and counters, shared by the requests of one engine."""

    # weight of the newest drafting call in `draft_cost` and `catch_up_cost`
    COST_SMOOTHING = 0.2

    def __init__(self, drafter, options: SpeculativeOptions):
        self.drafter = drafter
        self.options = options
        self.stats = SpecStats()
        # what drafting costs, measured by the continuous-batching plan: seconds per drafted
        # token while a sequence drafts step after step (recent calls; 0 before any), the
        # lowest that ever was (what the drafter costs on an idle machine), and seconds per
        # token the drafter reads that it missed (a draft model prefilling a prompt or the
        # tokens decoded while drafting was refused; ~0 for n-gram lookup)
        self.draft_cost = 0.0
        self.cheapest_draft_cost: Optional[float] = None
        self.catch_up_cost = 0.0
        self._ids = 0

    @property
    def measured(self) -> bool:
        """Whether a drafting call's steady cost was measured (the plan can weigh it)."""
        return self.cheapest_draft_cost is not None

    def cost_per_token(self, step_time, cheapest: bool = False) -> float:
        """Seconds per drafted token for the batch plan: the measured moving average (or
        the cheapest measured), and before any measurement the drafter's own estimate,
        `relative_cost` times one plain decode step of the target (0 without one)."""
        if self.measured:
            return self.cheapest_draft_cost if cheapest else self.draft_cost
        relative = getattr(self.drafter, "relative_cost", None)
        step = step_time(1) if relative else None
        return float(relative) * step if step else 0.0

    def catch_up_per_token(self, prefill_per_token: Optional[float], step_time) -> float:
        """Seconds per missed token a catch-up costs: the measured `catch_up_cost`, and
        before it the drafter's `relative_cost` times what the target pays to prefill a
        token (a plain decode step when no prefill was measured; 0 without an estimate)."""
        if self.catch_up_cost:
            return self.catch_up_cost
        relative = getattr(self.drafter, "relative_cost", None)
        base = (prefill_per_token or step_time(1)) if relative else None
        return float(relative) * base if base else 0.0

    def record_draft_cost(self, seconds: float, drafted: int, caught_up: int = 0,
                          fresh: bool = False) -> None:
        """Fold one drafting call (`drafted` tokens in `seconds`, reading `caught_up` tokens
        it had missed) into the moving averages (the cost follows the machine's load and
        the drafts' lengths). A call that mostly catches up (caught_up >= drafted) measures
        the catch-up: what its drafts at `draft_cost` do not explain; any other measures
        `draft_cost` (a few missed tokens are part of drafting step after step). fresh: a
        probe after drafting was refused for a while, whose cost replaces the stale
        estimate."""
        if caught_up and caught_up >= drafted:
            cost = max(seconds - self.draft_cost * drafted, 0.0) / caught_up
            self.catch_up_cost = cost if not self.catch_up_cost else \
                self.catch_up_cost + self.COST_SMOOTHING * (cost - self.catch_up_cost)
            return
        if drafted <= 0:
            return
        cost = seconds / drafted
        self.draft_cost = cost if fresh or not self.measured else \
            self.draft_cost + self.COST_SMOOTHING * (cost - self.draft_cost)
        self.cheapest_draft_cost = cost if not self.measured else \
            min(self.cheapest_draft_cost, cost)

    @classmethod
    def build(cls, registry, options: SpeculativeOptions, model, tokenizer):
        drafter = build_drafter(registry, options, model, tokenizer)
        return None if drafter is None else cls(drafter, options)

    def request(self, request_id: str, token_ids: list[int], sampler, vocab_size: int,
                params=None) -> DraftRequest:
        return DraftRequest(request_id, token_ids, params or sampler.params,
                            sampler.kind == "greedy", sampler.rng, vocab_size)

    def begin(self, model, history: list[int], sampler, grammar=None, params=None,
              inputs=None):
        """A `SingleSession` for one `generate_step` run, or None when this request cannot
        be verified exactly (a plugin sampler, a constraint without rollback). `inputs`:
        the request's `multimodal.MultimodalPrompt` (images), whose positions every
        forward of the session takes."""
        if not can_speculate(sampler, grammar):
            return None
        self._ids += 1
        req = self.request(f"generate-{self._ids}", history, sampler,
                           model.config.vocab_size, params)
        return SingleSession(self, model, req, sampler, grammar, inputs)


class SingleSession:
    """Speculation for one sequence over a dense cache (`generate.generate_step`): the
    pending token (sampled, not yet in the cache) and k drafts go through one forward of
    k + 1 positions; the cache is then cut back to the pending token and the kept drafts
    (`cache.truncate`; a hybrid cache records its recurrent state per position for that,
    `record_next`)."""

    def __init__(self, spec: Speculation, model, request: DraftRequest, sampler, grammar,
                 inputs=None):
        self.spec, self.model, self.request = spec, model, request
        self.sampler, self.grammar = sampler, grammar
        self.inputs = inputs  # a multimodal.MultimodalPrompt, or None for text
        self.prompt_len = len(request.token_ids)  # begun before any token is generated
        self.length = DraftLength(spec.options.num_draft_tokens, spec.options.adaptive)

    def step(self, cache, k_max: int):
        """Up to k_max + 1 (token, logprob) pairs from one verify, or None when there is
        nothing to verify this step (the caller decodes one token plainly)."""
        from .generate import token_logprob
        k = min(self.length.next(), k_max)
        if k <= 0:
            return None
        drafter, stats, req = self.spec.drafter, self.spec.stats, self.request
        if hasattr(cache, "conv"):  # a hybrid cache: row 0 is this sequence
            req.recurrent = [(c[0], d[0]) for c, d in zip(cache.conv, cache.delta)]
        with Timer() as t:
            try:
                draft = drafter.propose(req, k)
            finally:
                req.recurrent = None
        stats.draft_seconds += t.seconds
        if len(draft.tokens) > k:
            draft = Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
        if not draft.tokens:
            return None
        with Timer() as t:
            start = cache.offset
            x = np.asarray([[req.token_ids[-1]] + draft.tokens], dtype=np.int64)
            if hasattr(cache, "record_next"):
                cache.record_next()
            hidden = self._hidden(x, cache)
            logits = self.model.logits(hidden)[0]
            rows = TargetRows(logits, req.token_ids, draft, self.sampler, self.grammar,
                              self.prompt_len)
            out, kept = run_verify(drafter, rows, draft, self.sampler.rng)
            cache.truncate(start + len(out))
        stats.verify_seconds += t.seconds
        drafter.accepted(req, len(draft.tokens), kept)
        self.length.update(len(draft.tokens), kept)
        if drafter.wants_hidden:
            req.hidden = hidden[0, :len(out)]
        stats.verifies += 1
        stats.drafted += len(draft.tokens)
        stats.accepted += kept
        stats.emitted += len(out)
        return [(tok, token_logprob(logits[i], tok)) for i, tok in enumerate(out)]

    def decode(self, cache, token: int) -> np.ndarray:
        """A plain decode step of `token` (logits [1, 1, V]); hands a wants_hidden drafter
        the row's hidden state."""
        return self.forward_last(cache, np.array([[token]], dtype=np.int64))

    def forward_last(self, cache, x: np.ndarray) -> np.ndarray:
        """Logits [1, 1, V] of the last of tokens x [1, T] appended to the cache (a decode
        step or the prompt's last prefill chunk); a wants_hidden drafter gets that row's
        hidden state."""
        if not self.spec.drafter.wants_hidden:
            return self.model.forward(x, cache, last_only=True, **self._extra(cache, x))
        hidden = self._hidden(x, cache)
        self.request.hidden = hidden[0, -1:]
        return self.model.logits(hidden[:, -1:])

    def _extra(self, cache, x: np.ndarray) -> dict:
        """The forward's `inputs` for tokens x [1, T] after the cache (images only)."""
        if self.inputs is None:
            return {}
        return {"inputs": self.inputs.inputs_for(cache.offset, cache.offset + x.shape[1])}

    def _hidden(self, x: np.ndarray, cache) -> np.ndarray:
        return self.model.hidden_states(x, cache, **self._extra(cache, x))

    def close(self) -> None:
        self.spec.drafter.release(self.request)
