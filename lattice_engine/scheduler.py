"""Continuous batching: which sequences compute which tokens in the next forward.

Every step the scheduler fills a token budget:
1. every running sequence that is decoding gets its one token (all of them share one
   forward, so each weight matrix is read once for the whole batch: matmul with M = batch);
   then a sequence with speculative drafts (`Sequence.draft`, set by the runner) gets
   rows for them too, from the budget and the blocks left over (drafts never preempt:
   without room the sequence decodes its one token plainly);
2. sequences still prefilling get the next chunk of their prompt from what is left;
3. waiting sequences are admitted while budget, sequence slots and KV blocks last; their
   cached prefix (full blocks seen before) is skipped.
While anything decodes, prefill only gets `interleave_tokens` per step, so a long prompt
is spread over many steps and the decoders' inter-token latency stays flat; with nothing
decoding, prefill gets `prefill_tokens` (at most `step_tokens`; the runner sizes it so a
step takes a bounded time).

Admission is fair to requests that arrive while a long prompt prefills: when one is
waiting and a slot is free, the prompts already prefilling get at most half of the step's
prefill budget, the waiting request is admitted with the rest, and whatever it leaves
goes back to them. A long prefill used to take every step's whole budget, so a short
request waited for all of it (25 s behind an 8,100-token prompt).

Models with recurrent (linear-attention) layers give the cache a `RecurrentStateSlots`:
each admitted sequence then holds a state slot (restored from the snapshot at the end of
its cached prefix), prefill chunks end on block boundaries, and the state is snapshotted
whenever a sequence's computed tokens end exactly at a newly full block.

When a running sequence needs a block and none is left, the newest running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the waiting
queue with its generated tokens kept, to be prefilled again later (no request is lost, no
crash). Abort frees a sequence's blocks at once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, Protocol

from .cache.paged import PagedKVCache, SequenceBlocks
from .errors import RequestError
from .sampling import Sampler, SamplingParams


class LogitsMask(Protocol):
    """A per-request constraint on the next token (e.g. a grammar): `apply` edits the
    sequence's logits row (float32 [V], in place or returning a new row; masked tokens set
    to -inf) before sampling; `accept` is told each token the sequence accepted (raising
    RequestError ends that request alone); once `is_terminated()` the request finishes."""

    def apply(self, logits):
        ...

    def accept(self, token: int) -> None:
        ...

    def is_terminated(self) -> bool:
        ...


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens and its place in the cache. token_ids holds the prompt and then
    every accepted token; the first num_computed of them have K/V in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    logits_mask: Optional[LogitsMask] = None
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    status: Status = Status.WAITING
    finish_reason: Optional[str] = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    preemptions: int = 0
    cached_tokens: int = 0     # prompt tokens served from the prefix cache (first admission)
    admitted: bool = False
    detail: dict[str, Any] = field(default_factory=dict)  # the runner's per-request state
    # the prompt as the prefix cache hashes it, when it differs from prompt_ids (image
    # placeholders stand for the image's content: `MultimodalPrompt.key_ids`)
    prompt_key_ids: Optional[list[int]] = None
    # a sequence with the same prompt queued before this one (n > 1): this one waits for
    # it to compute the prompt's full blocks, then takes them from the prefix cache
    prefix_leader: Optional["Sequence"] = None
    # speculative decoding: tokens drafted to follow token_ids, verified in this step's
    # forward together with the pending last token (the runner sets and clears it)
    draft: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    @property
    def hash_ids(self) -> list[int]:
        """token_ids as the prefix cache keys them."""
        if self.prompt_key_ids is None:
            return self.token_ids
        return self.prompt_key_ids + self.token_ids[len(self.prompt_key_ids):]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def prefilling(self) -> bool:
        """True while more than the last token is left to compute."""
        return len(self.token_ids) - self.num_computed > 1


@dataclass
class WorkItem:
    sequence: Sequence
    start: int       # position of the first token computed
    count: int       # tokens computed this step
    sample: bool     # whether the last token's logits give the next token
    # a speculative verify: the pending token then these drafts (count = 1 + len), with
    # logits at every row
    draft: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        """The token ids this item computes."""
        seq = self.sequence
        if self.draft:
            return seq.token_ids[self.start:self.start + 1] + self.draft
        return seq.token_ids[self.start:self.start + self.count]

    @property
    def logits_wanted(self) -> int:
        """Rows of logits this item needs: every row of a verify, else the last if it
        samples."""
        return self.count if self.draft else int(self.sample)


@dataclass
class SchedulerOutput:
    items: list[WorkItem]
    preempted: list[Sequence]
    # sequences that can never continue: alone in the cache and still out of blocks
    out_of_memory: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, cache: PagedKVCache, *, max_running: int = 16, step_tokens: int = 512,
                 interleave_tokens: int = 64, max_model_len: int = 4096):
        if step_tokens < 1 or interleave_tokens < 1 or max_running < 1:
            raise ValueError("step_tokens, interleave_tokens and max_running must be >= 1")
        self.cache = cache
        self.max_running = max_running
        self.step_tokens = step_tokens
        self.interleave_tokens = interleave_tokens
        self.max_model_len = max_model_len
        self.prefill_tokens = step_tokens  # prefill budget of a step with no decoders
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_id: dict[str, Sequence] = {}
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.by_id:
            raise RequestError(f"request id {seq.request_id!r} is already in use")
        need = self.cache.blocks_for(len(seq.prompt_ids) + 1)
        if need > self.cache.num_blocks:
            raise RequestError(f"the prompt has {len(seq.prompt_ids)} tokens, more than the "
                               f"KV cache holds ({self.cache.num_blocks} blocks of "
                               f"{self.cache.block_size}); shorten it or enlarge the cache")
        self.by_id[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Optional[Sequence]:
        """Remove the request and free its blocks now; None if it is unknown or done."""
        seq = self.by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.cache.free(seq.blocks)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"
        on_free = seq.detail.pop("on_free", None)  # e.g. the adapter reference it held
        if on_free is not None:
            on_free()
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.abort(seq.request_id)
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        items: list[WorkItem] = []
        preempted: list[Sequence] = []
        decoding = [s for s in self.running if not s.prefilling]
        prefilling = [s for s in self.running if s.prefilling]
        budget = self.step_tokens
        for seq in decoding:
            if seq.status is not Status.RUNNING:  # preempted for an earlier sequence
                continue
            if not self._reserve(seq, 1, preempted):
                continue
            items.append(WorkItem(seq, seq.num_computed, 1, True))
            budget -= 1
        for it in items:  # drafts get blocks left over: they never cause a preemption
            seq = it.sequence
            if seq.draft and seq.status is Status.RUNNING and len(seq.draft) <= budget and \
                    self.cache.reserve(seq.blocks, seq.num_computed + 1 + len(seq.draft)):
                it.draft = list(seq.draft)
                it.count += len(it.draft)
                budget -= len(it.draft)
            else:
                seq.draft = []
        if items:  # decoders run this step: prefill only a slice, to keep their latency flat
            budget = min(budget, self.interleave_tokens)
        else:
            budget = min(budget, max(1, self.prefill_tokens))
        # someone waits and could be admitted: the running prefills get half, it gets the rest
        share = budget // 2 if self.waiting and len(self.running) < self.max_running \
            else budget
        capped: list[WorkItem] = []
        for seq in prefilling:
            if budget <= 0 or share <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue
            want = len(seq.token_ids) - seq.num_computed
            n = self._chunk(seq, min(want, budget, share))
            if not self._reserve(seq, n, preempted):
                continue
            item = WorkItem(seq, seq.num_computed, n, seq.num_computed + n == len(seq.token_ids))
            items.append(item)
            budget -= n
            share -= n
            if n < want:
                capped.append(item)
        while budget > 0 and self.waiting and len(self.running) < self.max_running \
                and not preempted:
            seq = self.waiting[0]
            recurrent = self.cache.recurrent
            if recurrent is not None and recurrent.num_free() == 0:
                break  # every recurrent-state slot is taken
            lead = seq.prefix_leader
            if lead is not None and lead.status is Status.RUNNING and lead.num_computed < \
                    len(lead.prompt_ids) // self.cache.block_size * self.cache.block_size:
                break  # its leader is computing the blocks it will share
            # prompt logprobs need every prompt position's logits: no cached prefix then
            if not seq.blocks.table and seq.params.prompt_logprobs is None:
                hit = self.cache.match_prefix(seq.hash_ids, seq.blocks)
                seq.num_computed = hit
                if not seq.admitted:
                    seq.cached_tokens = hit
            if recurrent is not None and seq.blocks.state_slot is None:
                seq.blocks.state_slot = recurrent.acquire()
                if seq.blocks.block_hashes:  # resume after the cached prefix
                    recurrent.restore(seq.blocks.state_slot, seq.blocks.block_hashes[-1])
            n = self._chunk(seq, min(len(seq.token_ids) - seq.num_computed, budget))
            if not self.cache.reserve(seq.blocks, seq.num_computed + n):
                self.cache.free(seq.blocks)  # keep nothing while it waits
                seq.num_computed = 0
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.admitted = True
            self.running.append(seq)
            items.append(WorkItem(seq, seq.num_computed, n,
                                  seq.num_computed + n == len(seq.token_ids)))
            budget -= n
        # what admission left goes back to the prefills that were held to half
        for item in capped:
            if budget <= 0 or preempted:
                break
            seq = item.sequence
            if seq.status is not Status.RUNNING:
                continue
            n = self._chunk(seq, min(len(seq.token_ids) - item.start, item.count + budget))
            if n <= item.count or not self.cache.reserve(seq.blocks, item.start + n):
                continue
            budget -= n - item.count
            item.count = n
            item.sample = item.start + n == len(seq.token_ids)
        # a sequence preempted after it was scheduled this step must not run
        items = [it for it in items if it.sequence.status is Status.RUNNING]
        stuck = []
        if not items and not self.running and self.waiting:
            # nothing runs, yet the head of the queue does not fit the whole pool: it has
            # grown past what the cache can hold, so it ends here instead of waiting forever
            seq = self.waiting[0]
            self.finish(seq, "length")
            stuck.append(seq)
        return SchedulerOutput(items, preempted, stuck)

    def _chunk(self, seq: Sequence, n: int) -> int:
        """With recurrent layers, prefill chunks end on block boundaries, so the state after
        them can be snapshotted for prefix reuse (a state inside a chunk is never seen): a
        chunk that stops short of the prompt's end is cut back to a boundary, and one that
        would reach the end stops first at the prompt's last full block (one more step,
        and a later request sharing the whole prompt restores the state there).
        Attention-only models take n as is."""
        if self.cache.recurrent is None:
            return n
        bs, done, total = self.cache.block_size, seq.num_computed, len(seq.token_ids)
        if done + n >= total:
            last_full = total // bs * bs
            return last_full - done if done < last_full < total else n
        aligned = (done + n) // bs * bs - done
        return aligned if aligned > 0 else n

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Blocks for seq's next n tokens, preempting the newest other running sequences
        as needed; False if seq itself had to be preempted."""
        while not self.cache.reserve(seq.blocks, seq.num_computed + n):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.cache.free(seq.blocks)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def complete(self, items: list[WorkItem]) -> None:
        """Mark the scheduled tokens computed and offer newly full blocks to the prefix
        cache. A verify item's count is what was kept of it (the pending token and the
        kept drafts, already appended to token_ids); blocks past that are released."""
        for it in items:
            seq = it.sequence
            if seq.status is not Status.RUNNING:
                continue
            seq.num_computed = it.start + it.count
            if it.draft:
                self.cache.trim(seq.blocks, seq.num_computed)
            new = self.cache.commit(seq.blocks, seq.hash_ids, seq.num_computed)
            recurrent = self.cache.recurrent
            if new and recurrent is not None and seq.blocks.state_slot is not None and \
                    seq.num_computed == len(seq.blocks.block_hashes) * self.cache.block_size:
                # the state is exactly the state after the newest full block: keep it
                taken = recurrent.snapshot(seq.blocks.state_slot, new[-1])
                if taken and seq.num_computed > len(seq.prompt_ids):
                    # past the prompt only the newest snapshot is worth its memory (a
                    # follow-up turn resumes from the end of the answer, not from inside
                    # it); each one is the whole recurrent state (19 MB for Qwen3.5-0.8B)
                    if seq.blocks.generated_snapshot is not None:
                        recurrent.drop_snapshot(seq.blocks.generated_snapshot)
                    seq.blocks.generated_snapshot = new[-1]
