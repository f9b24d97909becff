"""Speculative decoding's core half: the verify forward (k + 1 rows of logits), rollback
of the dense KV cache, of Qwen3.5's recurrent states (dense trail and paged slots) and of
paged blocks, the grammar mask through `TargetRows`, and the `register_drafters` contract.

The drafter here is the test's own: it drafts the plain greedy continuation with every
third draft corrupted, so that verifies keep some drafts and reject the rest, and verifies
greedily. Outputs must equal plain decoding token for token, in the single-request path and
under continuous batching beside plain requests, and no KV block may leak. (The real
drafters and the rejection sampler are the spec_decode plugin's, tested in its suite.)
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import fixture_with_tokenizer
from lattice_engine import hookimpl
from lattice_engine.batching import BatchingOptions
from lattice_engine.cache.paged import PagedKVCache, SequenceBlocks
from lattice_engine.cache.recurrent import RecurrentStateSlots
from lattice_engine.config import config_from_dict
from lattice_engine.engine import Engine
from lattice_engine.errors import ConfigError, PluginError, RequestError
from lattice_engine.plugins import PluginManager
from lattice_engine.sampling import SamplingParams, make_sampler
from lattice_engine.speculative import (Draft, DraftLength, SpeculativeOptions, TargetRows,
                                        run_verify)
from lattice_engine.testing.tolerance import logits_bound, model_path, network_bound


class ScriptDrafter:
    """Drafts `script[prompt]` (the plain greedy continuation) after the tokens seen so
    far, corrupting every third draft; verifies greedily (keep while the processed argmax
    equals the draft, then that argmax)."""

    wants_hidden = False

    def __init__(self, script: dict, vocab: int, fail_on: int = -1):
        self.script, self.vocab, self.fail_on = script, vocab, fail_on
        self.released = []
        self.calls = 0

    def propose(self, request, k):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("drafter broke")
        ids = list(request.token_ids)
        for prompt, cont in self.script.items():
            full = list(prompt) + list(cont)
            if full[:len(ids)] == ids:
                nxt = full[len(ids):len(ids) + k]
                return Draft([(t + 1) % self.vocab if (len(ids) + j) % 3 == 2 else t
                              for j, t in enumerate(nxt)])
        return Draft([])

    def verify(self, rows, draft, rng):
        out = []
        for i, t in enumerate(draft.tokens):
            best = int(np.argmax(rows.processed(i)))
            out.append(best)
            if best != t:
                return out
        out.append(int(np.argmax(rows.processed(len(draft.tokens)))))
        return out

    def accepted(self, request, drafted, kept):
        assert 0 <= kept <= drafted

    def release(self, request):
        self.released.append(request.request_id)


def engine_with_script(folder, script_holder):
    pm = PluginManager(load_entry_points=False)

    class Plugin:
        @hookimpl
        def register_drafters(register):
            register("script", lambda target, tok, opts: script_holder["drafter"])

    pm.register(Plugin, "script-drafter")
    return Engine.load(str(folder), plugin_manager=pm)


PROMPTS = ["The quick brown fox jumps", "abcabcabc", "Hello", "0123456789" * 3]


@pytest.fixture(scope="module", params=["llama", "qwen3_5_text"])
def setup(request, tmp_path_factory):
    folder = fixture_with_tokenizer(request.param, tmp_path_factory.mktemp(request.param),
                                    eos_token_id=-1)  # random weights: never stop early
    holder = {}
    eng = engine_with_script(folder, holder)
    script = {}
    for p in PROMPTS:
        ids = eng.prompt_ids(p)
        script[tuple(ids)] = eng.generate(ids, max_tokens=40, speculative=False).tokens
    holder["drafter"] = ScriptDrafter(script, eng.model.config.vocab_size)
    return eng, script, holder


def test_single_request_equals_plain_decoding(setup):
    eng, script, holder = setup
    for prompt, plain in script.items():
        got = eng.generate(list(prompt), max_tokens=40,
                           speculative={"method": "script", "num_draft_tokens": 4})
        assert got.tokens == plain
        assert len(got.logprobs) == len(plain)
    stats = eng.speculation_for({"method": "script", "num_draft_tokens": 4}).stats
    assert 0 < stats.accepted < stats.drafted  # some drafts kept, some rejected


def test_single_request_logprobs_equal_plain(setup):
    """The verify rows are the logits decoding computes, up to float32 reordering (the
    dense verify runs the per-kernel path, a decode step the fused one)."""
    eng, script, _ = setup
    prompt = next(iter(script))
    plain = eng.generate(list(prompt), max_tokens=20, speculative=False)
    spec = eng.generate(list(prompt), max_tokens=20, speculative={"method": "script"})
    full = list(prompt) + plain.tokens
    hidden = eng.model.hidden_states(np.asarray([full]), eng.model.make_cache(1))
    bound = 2 * logits_bound(eng.model, hidden[0], len(full))  # both ends of a log-softmax
    assert np.abs(np.subtract(spec.logprobs, plain.logprobs)).max() <= bound


def run_batch(eng, requests, options, logprobs=None):
    eng.start_batching(options)
    ids = [eng.add_request(list(p), **kw) for p, kw in requests]
    got = {i: [] for i in ids}
    lp = {i: [] for i in ids}
    usage = {}
    for _ in range(10_000):
        if not eng.has_unfinished():
            break
        for out in eng.step():
            got[out.request_id] += out.token_ids
            lp[out.request_id] += out.logprobs
            if out.finished:
                usage[out.request_id] = (out.completion_tokens, out.finish_reason)
    assert eng.runner.cache.stats()["blocks_used"] == 0, "a finished request kept KV blocks"
    if logprobs is not None:
        logprobs += [lp[i] for i in ids]
    return [got[i] for i in ids], [usage[i] for i in ids]


@pytest.mark.parametrize("block_size", [4, 16])
def test_batching_mixed_speculative_and_plain_equals_plain(setup, block_size):
    eng, script, _ = setup
    opts = BatchingOptions(kv_cache_tokens=2048, block_size=block_size, step_tokens=32,
                           interleave_tokens=8)
    # adaptive off: the counts below must not depend on measured step times
    spec = {"method": "script", "num_draft_tokens": 3, "adaptive": False}
    requests = [(p, dict(max_tokens=40, speculative=spec if i % 2 == 0 else False))
                for i, p in enumerate(script)]
    requests += [(p, dict(max_tokens=17, speculative=spec)) for p in script]
    stats = eng.speculation_for(spec).stats
    before = (stats.verifies, stats.accepted, stats.drafted)
    spec_lp, plain_lp = [], []
    tokens, usage = run_batch(eng, requests, opts, spec_lp)
    verifies, accepted, drafted = (a - b for a, b in zip(
        (stats.verifies, stats.accepted, stats.drafted), before))
    assert verifies > 0 and 0 < accepted < drafted
    plain = [script[p][:kw["max_tokens"]] for p, kw in requests]
    assert tokens == plain
    # a verify row has the bits of the decode row it stands for (batch invariance: every
    # matmul sums a row in one order whatever M, attention reads only the row's sequence,
    # the recurrence of a verify runs token by token as decoding does)
    run_batch(eng, [(p, dict(kw, speculative=False)) for p, kw in requests], opts, plain_lp)
    assert spec_lp == plain_lp
    assert [u for u, _ in usage] == [len(t) for t in plain]
    assert all(reason == "length" for _, reason in usage)


def test_batching_speculation_survives_preemption(setup):
    eng, script, _ = setup
    opts = BatchingOptions(kv_cache_tokens=96, block_size=4, step_tokens=32,
                           interleave_tokens=8)
    spec = {"method": "script", "num_draft_tokens": 4}
    requests = [(p, dict(max_tokens=40, speculative=spec)) for p in script]
    tokens, _ = run_batch(eng, requests, opts)
    assert tokens == [script[p] for p, _ in requests]


def test_a_failing_drafter_ends_only_its_request(setup):
    eng, script, holder = setup
    good = holder["drafter"]
    holder["drafter"] = ScriptDrafter(good.script, good.vocab, fail_on=3)
    try:
        eng._speculations.clear()
        opts = BatchingOptions(kv_cache_tokens=2048, block_size=4, step_tokens=32)
        prompts = list(script)
        eng.start_batching(opts)
        # adaptive = false: the drafter is asked every step, whatever the tiny model's timing
        a = eng.add_request(list(prompts[0]), max_tokens=30,
                            speculative={"method": "script", "adaptive": False})
        b = eng.add_request(list(prompts[1]), max_tokens=30, speculative=False)
        outs = {a: [], b: []}
        while eng.has_unfinished():
            for out in eng.step():
                outs[out.request_id].append(out)
        assert outs[a][-1].finish_reason == "error" and "details" in outs[a][-1].error
        assert outs[b][-1].finish_reason == "length"
        assert [t for o in outs[b] for t in o.token_ids] == script[prompts[1]][:30]
        assert eng.runner.cache.stats()["blocks_used"] == 0
    finally:
        holder["drafter"] = good
        eng._speculations.clear()


# --- rollback primitives ----------------------------------------------------------------

def test_hybrid_trail_rollback_is_bit_identical_to_decoding(tmp_path):
    """A recorded verify of 5 tokens cut back to m leaves the recurrent states and the next
    logits bit for bit as decoding those m tokens one at a time (the fused step)."""
    eng = Engine.load(str(fixture_with_tokenizer("qwen3_5_text", tmp_path)))
    model = eng.model
    prompt = np.array([[5, 6, 7, 8, 9, 10]], np.int64)
    extra = [11, 12, 13, 14, 15]
    for m in range(0, 5):
        a = model.make_cache(1)
        model.forward(prompt, a)
        a.record_next()
        model.forward(np.array([extra], np.int64), a)
        a.truncate(prompt.shape[1] + m)
        b = model.make_cache(1)
        model.forward(prompt, b)
        for t in extra[:m]:
            model.forward(np.array([[t]], np.int64), b)
        for x, y in zip(a.conv + a.delta, b.conv + b.delta):
            assert np.array_equal(x, y), f"state differs after keeping {m} tokens"
        nxt = np.array([[42]], np.int64)
        assert np.array_equal(model.forward(nxt, a), model.forward(nxt, b))


def test_hybrid_verify_without_truncate_keeps_every_row(tmp_path):
    """A recorded forward that is not cut back counts whole: the next forward (or a
    snapshot) first replays all its rows on the delta states, as decoding them would."""
    eng = Engine.load(str(fixture_with_tokenizer("qwen3_5_text", tmp_path)))
    model = eng.model
    prompt = np.array([[5, 6, 7, 8, 9, 10]], np.int64)
    extra = [11, 12, 13]
    a = model.make_cache(1)
    model.forward(prompt, a)
    a.record_next()
    model.forward(np.array([extra], np.int64), a)
    snap = a.snapshot()
    b = model.make_cache(1)
    model.forward(prompt, b)
    for t in extra:
        model.forward(np.array([[t]], np.int64), b)
    for x, y in zip(snap.conv + snap.delta, b.conv + b.delta):
        assert np.array_equal(x, y)
    nxt = np.array([[42]], np.int64)
    assert np.array_equal(model.forward(nxt, a), model.forward(nxt, b))


def test_hybrid_cache_refuses_a_truncation_without_a_trail(tmp_path):
    eng = Engine.load(str(fixture_with_tokenizer("qwen3_5_text", tmp_path)))
    cache = eng.model.make_cache(1)
    eng.model.forward(np.array([[1, 2, 3]], np.int64), cache)
    with pytest.raises(ValueError, match="record_next"):
        cache.truncate(1)


def test_recurrent_slot_rollback_restores_the_kept_row():
    slots = RecurrentStateSlots([(2,), (3, 2)], num_slots=2)
    s = slots.acquire()
    slots.state(s)[0][:] = 1
    slots.start_trail(s, 3)
    for row in range(3):
        for i, a in enumerate(slots.state(s)):
            a += 1
            slots.keep(s, i, row)
    slots.rollback(s, 1)
    assert np.all(slots.state(s)[0] == 2) and np.all(slots.state(s)[1] == 1)
    with pytest.raises(ValueError, match="no verify trail"):
        slots.rollback(s, 0)


def test_paged_trim_releases_only_blocks_past_the_kept_tokens():
    cache = PagedKVCache(1, 1, 4, num_blocks=8, block_size=4)
    seq = SequenceBlocks()
    assert cache.reserve(seq, 14)
    assert len(seq.table) == 4
    cache.commit(seq, list(range(14)), 8)  # two full blocks registered
    cache.trim(seq, 9)
    assert len(seq.table) == 3 and cache.pool.num_free() == 5
    with pytest.raises(ValueError, match="committed"):
        cache.trim(seq, 4)


# --- target rows and the grammar-style mask ---------------------------------------------

class AllowMask:
    """A grammar-style mask: allows `allowed` tokens at every step; counts steps and
    rolls back like a GrammarMatcher."""

    def __init__(self, allowed, vocab):
        self.allowed = np.zeros(vocab, bool)
        self.allowed[list(allowed)] = True
        self.steps = 0
        self.accepted = []

    def apply(self, logits):
        logits[~self.allowed] = -np.inf

    def accept(self, token):
        if not self.allowed[token]:
            raise RequestError(f"token {token} is masked")
        self.steps += 1
        self.accepted.append(token)

    def rollback(self, n):
        self.steps -= n
        del self.accepted[len(self.accepted) - n:]

    def is_terminated(self):
        return False


def test_target_rows_mask_and_processors_match_plain_sampling():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 16)).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.3)
    sampler = make_sampler(params)
    mask = AllowMask(range(2, 12), 16)
    draft = Draft([3, 5, 7])
    rows = TargetRows(logits, [1, 2, 3], draft, sampler, mask)
    for i in range(4):
        got = rows.probs(i)
        masked = logits[i].copy()
        masked[:2] = masked[12:] = -np.inf
        want = sampler.probabilities(sampler.process([1, 2, 3] + draft.tokens[:i], masked))
        assert np.array_equal(got, want)
    assert mask.accepted == [3, 5, 7]

    class KeepOne:  # keeps the first draft, then adds token 9
        def verify(self, rows, draft, rng):
            rows.probs(3)
            return [draft.tokens[0], 9]

    out, kept = run_verify(KeepOne(), rows, draft, sampler.rng)
    assert (out, kept) == ([3, 9], 1)
    assert mask.accepted == [3, 9] and mask.steps == 2


def test_run_verify_refuses_a_drafter_that_changes_the_drafts():
    sampler = make_sampler(SamplingParams())
    rows = TargetRows(np.zeros((3, 8), np.float32), [1], Draft([2, 3]), sampler)

    class Liar:
        def verify(self, rows, draft, rng):
            return [4, 5, 6]

    with pytest.raises(RuntimeError, match="prefix of the drafts"):
        run_verify(Liar(), rows, Draft([2, 3]), sampler.rng)


def test_sampler_process_and_probabilities_are_what_it_samples():
    logits = np.random.default_rng(1).normal(size=32).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=10, seed=5)
    a, b = make_sampler(params), make_sampler(params)
    p = b.probabilities(b.process([], logits))
    draws = [a([], logits) for _ in range(50)]
    assert draws == [int(b.rng.choice(p.size, p=p)) for _ in range(50)]
    g = make_sampler(SamplingParams())
    assert g.kind == "greedy" and g.probabilities(g.process([], logits))[np.argmax(logits)] == 1


def test_draft_length_backs_off_and_probes_again():
    length = DraftLength(4)
    assert 1 <= length.next() <= 4
    for _ in range(20):
        length.update(4, 4)
    assert length.next() == 4
    for _ in range(20):
        length.update(length.next() or 1, 0)
    seen = [length.next() for _ in range(40)]
    assert 0 in seen and any(k > 0 for k in seen)  # off for a while, then a probe
    assert DraftLength(3, adaptive=False).next() == 3


# --- options and the contract -----------------------------------------------------------

def test_config_section_and_bad_options():
    cfg = config_from_dict({"speculative": {"method": "ngram", "num_draft_tokens": 3,
                                            "prompt_lookup_max": 5}})
    assert cfg.speculative.options == {"prompt_lookup_max": 5}
    with pytest.raises(ConfigError, match=r"num_draft_tokens=0 .*\[1, 16\]"):
        config_from_dict({"speculative": {"num_draft_tokens": 0}})
    pm = PluginManager(load_entry_points=False)
    cfg = config_from_dict({"speculative": {"method": "nope"}})
    with pytest.raises(ConfigError, match="'nope' is not a registered drafter"):
        cfg.validate(pm.registry)


def test_unknown_drafter_is_a_clear_error(tiny_model_dir):
    pm = PluginManager(load_entry_points=False)
    with pytest.raises(ConfigError, match="'nope' is not a registered drafter"):
        Engine.load(str(tiny_model_dir), plugin_manager=pm,
                    speculative=SpeculativeOptions(method="nope"))
    eng = Engine.load(str(tiny_model_dir), plugin_manager=pm)
    with pytest.raises(RequestError, match="'nope' is not a registered drafter"):
        eng.generate("hi", max_tokens=2, speculative={"method": "nope"})
    with pytest.raises(RequestError, match="unknown speculative field"):
        eng.generate("hi", max_tokens=2, speculative={"methd": "ngram"})


def test_a_drafter_factory_must_build_a_drafter(tiny_model_dir):
    pm = PluginManager(load_entry_points=False)

    class Plugin:
        @hookimpl
        def register_drafters(register):
            register("half", lambda target, tok, opts: object())

    pm.register(Plugin, "half-drafter")
    with pytest.raises(PluginError, match="lacks propose, verify, accepted, release"):
        Engine.load(str(tiny_model_dir), plugin_manager=pm,
                    speculative=SpeculativeOptions(method="half"))

    class NotCallable:
        @hookimpl
        def register_drafters(register):
            register("bad", 3)

    pm2 = PluginManager(load_entry_points=False)
    pm2.register(NotCallable, "bad-drafter")
    with pytest.raises(PluginError, match="not a factory"):
        pm2.registry


def test_batch_draft_lengths_switch_off_when_rows_are_dear():
    from lattice_engine.speculative import batch_draft_lengths, expected_kept
    assert expected_kept(0.5, 3) == 0.5 + 0.25 + 0.125
    # memory-bound: 8 more rows cost 10% more, acceptance 0.7 -> speculate fully
    cheap = lambda rows: 1.0 + 0.0125 * rows  # noqa: E731
    assert batch_draft_lengths([4, 4], [0.7, 0.7], 2, cheap) == [4, 4]
    # compute-bound: every row costs as much as the step -> no drafts at all
    dear = lambda rows: 0.1 * rows  # noqa: E731
    assert batch_draft_lengths([4, 4, 4], [0.6, 0.6, 0.6], 8, dear) == [0, 0, 0]
    # cheap rows but a draft model that costs a step per drafted token: not worth it
    assert batch_draft_lengths([4, 4], [0.7, 0.7], 2, cheap, [1.0, 1.0]) == [0, 0]
    # unmeasured: drafts go ahead (the step then gets measured)
    assert batch_draft_lengths([3], [0.1], 1, lambda rows: None) == [3]


class TimedScript(ScriptDrafter):
    """Drafts the script's continuation exactly; sleeps `first` seconds in the first
    propose of each request (a draft model reading the prompt), `each` in every call,
    `per_token` for each token it is asked for, and `spike` more in the calls `slow_calls`
    (counted from 1: a busy machine)."""

    def __init__(self, *args, first=0.0, each=0.0, per_token=0.0, spike=0.0, slow_calls=(),
                 **kw):
        super().__init__(*args, **kw)
        self.first, self.each, self.per_token, self.seen = first, each, per_token, set()
        self.spike, self.slow_calls = spike, slow_calls

    def propose(self, request, k):
        self.calls += 1
        first = request.request_id not in self.seen
        time.sleep(self.each + self.per_token * k + (self.first if first else 0.0) +
                   (self.spike if self.calls in self.slow_calls else 0.0))
        self.seen.add(request.request_id)
        ids = list(request.token_ids)
        for prompt, cont in self.script.items():
            full = list(prompt) + list(cont)
            if full[:len(ids)] == ids:
                return Draft(full[len(ids):len(ids) + k])
        return Draft([])


def memory_bound_steps(monkeypatch):
    """Step costs as on a big model (a step 20 ms, a verify row 0.2 ms more), so the batch
    plan's choices depend on the drafter's time alone, not on the tiny model's timing."""
    from lattice_engine.prefill_pacer import PrefillPacer
    monkeypatch.setattr(PrefillPacer, "step_time", lambda self, rows: 0.02 + 0.0002 * rows)
    monkeypatch.setattr(PrefillPacer, "has_measured_near", lambda self, rows: True)


def run_timed(eng, holder, drafter, spec, max_tokens):
    good = holder["drafter"]
    holder["drafter"] = drafter
    try:
        eng._speculations.clear()
        prompt = list(next(iter(holder["drafter"].script)))
        tokens, _ = run_batch(eng, [(prompt, dict(max_tokens=max_tokens, speculative=spec))],
                              BatchingOptions(kv_cache_tokens=1024, block_size=4))
        assert tokens == [drafter.script[tuple(prompt)][:max_tokens]]
        return eng.speculation_for(spec).stats
    finally:
        holder["drafter"] = good
        eng._speculations.clear()


def test_a_slow_first_draft_does_not_switch_speculation_off(setup, monkeypatch):
    """A draft model's first propose of a request reads the whole prompt; the batch plan
    must not take that for the cost of every drafted token (it then refused every later
    draft, and nothing re-measured the cost)."""
    eng, _, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab, first=0.3)
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    # drafts are exact: about 5 tokens per verify once the step costs are measured
    assert stats.emitted >= 30 and stats.verifies <= 12


def test_speculation_refused_for_a_while_probes_again(setup, monkeypatch):
    """Drafting that was cheap and then dear for a moment (call 3: the machine was busy)
    gets the plan to refuse drafts; since it was cheaper before, after PROBE_AFTER refused
    steps one sequence drafts anyway, its cost replaces the stale estimate, and
    speculation resumes."""
    from lattice_engine.spec_batching import PROBE_AFTER
    eng, _, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab, spike=0.5,
                          slow_calls=(3,))
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    # 3 verifies (about 15 tokens: the first two measure the drafter), PROBE_AFTER plain
    # steps, then verifies again
    assert PROBE_AFTER < 40 - 15
    assert stats.verifies > 3 and stats.emitted > 15


def test_a_refusal_for_dear_rows_is_not_probed_until_the_longest_wait(setup, monkeypatch):
    """When the verify rows alone make drafting a loss (a compute-bound batch), a cheaper
    drafter could not change the plan: no probe before PROBE_MAX refused steps."""
    from lattice_engine.prefill_pacer import PrefillPacer
    from lattice_engine.spec_batching import PROBE_AFTER, PROBE_MAX
    eng, _, holder = setup
    monkeypatch.setattr(PrefillPacer, "step_time", lambda self, rows: 0.01 * rows)
    monkeypatch.setattr(PrefillPacer, "has_measured_near", lambda self, rows: True)
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab, first=0.2)
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    assert PROBE_AFTER < 40 < PROBE_MAX
    assert stats.verifies == 0  # every row costs a step: never worth it, never probed


def test_a_drafter_dear_at_its_cheapest_is_not_probed(setup, monkeypatch):
    """A drafter that never once cost little enough to pay (every call a fifth of a
    second on 20 ms steps) is measured once and then left alone: probing it again could
    only cost what it can never win."""
    eng, _, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab, each=0.2)
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    assert stats.verifies == 2  # the two steps that measured it


class WrongFirst(TimedScript):
    """Drafts wrong tokens in its first `wrong` calls, then the script exactly."""

    def propose(self, request, k):
        draft = super().propose(request, k)
        if self.calls <= self.wrong:
            return Draft([(t + 1) % self.vocab for t in draft.tokens])
        return draft


def test_a_refusal_for_low_acceptance_is_probed(setup, monkeypatch):
    """Acceptance estimates go stale while nothing drafts: a sequence whose first drafts
    missed (the plan then refuses its drafts, whose cost is the same) drafts again after
    PROBE_AFTER refused steps, and keeps drafting once its drafts are kept."""
    eng, _, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = WrongFirst(holder["drafter"].script, holder["drafter"].vocab, per_token=0.0075)
    drafter.wrong = 2
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    assert stats.verifies >= 6 and stats.accepted > 0


def test_a_drafter_whose_own_estimate_loses_is_never_tried(setup, monkeypatch):
    """A drafter that says one token costs two target steps (contract.Drafter.relative_cost)
    is not tried where that cost would lose: nothing to explore, no catch-up paid."""
    eng, _, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab)
    drafter.relative_cost = 2.0
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    assert stats.verifies == 0
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab)
    drafter.relative_cost = 0.05  # a cheap one is tried, and kept
    stats = run_timed(eng, holder, drafter, {"method": "script", "num_draft_tokens": 4}, 40)
    assert stats.verifies >= 4


class LoggedScript(TimedScript):
    def propose(self, request, k):
        self.log.append(request.request_id)
        return super().propose(request, k)


def test_a_drafter_never_measured_explores_with_one_sequence(setup, monkeypatch):
    """Before its cost is known, a drafter drafts for one sequence for two steps (its
    catch-up, then a measured step), not for the whole batch at once: a draft model
    reading eight prompts on a guess cost 1.6 s at 8 streams."""
    eng, script, holder = setup
    memory_bound_steps(monkeypatch)
    drafter = LoggedScript(holder["drafter"].script, holder["drafter"].vocab)
    drafter.log = []
    holder_drafter, holder["drafter"] = holder["drafter"], drafter
    try:
        eng._speculations.clear()
        spec = {"method": "script", "num_draft_tokens": 4}
        requests = [(list(p), dict(max_tokens=20, speculative=spec)) for p in script]
        tokens, _ = run_batch(eng, requests, BatchingOptions(kv_cache_tokens=1024,
                                                             block_size=4))
        assert tokens == [list(c)[:20] for c in script.values()]
    finally:
        holder["drafter"] = holder_drafter
        eng._speculations.clear()
    assert len(drafter.log) > 2 and drafter.log[0] == drafter.log[1]
    assert len(set(drafter.log)) == len(script)  # then every sequence drafts


def test_a_catch_up_is_weighed_over_the_steps_it_serves():
    from lattice_engine.speculative import batch_draft_lengths, catch_up_share
    step = lambda rows: 0.058 + 0.0015 * (rows - 1)  # noqa: E731  (a 1.5B q8_0 target)
    # a draft model reading a 200-token prompt (1.5 ms a token) for a 256-token answer
    share = catch_up_share(200, 0.0015, 256, 0.8, 4)
    assert share == pytest.approx(0.3 / (256 / (1 + 0.8 + 0.64 + 0.512 + 0.4096)))
    assert batch_draft_lengths([4], [0.8], 1, step, [0.008], [share]) == [4]
    # the same catch-up for the last 3 tokens of an answer does not pay
    late = catch_up_share(200, 0.0015, 3, 0.8, 4)
    assert batch_draft_lengths([4], [0.8], 1, step, [0.008], [late]) == [0]
    assert catch_up_share(0, 0.0015, 100, 0.8, 4) == 0.0  # drafting every step: none


def test_drafting_time_stays_out_of_the_step_costs(setup):
    """The pacer learns what rows through the model cost; a verify's rows count as
    computed (all k + 1), and the drafter's own time is not part of them."""
    eng, _, holder = setup
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab, each=0.2)
    spec = {"method": "script", "num_draft_tokens": 3, "adaptive": False}
    stats = run_timed(eng, holder, drafter, spec, 12)
    assert stats.verifies >= 2
    assert eng.runner.pacer.step_time(4) < 0.2  # the tiny model's step: milliseconds


def test_the_plan_measures_plain_steps_before_it_trusts_them():
    """Under continuous batching every step may speculate, so the only steps measured are
    verify steps of many more rows than there are decoders; the cost of plain decoding must
    not be read off them (8 streams took a 39-row verify for the cost of 8 rows and
    speculated at 0.8x plain). step_time interpolates between measured counts, and a step
    whose decoder count was never measured plainly is run plainly once."""
    from lattice_engine.prefill_pacer import PrefillPacer
    pacer = PrefillPacer(max_rise=2.0, cap=64)
    for _ in range(3):
        pacer.record(decode_rows=39, prefill_rows=0, seconds=0.34)
    assert not pacer.has_measured_near(8) and pacer.has_measured_near(36)
    pacer.record(decode_rows=8, prefill_rows=0, seconds=0.12)
    assert pacer.has_measured_near(8) and pacer.has_measured_near(7)
    assert pacer.step_time(8) == pytest.approx(0.12)
    assert pacer.step_time(20) == pytest.approx(0.12 + (0.34 - 0.12) * 12 / 31)


def test_a_batch_that_only_ever_verified_gets_a_plain_step(setup):
    eng, _, holder = setup
    drafter = TimedScript(holder["drafter"].script, holder["drafter"].vocab)
    spec = {"method": "script", "num_draft_tokens": 4}
    run_timed(eng, holder, drafter, spec, 30)
    pacer = eng.runner.pacer
    assert pacer.has_measured_near(1)  # the one decoder's plain step, measured


def test_break_even_sets_how_far_to_draft_from_measured_costs():
    from lattice_engine.speculative import break_even
    # memory-bound 0.5B: a verify row costs 1.8 ms, a token 21 ms; n-gram drafting is free
    small = lambda rows: 0.021 + 0.0018 * (rows - 1)  # noqa: E731
    assert break_even(1, small, 0.0) == pytest.approx(0.0018 / 0.021)
    # a draft model at 17.7 ms a token on a 66 ms target: a draft must be likelier kept
    big = lambda rows: 0.066 + 0.0046 * (rows - 1)  # noqa: E731
    assert break_even(1, big, 0.0177) == pytest.approx((0.0046 + 0.0177) / 0.066)
    # 8 streams: a token costs an eighth of the step, so the same row is dearer
    assert break_even(8, small, 0.0) == pytest.approx(0.0018 / (small(8) / 8))
    assert break_even(1, lambda rows: None, 0.0) is None
    length = DraftLength(16)
    length.rate = 0.76
    assert length.next() == 5  # the configured floor 0.25: 0.76^5 = 0.25
    assert length.next(break_even(1, small, 0.0)) == 8  # 0.76^8 = 0.11 >= 0.086
    assert length.next(0.9) == 1  # at least one draft (the verify measures acceptance)


class HiddenScript(ScriptDrafter):
    """A script drafter that reads the target's hidden states, as an MTP head would, and
    records the last row it was handed at each propose."""

    wants_hidden = True

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def propose(self, request, k):
        assert request.hidden is not None and request.hidden.ndim == 2
        self.seen.append((list(request.token_ids), request.hidden[-1].copy()))
        return super().propose(request, k)


def test_a_drafter_inside_the_model_reads_its_hidden_states(setup):
    """The hidden row handed to a wants_hidden drafter is the target's final hidden state at
    the last computed position (the token before the pending one), alone and batched."""
    eng, script, holder = setup
    good = holder["drafter"]
    drafter = holder["drafter"] = HiddenScript(good.script, good.vocab)
    try:
        eng._speculations.clear()
        prompt = list(next(iter(script)))
        spec = {"method": "script", "num_draft_tokens": 3, "adaptive": False}
        assert eng.generate(prompt, max_tokens=20, speculative=spec).tokens == \
            script[tuple(prompt)][:20]
        eng.start_batching(BatchingOptions(kv_cache_tokens=1024, block_size=4))
        for p in script:
            eng.add_request(list(p), max_tokens=15, speculative=spec)
        while eng.has_unfinished():
            eng.step()
        assert len(drafter.seen) > 10
        model = eng.model
        for tokens, row in drafter.seen[::3]:
            want = model.hidden_states(np.asarray([tokens[:-1]]), model.make_cache(1))[0, -1]
            bound = network_bound(np.abs(want), model_path(model.config, len(tokens)))
            assert np.abs(row - want).max() <= bound
    finally:
        holder["drafter"] = good
        eng._speculations.clear()


def test_cli_flags_override_the_speculative_section(tmp_path, monkeypatch):
    from lattice_engine.cli.parser import build_parser
    from lattice_engine.cli.settings import load_settings
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lattice.toml").write_text(
        '[speculative]\nmethod = "draft_model"\nmodel = "x"\nnum_draft_tokens = 5\n')
    args = build_parser().parse_args(["serve", "m", "--num-draft-tokens", "3"])
    spec = load_settings(args).speculative
    assert (spec.method, spec.num_draft_tokens, spec.options) == ("draft_model", 3, {"model": "x"})
    args = build_parser().parse_args(["generate", "hi", "--model", "m", "--speculative", "ngram"])
    spec = load_settings(args).speculative
    assert (spec.method, spec.num_draft_tokens, spec.options) == ("ngram", 5, {})
