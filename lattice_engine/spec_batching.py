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

from .scheduler import Sequence, Status
from .speculative import (Draft, DraftLength, TargetRows, batch_draft_lengths, break_even,
                          catch_up_share, run_verify)

log = logging.getLogger(__name__)

# steps in a row without drafts (the batch plan refused them) before a probe drafts; each
# probe that changes nothing doubles the wait, up to PROBE_MAX
PROBE_AFTER = 16
PROBE_MAX = 512


def _merge(outs: list) -> Optional[object]:
    """One output for the tokens a verify emitted (each `_take` may have made one)."""
    if not outs:
        return None
    last = outs[-1]
    last.text = "".join(o.text for o in outs)
    last.token_ids = [t for o in outs for t in o.token_ids]
    last.logprobs = [p for o in outs for p in o.logprobs]
    last.top_logprobs = [t for o in outs for t in (o.top_logprobs or [])]
    last.prompt_logprobs = next((o.prompt_logprobs for o in outs
                                 if o.prompt_logprobs is not None), None)
    return last


class ProbeSchedule:
    """When a batch whose drafts the plan keeps refusing drafts anyway, and how a drafter
    never measured starts. The plan compares estimates that only drafting refreshes
    (acceptance, drafting cost, the cost of the verify rows), so after `wait` refused steps
    in a row one sequence drafts for two steps, so one stale estimate cannot switch
    speculation off for good: the first catches its drafter up (a draft model reads every
    token it missed), the second's cost replaces the estimate. A probe that changes nothing
    doubles the wait for the next (up to PROBE_MAX): where speculation does not pay (8
    streams with a draft model) probing must not cost what it could win. A refusal that
    would stand with every draft kept and the drafter at the cheapest it was ever measured
    waits PROBE_MAX (only a machine faster than it has been could change it). A
    drafter with no measured cost explores the same way before the batch drafts with it:
    one sequence, two steps (eight sequences catching up at once on a guessed cost took a
    second and a half at 8 streams), and only when the plan would draft at the cost the
    drafter estimates for itself (`relative_cost`; a draft model at 8 streams does not)."""

    def __init__(self):
        self.idle = 0          # refused steps in a row
        self.wait = PROBE_AFTER
        self.left = 0          # steps of the probe under way still to draft
        self.turn = 0          # where the search for the next probe's sequence starts
        self.sequence = None   # the request id probing

    def step(self, drafting: bool, could_change, explore: bool = False) -> int:
        """After the plan: drafting, whether it drafts this step; could_change(), whether
        what a probe could find might change its refusal (asked only when one is due);
        explore, whether a drafter it would draft with was never measured. Returns 2
        (the probe's catch-up step), 1 (its measured step) or 0 (no probe)."""
        if explore and not self.left:
            self.left = 2
        elif drafting and not self.left:
            self.idle, self.wait = 0, PROBE_AFTER
        elif not drafting:
            self.idle += 1
            if not self.left and self.idle >= self.wait and \
                    (self.idle >= PROBE_MAX or could_change()):
                self.idle, self.left = 0, 2
                self.wait = min(2 * self.wait, PROBE_MAX)
        phase = self.left
        if phase:
            self.left -= 1
        return phase

    def pick(self, phase: int, wanted: list, missed: list) -> int:
        """Which of the wanted sequences probes: the one of the catch-up step for both
        steps; for a new probe the one whose drafter missed the fewest tokens (the cheapest
        catch-up), the next in turn among equals."""
        ids = [seq.request_id for seq, _, _ in wanted]
        if phase == 1 and self.sequence in ids:
            return ids.index(self.sequence)
        n = len(wanted)
        best = min(((self.turn + i) % n for i in range(n)), key=lambda i: missed[i])
        self.turn, self.sequence = best + 1, ids[best]
        return best


@dataclass
class Speculating:
    """A request's speculation: its drafter (shared), what the drafter sees of it, its
    adaptive draft length and this step's draft."""

    spec: object
    request: object
    length: DraftLength
    draft: Optional[Draft] = None
    seen: int = 0  # the sequence's length when its drafter last drafted for it (0: never)
    drafted: int = 0  # how many tokens it drafted then

    def missed(self, tokens: int) -> int:
        """Tokens of a sequence of this length its drafter never read and would not have
        read drafting every step (the prompt, tokens decoded while drafting was refused):
        its next drafting call's catch-up."""
        if not self.seen:
            return tokens
        return max(tokens - self.seen - self.drafted - 1, 0)


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
        floors: dict[int, Optional[float]] = {}  # break-even acceptance, per drafter
        for seq in decoding:
            sp: Optional[Speculating] = seq.detail.get("spec")
            if sp is None:
                continue
            key = id(sp.spec)
            if key not in floors:
                floors[key] = break_even(len(decoding), self.pacer.step_time,
                                         sp.spec.cost_per_token(self.pacer.step_time))
            k = min(sp.length.next(floors[key]), seq.params.max_tokens - seq.num_generated - 1,
                    self.max_model_len - len(seq.token_ids) - 1)
            if k > 0:
                wanted.append((seq, sp, k))
        if not wanted:
            return []
        missed = [sp.missed(len(seq.token_ids)) for seq, sp, _ in wanted]
        setup = self._catch_up_shares(wanted, missed)
        if not self.pacer.has_measured_near(len(decoding)):
            # what plain decoding of this many rows costs is unknown or only guessed (every
            # step so far speculated, or had another count of decoders): one plain step
            # measures it, so the plan compares against the real thing (at 8 streams it took
            # a 39-row verify step for the cost of 8 rows, and speculated at 0.8x plain)
            lengths = [0] * len(wanted)
        else:
            lengths = batch_draft_lengths([k for _, _, k in wanted],
                                          [sp.length.rate for _, sp, _ in wanted],
                                          len(decoding), self.pacer.step_time,
                                          [sp.spec.cost_per_token(self.pacer.step_time)
                                           for _, sp, _ in wanted], setup)
        explore = any(lengths) and any(not sp.spec.measured for _, sp, _ in wanted)
        probe = self.spec_probes.step(
            any(lengths),
            lambda: self._probe_could_change_plan(wanted, len(decoding), setup), explore)
        if probe:  # one sequence drafts (the same one for both steps of a probe)
            pick = self.spec_probes.pick(probe, wanted, missed)
            lengths = [k if i == pick else 0 for i, (_, _, k) in enumerate(wanted)]
        failed = []
        groups: dict[int, list] = {}  # by drafter: one propose_batch call each when it has one
        for (seq, sp, asked), k, m in zip(wanted, lengths, missed):
            k = k if sp.length.adaptive else asked  # adaptive = false: always the full k
            if k > 0:
                groups.setdefault(id(sp.spec.drafter), []).append((seq, sp, k, m))
        for group in groups.values():
            spec = group[0][1].spec
            drafter, stats = spec.drafter, spec.stats
            drafts = None
            started = time.perf_counter()
            if len(group) > 1 and callable(getattr(drafter, "propose_batch", None)):
                try:
                    drafts = list(drafter.propose_batch([sp.request for _, sp, _, _ in group],
                                                        [k for _, _, k, _ in group]))
                    if len(drafts) != len(group):
                        raise RuntimeError(f"propose_batch returned {len(drafts)} drafts for "
                                           f"{len(group)} requests")
                except Exception:  # find the request at fault one by one below
                    log.exception("propose_batch failed; drafting request by request")
                    drafts = None
            for i, (seq, sp, k, _) in enumerate(group):
                self._lend_recurrent(seq, sp)
                sp.draft = None  # (one the scheduler had no room to verify is dropped)
                try:
                    draft = drafts[i] if drafts is not None else \
                        sp.spec.drafter.propose(sp.request, k)
                except Exception as exc:
                    stats.failures += 1
                    failed.append(self._fail(seq, exc))
                    continue
                finally:
                    sp.request.recurrent = None
                sp.draft = draft if len(draft.tokens) <= k else \
                    Draft(draft.tokens[:k], None if draft.probs is None else draft.probs[:k])
                seq.draft = list(sp.draft.tokens)
            seconds = time.perf_counter() - started
            stats.draft_seconds += seconds
            done = [(seq, sp, m) for seq, sp, _, m in group if sp.draft is not None]
            spec.record_draft_cost(seconds, sum(len(sp.draft.tokens) for _, sp, _ in done),
                                   sum(m for _, _, m in done), fresh=probe == 1)
            for seq, sp, _ in done:
                sp.seen, sp.drafted = len(seq.token_ids), len(sp.draft.tokens)
        return failed

    def _catch_up_shares(self, wanted, missed) -> list[float]:
        """Each wanted sequence's share of its catch-up this step (`catch_up_share`) over
        the tokens it may still generate."""
        return [catch_up_share(m, sp.spec.catch_up_per_token(self.pacer.prefill_per_token,
                                                             self.pacer.step_time),
                               min(seq.params.max_tokens - seq.num_generated,
                                   self.max_model_len - len(seq.token_ids)),
                               sp.length.rate, k)
                for (seq, sp, k), m in zip(wanted, missed)]

    def _probe_could_change_plan(self, wanted, decoders: int, setup) -> bool:
        """Whether the plan would draft at the best a probe could find: every draft kept
        (acceptance estimates go stale while nothing drafts) and drafting at the cheapest
        it was measured. The catch-ups stay in: near the end of its answer a sequence
        cannot earn back reading the tokens it missed (a probe there read 232 tokens for
        0.4 s)."""
        if not self.pacer.has_measured_near(decoders):
            return False  # this step measures plain decoding first
        step_time = self.pacer.step_time
        cheapest = [sp.spec.cost_per_token(step_time, cheapest=True) for _, sp, _ in wanted]
        best = batch_draft_lengths([k for _, _, k in wanted], [1.0] * len(wanted), decoders,
                                   step_time, cheapest, setup)
        return any(best)

    def _lend_recurrent(self, seq, sp) -> None:
        """Point the drafter's request at the sequence's recurrent-state slot (views, for
        the length of its propose: `DraftRequest.recurrent`)."""
        recurrent = self.cache.recurrent
        slot = seq.blocks.state_slot
        if recurrent is None or slot is None or slot < 0:
            return
        states = recurrent.state(slot)
        sp.request.recurrent = list(zip(states[0::2], states[1::2]))

    def _verify(self, it, rows: np.ndarray, now: float,
                seconds: float):
        """Keep what the drafter's verify keeps of a verify item, roll the recurrent state
        and the KV blocks back to it, and emit its tokens (stop rules as for any token)."""
        seq = it.sequence
        sp: Speculating = seq.detail["spec"]
        draft, sp.draft = sp.draft, None
        if draft is None or draft.tokens != it.draft:  # the scheduler copies seq.draft
            raise RuntimeError(f"verify row of {seq.request_id} does not carry the drafts "
                               f"its drafter proposed")
        target = TargetRows(rows, seq.token_ids, draft, seq.sampler, seq.logits_mask,
                            len(seq.prompt_ids))
        tokens, kept = run_verify(sp.spec.drafter, target, draft, seq.sampler.rng)
        recurrent = self.cache.recurrent
        if recurrent is not None and seq.blocks.state_slot in recurrent.trails:
            recurrent.rollback(seq.blocks.state_slot, len(tokens))
        if sp.request.hidden is not None and sp.spec.drafter.wants_hidden:
            sp.request.hidden = sp.request.hidden[:len(tokens)]
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
        from .batching import logprobs_of  # (batching imports this module)
        params = seq.params
        for i, token in enumerate(tokens):
            # logprobs as `_sample` reports them: of the model's row, or of the row the
            # token was drawn from ("processed": every kept position was processed)
            row = target.rows.get(i) if params.logprobs_mode == "processed" else None
            logprob, top = logprobs_of(rows[i] if row is None else row.astype(np.float64),
                                       token, params.logprobs or 0,
                                       exact=params.logprobs is not None)
            out = self._take(seq, token, logprob, top, now,
                             seq.logits_mask is not None and seq.logits_mask.is_terminated()
                             and i == len(tokens) - 1)
            if out is not None:
                outs.append(out)
            if seq.status is Status.FINISHED:
                break
        else:
            self.scheduler.complete([it])
        return _merge(outs)

    @staticmethod
    def _wants_hidden(items) -> bool:
        """Whether a sequence of this step speculates with a drafter that reads the
        target's hidden states (the forward then keeps them: `PagedBatch.want_hidden`)."""
        return any(getattr(it.sequence.detail.get("spec"), "spec", None) is not None and
                   it.sequence.detail["spec"].spec.drafter.wants_hidden for it in items)

    @staticmethod
    def _hand_hidden(seq: Sequence, hidden, row: int, count: int) -> None:
        """Give a wants_hidden drafter its sequence's final hidden states of this step's
        logit rows (a verify's are cut to the kept rows in `_verify`)."""
        sp: Optional[Speculating] = seq.detail.get("spec")
        if hidden is not None and sp is not None and sp.spec.drafter.wants_hidden:
            sp.request.hidden = hidden[row:row + count]

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

