"""Speculative decoding inside continuous batching: the part of `BatchRunner` that drafts
before a step and keeps what each verify row's drafter keeps after it.

Before `Scheduler.schedule`, every decoding sequence that speculates asks its drafter for
up to k tokens (k from its `DraftLength`, bounded by max_tokens and the context); the
scheduler gives them KV blocks only from what is left after every plain decoder got its
one (drafts never cause a preemption), and the step computes the pending token and the
drafts as one row group with logits at every row (`PagedBatch` logits wanted = count; a
model with recurrent layers keeps the state after each of those rows). After the forward,
`_verify` runs the drafter's verify on `TargetRows` (the distributions plain decoding
would sample from), rolls the recurrent slot back to the kept rows, emits the kept drafts
and the token after them through the same stop rules as any token, and then marks the kept
rows computed (`Scheduler.complete` trims the blocks past them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .generate import token_logprob
from .scheduler import Sequence, Status
from .speculative import Draft, DraftLength, TargetRows, batch_draft_lengths, run_verify

log = logging.getLogger(__name__)


def _merge(outs: list) -> Optional[object]:
    """One output for the tokens a verify emitted (each `_take` may have made one)."""
    if not outs:
        return None
    last = outs[-1]
    last.text = "".join(o.text for o in outs)
    last.token_ids = [t for o in outs for t in o.token_ids]
    last.logprobs = [p for o in outs for p in o.logprobs]
    return last


@dataclass
class Speculating:
    """A request's speculation: its drafter (shared), what the drafter sees of it, its
    adaptive draft length and this step's draft."""

    spec: object
    request: object
    length: DraftLength
    draft: Optional[Draft] = None


class SpeculativeSteps:
    """BatchRunner's speculative-decoding steps (a mixin: it uses the runner's scheduler,
    cache, max_model_len, `_take`, `_fail`)."""

    def _draft(self) -> list:
        """Ask each decoding sequence's drafter for this step's drafts (seq.draft), at
        lengths that do not lose to plain decoding for the whole batch
        (`batch_draft_lengths`, from the pacer's measured step costs); a drafter that fails
        ends its request alone. Returns those requests' outputs."""
        decoding = [s for s in self.scheduler.running
                    if not s.prefilling and s.status is Status.RUNNING]
        wanted = []
        for seq in decoding:
            sp: Optional[Speculating] = seq.detail.get("spec")
            if sp is None:
                continue
            k = min(sp.length.next(), seq.params.max_tokens - seq.num_generated - 1,
                    self.max_model_len - len(seq.token_ids) - 1)
            if k > 0:
                wanted.append((seq, sp, k))
        if not wanted:
            return []
        lengths = batch_draft_lengths([k for _, _, k in wanted],
                                      [sp.length.rate for _, sp, _ in wanted],
                                      len(decoding), self.pacer.decode_time)
        failed = []
        for (seq, sp, asked), k in zip(wanted, lengths):
            k = k if sp.length.adaptive else asked  # adaptive = false: always the full k
            if k <= 0:
                continue
            started = time.perf_counter()
            try:
                draft = sp.spec.drafter.propose(sp.request, k)
            except Exception as exc:
                sp.spec.stats.failures += 1
                failed.append(self._fail(seq, exc))
                continue
            finally:
                sp.spec.stats.draft_seconds += time.perf_counter() - started
            sp.draft = draft if len(draft.tokens) <= k else \
                Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
            seq.draft = list(sp.draft.tokens)
        return failed

    def _verify(self, it, rows: np.ndarray, now: float,
                seconds: float):
        """Keep what the drafter's verify keeps of a verify item, roll the recurrent state
        and the KV blocks back to it, and emit its tokens (stop rules as for any token)."""
        seq = it.sequence
        sp: Speculating = seq.detail["spec"]
        draft = sp.draft if sp.draft is not None and sp.draft.tokens == it.draft else \
            Draft(it.draft)
        sp.draft = None
        target = TargetRows(rows, seq.token_ids, draft, seq.sampler, seq.logits_mask)
        tokens, kept = run_verify(sp.spec.drafter, target, draft, seq.sampler.rng)
        recurrent = self.cache.recurrent
        if recurrent is not None and seq.blocks.state_slot in recurrent.trails:
            recurrent.rollback(seq.blocks.state_slot, len(tokens))
        sp.spec.drafter.accepted(sp.request, len(draft.tokens), kept)
        sp.length.update(len(draft.tokens), kept)
        stats = sp.spec.stats
        stats.verifies += 1
        stats.drafted += len(draft.tokens)
        stats.accepted += kept
        stats.emitted += len(tokens)
        stats.verify_seconds += seconds
        it.count = len(tokens)  # computed and kept: the pending token and the kept drafts
        outs = []
        for i, token in enumerate(tokens):
            out = self._take(seq, token, token_logprob(rows[i], token), now,
                             seq.logits_mask is not None and seq.logits_mask.is_terminated()
                             and i == len(tokens) - 1)
            if out is not None:
                outs.append(out)
            if seq.status is Status.FINISHED:
                break
        else:
            self.scheduler.complete([it])
        return _merge(outs)

    def _release_draft(self, seq: Sequence) -> None:
        sp: Optional[Speculating] = seq.detail.pop("spec", None)
        if sp is not None:
            try:
                sp.spec.drafter.release(sp.request)
            except Exception:  # a drafter's cleanup must not fail the request's end
                log.exception("drafter release failed for request %s", seq.request_id)

    def speculation_stats(self) -> dict[str, dict[str, float]]:
        """Speculation counters by drafter method, summed over every configuration a request
        of this runner used (acceptance rate and mean tokens per verify recomputed)."""
        from .speculative import SpecStats
        by_method: dict[str, SpecStats] = {}
        for spec in self.speculations.values():
            total = by_method.setdefault(spec.options.method, SpecStats())
            for name in ("verifies", "drafted", "accepted", "emitted", "draft_seconds",
                         "verify_seconds", "failures"):
                setattr(total, name, getattr(total, name) + getattr(spec.stats, name))
        return {method: stats.as_dict() for method, stats in sorted(by_method.items())}

