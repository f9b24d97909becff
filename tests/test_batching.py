"""Continuous batching on the tiny golden checkpoints: outputs equal each request run
alone, preemption under a small KV pool, abort, prefix reuse, the logits-mask hook, and no
leaked block at the end."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_with_tokenizer
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.errors import RequestError


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = fixture_with_tokenizer("llama", tmp_path_factory.mktemp("batching"),
                                    eos_token_id=-1)  # random weights: never stop early
    return Engine.load(str(folder))


def run_all(engine, options, requests):
    """Add every request, step to the end; returns {request_id: (text, tokens, finish)}."""
    engine.start_batching(options)
    ids = [engine.add_request(prompt, **kw) for prompt, kw in requests]
    texts = {i: ["", [], None] for i in ids}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id][0] += out.text
            texts[out.request_id][1] += out.token_ids
            if out.finished:
                texts[out.request_id][2] = out.finish_reason
        steps += 1
        assert steps < 10_000
    stats = engine.runner.cache.stats()
    assert stats["blocks_used"] == 0, "a finished request kept KV blocks"
    return [tuple(texts[i]) for i in ids]


REQUESTS = [
    ("The quick brown fox", dict(max_tokens=12)),
    ("a" * 41, dict(max_tokens=5)),
    ("Hello", dict(max_tokens=20)),
    ("0123456789" * 7, dict(max_tokens=9)),
    ("sampled with a seed", dict(max_tokens=15, temperature=0.9, top_p=0.95, seed=7)),
    ("xyz", dict(max_tokens=1)),
    ("stop strings too", dict(max_tokens=25, stop=["e"])),
    ("another seeded one", dict(max_tokens=10, temperature=1.2, seed=123)),
]


def alone(engine, options, requests):
    return [run_all(engine, options, [r])[0] for r in requests]


def test_batched_outputs_equal_each_request_alone(engine):
    opts = BatchingOptions(kv_cache_tokens=1024, block_size=4, step_tokens=24,
                           interleave_tokens=8)
    batched = run_all(engine, opts, REQUESTS)
    assert batched == alone(engine, opts, REQUESTS)
    assert all(len(toks) >= 1 for _, toks, _ in batched)
    assert [f for _, _, f in batched][:6] == ["length"] * 6


def logits_rows(engine, options, requests):
    """Every logits row each request sampled from, in order (a spy on the runner)."""
    runner = engine.start_batching(options)
    rows: dict[str, list[np.ndarray]] = {}
    sample = runner._sample

    def spy(seq, row, now):
        rows.setdefault(seq.request_id, []).append(row.copy())
        return sample(seq, row, now)

    runner._sample = spy
    ids = [engine.add_request(prompt, **kw) for prompt, kw in requests]
    while engine.has_unfinished():
        engine.step()
    return [rows[i] for i in ids]


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_batched_logits_are_bit_identical_to_alone(tmp_path_factory, quant):
    """Not just the same tokens: a request's logits have the same bits whatever else is in
    the step (decode rows of 1..8 sequences, and decode rows beside prefill chunks, which
    run the many-rows matmul path)."""
    folder = fixture_with_tokenizer("llama", tmp_path_factory.mktemp(f"bits-{quant}"),
                                    eos_token_id=-1)
    eng = Engine.load(str(folder), quant=quant)
    opts = BatchingOptions(kv_cache_tokens=1024, block_size=4, step_tokens=24,
                           interleave_tokens=8)
    batched = logits_rows(eng, opts, REQUESTS)
    single = [logits_rows(eng, opts, [r])[0] for r in REQUESTS]
    for (prompt, _), b, a in zip(REQUESTS, batched, single):
        assert len(b) == len(a)
        for t, (x, y) in enumerate(zip(b, a)):
            assert np.array_equal(x, y), \
                f"{quant} {prompt!r} token {t}: batched logits differ from alone " \
                f"(max |diff| {np.abs(x - y).max():.3g})"


def test_preemption_under_a_small_pool_still_completes_every_request(engine):
    opts = BatchingOptions(kv_cache_tokens=96, block_size=4, step_tokens=32,
                           interleave_tokens=8)
    batched = run_all(engine, opts, REQUESTS)
    assert engine.runner.scheduler.preemptions > 0, "the pool was meant to run out"
    assert batched == alone(engine, BatchingOptions(kv_cache_tokens=1024, block_size=4,
                                                    step_tokens=32, interleave_tokens=8),
                            REQUESTS)


def test_abort_frees_blocks_at_once(engine):
    engine.start_batching(BatchingOptions(kv_cache_tokens=256, block_size=4))
    keep = engine.add_request("kept going", max_tokens=6)
    drop = engine.add_request("dropped" * 5, max_tokens=50)
    for _ in range(3):
        engine.step()
    used = engine.runner.cache.pool.num_used()
    assert engine.abort(drop)
    assert engine.runner.cache.pool.num_used() < used
    assert not engine.abort(drop)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert {o.request_id for o in outs} == {keep}
    assert engine.runner.cache.pool.num_used() == 0


def test_shared_prefix_is_computed_once(engine):
    opts = BatchingOptions(kv_cache_tokens=512, block_size=4)
    prefix = "shared system prompt " * 3
    engine.start_batching(opts)
    engine.add_request(prefix + "one", max_tokens=3)
    while engine.has_unfinished():
        engine.step()
    second = engine.add_request(prefix + "two", max_tokens=3)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    cached = [o.cached_tokens for o in outs if o.request_id == second]
    assert cached[0] >= len(prefix) // 4 * 4 - 4
    assert engine.runner.cache.stats()["prefix_hit_rate"] > 0
    # reusing the first request's blocks does not change the second one's greedy output:
    # the same prompt in a fresh pool (nothing cached) gives the same tokens
    reused = [t for o in outs if o.request_id == second for t in o.token_ids]
    (_, fresh, _), = run_all(engine, opts, [(prefix + "two", dict(max_tokens=3))])
    assert engine.runner.cache.stats()["prefix_hit_rate"] == 0
    assert reused == fresh and len(fresh) == 3


def test_a_sequence_longer_than_the_pool_ends_with_length(engine):
    engine.start_batching(BatchingOptions(kv_cache_tokens=16, block_size=4))
    rid = engine.add_request("0123456789", max_tokens=100)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].request_id == rid and outs[-1].finish_reason == "length"
    assert engine.runner.cache.pool.num_used() == 0
    with pytest.raises(RequestError, match="KV cache holds"):
        engine.add_request("x" * 40, max_tokens=1)


class OnlyDigits:
    """A logits mask allowing only the bytes '0'..'9' (the byte tokenizer's ids 48..57)."""

    def __init__(self):
        self.accepted = []

    def apply(self, logits):
        masked = np.full_like(logits, -np.inf)
        masked[48:58] = logits[48:58]
        return masked

    def accept(self, token):
        self.accepted.append(token)

    def is_terminated(self):
        return False


def test_logits_mask_hook_constrains_and_sees_each_token(engine):
    engine.start_batching(BatchingOptions(kv_cache_tokens=256, block_size=4))
    mask = OnlyDigits()
    rid = engine.add_request("digits:", max_tokens=8, logits_mask=mask)
    other = engine.add_request("free text:", max_tokens=8)
    text = {rid: "", other: ""}
    while engine.has_unfinished():
        for out in engine.step():
            text[out.request_id] += out.text
    assert text[rid].isdigit() and len(text[rid]) == 8
    assert [chr(t) for t in mask.accepted] == list(text[rid])


class Scripted:
    """A mask that allows everything, fails on its `fail_at`-th token or terminates after
    `done_at` tokens."""

    def __init__(self, fail_at=None, done_at=None):
        self.fail_at, self.done_at, self.seen = fail_at, done_at, 0

    def apply(self, logits):
        return None

    def accept(self, token):
        self.seen += 1
        if self.seen == self.fail_at:
            raise RequestError("the constraint cannot continue")

    def is_terminated(self):
        return self.seen == self.done_at


def test_a_failing_or_finished_mask_ends_only_its_request(engine):
    engine.start_batching(BatchingOptions(kv_cache_tokens=256, block_size=4))
    failing = engine.add_request("a:", max_tokens=8,
                                 logits_mask=Scripted(fail_at=2))
    done = engine.add_request("b:", max_tokens=8,
                              logits_mask=Scripted(done_at=3))
    free = engine.add_request("c:", max_tokens=8)
    finish, tokens = {}, {failing: 0, done: 0, free: 0}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += len(out.token_ids)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    assert finish == {failing: "error", done: "stop", free: "length"}
    assert tokens[done] == 3 and tokens[free] == 8


def test_bad_requests_are_refused_before_queueing(engine):
    engine.start_batching(BatchingOptions(kv_cache_tokens=64, block_size=4))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([], max_tokens=3)
    with pytest.raises(RequestError, match="vocabulary"):
        engine.add_request([1, 100000], max_tokens=3)
    with pytest.raises(RequestError, match="max_tokens"):
        engine.add_request("x", max_tokens=0)
    assert not engine.has_unfinished()


def test_prefill_pacer_keeps_mixed_steps_within_the_rise():
    from lattice_engine.prefill_pacer import PrefillPacer
    pacer = PrefillPacer(max_rise=2.0, cap=64)
    assert pacer.budget() == PrefillPacer.PROBE    # nothing measured yet: a small probe
    pacer.record(decode_rows=4, prefill_rows=0, seconds=0.040)
    assert pacer.budget() == PrefillPacer.PROBE    # no mixed step measured yet
    pacer.record(decode_rows=4, prefill_rows=16, seconds=0.080)   # 2.5 ms per prefill token
    assert pacer.budget() == 16                     # 16 tokens cost one more decode step
    for _ in range(30):                             # a cheaper machine: the cap again
        pacer.record(decode_rows=4, prefill_rows=16, seconds=0.045)
    assert pacer.budget() == 64
    assert PrefillPacer(max_rise=0, cap=8).budget() == 8


def test_prefill_pacer_ignores_one_slow_decode_step_and_tracks_the_row_count():
    """A server's decode step slowed once (its event loop parsing a long request) must not
    raise the decode time the whole following prefill is paced against."""
    from lattice_engine.prefill_pacer import PrefillPacer
    pacer = PrefillPacer(max_rise=2.0, cap=64)
    for _ in range(5):
        pacer.record(decode_rows=4, prefill_rows=0, seconds=0.045)
    pacer.record(decode_rows=4, prefill_rows=0, seconds=0.088)
    assert pacer.t_decode == pytest.approx(0.045)
    pacer.record(decode_rows=4, prefill_rows=10, seconds=0.075)   # 3 ms per prefill token
    assert pacer.budget() == 15
    # one decoder left: its decode step is cheaper, so is the slice it can absorb
    for _ in range(3):
        pacer.record(decode_rows=1, prefill_rows=0, seconds=0.024)
    assert pacer.t_decode == pytest.approx(0.024) and pacer.budget() == 8
    pacer.record(decode_rows=3, prefill_rows=6, seconds=0.069)    # nearest measured: 4 rows
    # 0.069 - 0.045 over 6 prefill rows less the one decode row fewer: 4.8 ms a row; a
    # rising cost is followed quickly (RISING), a falling one slowly (SMOOTHING)
    assert pacer.per_token == pytest.approx(0.003 + PrefillPacer.RISING * (0.0048 - 0.003))
    pacer.record(decode_rows=3, prefill_rows=6, seconds=0.045 + 5 * 0.003)
    assert pacer.per_token == pytest.approx(
        0.003 + PrefillPacer.RISING * 0.0018 - PrefillPacer.SMOOTHING *
        PrefillPacer.RISING * 0.0018)
    assert pacer.rows == 3 and pacer.t_decode == pytest.approx(0.045 - pacer.per_token)


def test_prefill_pacer_estimates_row_counts_only_seen_in_mixed_steps():
    """Streams that join while others still prefill never give a decode-only step at the
    new row count: the pacer extrapolates it instead of charging the extra decode rows to
    the prefill slice (which shrank the slice to a token a step, measured)."""
    from lattice_engine.prefill_pacer import PrefillPacer
    pacer = PrefillPacer(max_rise=2.0, cap=64)
    for _ in range(3):
        pacer.record(decode_rows=1, prefill_rows=0, seconds=0.024)
    # every later step is mixed; a row of either kind costs 3 ms
    for rows in range(2, 8):
        for _ in range(4):
            n = pacer.budget()
            pacer.record(decode_rows=rows, prefill_rows=n, seconds=0.024 + 0.003 * (rows - 1 + n))
    assert pacer.per_token == pytest.approx(0.003)
    assert pacer.t_decode == pytest.approx(0.024 + 6 * 0.003)
    assert abs(pacer.budget() - 0.042 / 0.003) <= 1  # 14 tokens, give or take rounding
    with pytest.raises(RequestError, match="max_itl_rise"):
        BatchingOptions(max_itl_rise=0.5)


# ---- recurrent (linear-attention) layers through the scheduler ---------------------------

class ToyRecurrentModel:
    """A model whose only layer is recurrent: state = 0.5 * state + embedding[token], logits
    = W @ state. Every output depends on the whole history through the state, so a prefix
    resumed from a wrong (or missing) snapshot changes the tokens."""

    def __init__(self, vocab=40, width=12):
        rng = np.random.default_rng(3)
        self.embedding = rng.standard_normal((vocab, width)).astype(np.float32)
        self.head = rng.standard_normal((vocab, width)).astype(np.float32)
        self.config = type("Config", (), {"vocab_size": vocab, "max_position_embeddings": 512})

    def make_paged_cache(self, num_blocks, block_size=16, variant="", max_sequences=0):
        from lattice_engine.cache import PagedKVCache, RecurrentStateSlots
        slots = RecurrentStateSlots([(self.embedding.shape[1],)], num_slots=max_sequences)
        return PagedKVCache(1, 1, 1, num_blocks, block_size, variant, recurrent=slots)

    def forward_paged(self, batch, cache):
        rows = {}
        for i, slot in enumerate(batch.state_slots):
            state = cache.recurrent.state(int(slot))[0]
            for r in range(batch.q_start[i], batch.q_start[i + 1]):
                state[:] = 0.5 * state + self.embedding[batch.tokens[r]]
                rows[r] = self.head @ state
        return np.array([rows[int(r)] for r in batch.logit_rows]).reshape(
            len(batch.logit_rows), self.head.shape[0])


class LetterTokenizer:
    eos_token_ids = ()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(t)) for t in ids)


def test_recurrent_state_slots_serve_prefix_hits_and_preemption():
    from lattice_engine.batching import BatchRunner
    from lattice_engine.sampling import SamplingParams
    model = ToyRecurrentModel()
    prefix = [(7 * i) % 40 for i in range(18)]
    prompts = [prefix + [1, 2, 3], prefix + [4, 5], [9, 9, 9]]

    def run(prompts, options, sequential):
        runner = BatchRunner(model, LetterTokenizer(), options=options)
        out, cached = {}, {}
        pending = list(prompts)
        while pending or runner.has_unfinished():
            if pending and (not sequential or not runner.has_unfinished()):
                rid = runner.add_request(pending.pop(0), SamplingParams(max_tokens=9))
                out[rid] = ""
            for o in runner.step():
                out[o.request_id] += o.text
                cached[o.request_id] = o.cached_tokens
        assert runner.cache.pool.num_used() == 0 and runner.cache.recurrent.num_free() == 2
        return list(out.values()), list(cached.values()), runner

    roomy = BatchingOptions(kv_cache_tokens=256, block_size=4, max_running=2, step_tokens=7,
                            interleave_tokens=5)
    alone, cached, _ = run(prompts, roomy, sequential=True)
    assert cached[1] == 16         # 18 shared tokens: 4 full blocks resumed from a snapshot
    together, _, _ = run(prompts, roomy, sequential=False)
    assert together == alone
    tight = BatchingOptions(kv_cache_tokens=32, block_size=4, max_running=2, step_tokens=7,
                            interleave_tokens=5)
    squeezed, _, runner = run(prompts, tight, sequential=False)
    assert runner.scheduler.preemptions > 0 and squeezed == alone
    # the reference: the same recurrence computed directly, no cache at all
    for prompt, text in zip(prompts, alone):
        state, tokens = np.zeros(12, np.float32), list(prompt)
        for t in tokens:
            state = 0.5 * state + model.embedding[t]
        generated = []
        for _ in range(9):
            nxt = int(np.argmax(model.head @ state))
            generated.append(nxt)
            state = 0.5 * state + model.embedding[nxt]
        assert text == LetterTokenizer().decode(generated)


def test_server_config_keys_build_batching_options():
    from lattice_engine.cli import build_parser
    from lattice_engine.config import config_from_dict
    from lattice_engine.errors import ConfigError
    cfg = config_from_dict({"server": {"kv_cache_tokens": 512, "block_size": 8,
                                       "max_running": 3, "step_tokens": 100,
                                       "interleave_tokens": 10, "max_itl_rise": 1.5}})
    assert cfg.server.batching_options() == BatchingOptions(
        kv_cache_tokens=512, block_size=8, max_running=3, step_tokens=100,
        interleave_tokens=10, max_itl_rise=1.5)
    with pytest.raises(ConfigError, match="server.kv_cache_tokens"):
        config_from_dict({"server": {"kv_cache_tokens": 0}})
    with pytest.raises(ConfigError, match="max_itl_rise"):
        config_from_dict({"server": {"max_itl_rise": 0.5}})
    args = build_parser().parse_args(["serve", "smollm2-135m", "--port", "8123",
                                      "--kv-cache-tokens", "4096", "--max-itl-rise", "0"])
    assert (args.command, args.port, args.kv_cache_tokens, args.max_itl_rise) == \
        ("serve", 8123, 4096, 0.0)


def test_a_model_without_a_tokenizer_runs_on_token_ids():
    """A checkpoint with weights only (no tokenizer.json): requests are token ids in and
    out, with no text; stop strings, which need text, are refused up front."""
    from conftest import FIXTURES
    from lattice_engine.batching import BatchRunner
    from lattice_engine.loading import load
    from lattice_engine.sampling import SamplingParams

    loaded = load(FIXTURES / "qwen3_5_text")
    assert loaded.tokenizer is None
    runner = BatchRunner(loaded.model, None, options=BatchingOptions(kv_cache_tokens=256,
                                                                     block_size=16))
    ids = [runner.add_request([1, 2, 3, 4, 5][:n], SamplingParams(max_tokens=6))
           for n in (2, 5)]
    tokens = {i: [] for i in ids}
    finished = {}
    while runner.has_unfinished():
        for out in runner.step():
            assert out.text == ""
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {i: "length" for i in ids}
    assert all(len(t) == 6 for t in tokens.values())
    # batched, the same greedy tokens as that request alone
    alone = BatchRunner(loaded.model, None, options=BatchingOptions(kv_cache_tokens=256,
                                                                    block_size=16))
    alone.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=6))
    got = []
    while alone.has_unfinished():
        for out in alone.step():
            got += out.token_ids
    assert got == tokens[ids[1]]
    with pytest.raises(RequestError, match="stop strings need a tokenizer"):
        runner.add_request([1, 2], SamplingParams(max_tokens=3, stop=["x"]))
    assert runner.cache.stats()["blocks_used"] == 0


def test_prompt_logprobs_over_chunked_prefill_equal_one_forward(engine):
    """A request with prompt_logprobs, prefilled in chunks of 5 beside other requests and
    after a request that cached the same prefix: every prompt token but the first gets the
    log-softmax of one unbatched forward (within the error model) and its top alternatives,
    and max_tokens 0 generates nothing."""
    from lattice_engine.sampling import log_softmax
    from lattice_engine.testing.tolerance import logits_bound
    opts = BatchingOptions(kv_cache_tokens=1024, block_size=4, step_tokens=5,
                           interleave_tokens=5, max_itl_rise=0, prefill_step_seconds=0)
    engine.start_batching(opts)
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = engine.tokenizer.encode(prompt)
    engine.add_request(prompt, max_tokens=3)  # fills the prefix cache with the prompt
    while engine.has_unfinished():
        engine.step()
    scored = engine.add_request(prompt, max_tokens=0, prompt_logprobs=3)
    other = engine.add_request("Hello there", max_tokens=6)
    outputs = {scored: [], other: []}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    got = [o.prompt_logprobs for o in outputs[scored] if o.prompt_logprobs is not None]
    assert len(got) == 1 and outputs[scored][-1].finish_reason == "length"
    assert sum(len(o.token_ids) for o in outputs[scored]) == 0
    entries = got[0]
    model = engine.model
    cache = model.make_cache(batch=1, capacity=len(ids))
    hidden = model.hidden_states(np.asarray(ids, np.int64)[None, :], cache)
    ref = log_softmax(model.logits(hidden)[0])
    bound = 2 * logits_bound(model, hidden, len(ids))
    assert entries[0] is None and len(entries) == len(ids)
    for pos in range(1, len(ids)):
        logprob, top = entries[pos]
        assert abs(logprob - ref[pos - 1, ids[pos]]) <= bound
        want = np.argsort(-ref[pos - 1])[:3]
        assert [t for t, _ in top] == want.tolist() or \
            np.allclose([v for _, v in top], ref[pos - 1, want], atol=bound)
    assert engine.runner.cache.stats()["blocks_used"] == 0


def test_copies_wait_for_their_leader_and_share_its_blocks(engine):
    """n copies: the ones after the first are admitted once it has computed the prompt's
    full blocks, and take them from the prefix cache (cached_tokens)."""
    opts = BatchingOptions(kv_cache_tokens=1024, block_size=4, step_tokens=64)
    runner = engine.start_batching(opts)
    prompt = engine.tokenizer.encode("0123456789" * 3)
    params = engine.sampling.with_overrides(max_tokens=4, temperature=1.0, seed=1)
    leader = runner.make_sequence(prompt, params, request_id="c0")
    copies = [leader] + [runner.make_sequence(prompt, params.with_overrides(seed=1 + i),
                                              request_id=f"c{i}", prefix_leader=leader)
                         for i in (1, 2, 3)]
    for seq in copies:
        runner.enqueue(seq)
    cached = {}
    while runner.has_unfinished():
        for out in runner.step():
            cached[out.request_id] = out.cached_tokens
    full = len(prompt) // 4 * 4
    assert cached == {"c0": 0, "c1": full, "c2": full, "c3": full}
    assert runner.cache.stats()["blocks_used"] == 0
