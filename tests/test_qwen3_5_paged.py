"""Qwen3.5 under continuous batching: the paged forward (gated attention through block
tables, Gated DeltaNet states in recurrent-state slots) against transformers' golden
logits, chunking invariance bit for bit, and the batch runner end to end (prefix hits
restore state snapshots; outputs equal each request alone)."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import FIXTURES, backends, check_paged_against_golden, fixture_with_tokenizer
from lattice_engine.cache import SequenceBlocks
from lattice_engine.loading import load
from lattice_engine.models.paged_forward import PagedBatch
from lattice_engine.testing.pytest_plugin import require as require_native

QWEN35 = ["qwen3_5_text", "qwen3_5_vl"]


def sequences(cache, n, tokens):
    seqs = []
    for _ in range(n):
        s = SequenceBlocks()
        assert cache.reserve(s, tokens)
        s.state_slot = cache.recurrent.acquire()
        seqs.append(s)
    return seqs


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("name", QWEN35)
def test_paged_forward_matches_transformers(name, backend):
    """Row 0 prefills in two block-aligned chunks while row 1 prefills whole, then both
    decode 32 steps in one batch: every logit equals transformers' to 1e-4."""
    model = load(FIXTURES / name, backend=backend).model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    prompt, steps = golden["prompt_ids"], golden["decode_ids"]
    t = prompt.shape[1]
    cache = model.make_paged_cache(num_blocks=16, block_size=16, max_sequences=2)
    seqs = sequences(cache, 2, t + steps.shape[1])
    # block-aligned, about half the prompt: chunks start on blocks, as the scheduler's do
    check_paged_against_golden(model, golden, cache, seqs, cut=16 * max(1, t // 32))


def test_chunking_and_batch_do_not_change_a_bit():
    """The same prompt prefilled in different block-aligned chunkings, next to other
    sequences or alone, gives bit-identical logits and states (native kernels: numpy's
    BLAS matmul is not batch-invariant)."""
    require_native()
    model = load(FIXTURES / "qwen3_5_text", backend="native").model
    prompt = load_file(str(FIXTURES / "qwen3_5_text" / "golden.safetensors"))["prompt_ids"][0]
    t = len(prompt)
    results = []
    for cuts in ([0, t], [0, 16, 48, t], [0, 32, 64, t]):
        cache = model.make_paged_cache(num_blocks=24, block_size=16, max_sequences=2)
        seq, other = sequences(cache, 2, t + 3)
        out = []
        for a, b in zip(cuts, cuts[1:]):
            items = [(seq, prompt[a:b], a, b == t)]
            if a == 0:  # a stranger in the first step: a different prompt of its own
                items.append((other, prompt[::-1][:20], 0, True))
            logits = model.forward_paged(PagedBatch.build(cache, items), cache)
            if b == t:
                out.append(logits[0])
        for i, tok in enumerate((5, 9, 200)):
            out.append(model.forward_paged(PagedBatch.build(cache, [(seq, [tok], t + i, True)]),
                                           cache)[0])
        results.append((out[-4:], [a[seq.state_slot].copy() for a in cache.recurrent.arrays]))
    for logits, states in results[1:]:
        for a, b in zip(logits, results[0][0]):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(states, results[0][1]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", QWEN35)
def test_fused_paged_step_is_the_per_kernel_path_bit_for_bit(name):
    """The one-call C step (`lk_qwen35_step_paged`) over paged batches that mix a chunked
    prefill, a whole prefill and decode rows: identical logits, KV pools and recurrent
    states to the per-kernel path."""
    require_native()
    model = load(FIXTURES / name, backend="native").model
    prompt = load_file(str(FIXTURES / name / "golden.safetensors"))["prompt_ids"]
    t = prompt.shape[1]
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        model._step_built = False
        cache = model.make_paged_cache(num_blocks=24, block_size=16, max_sequences=3)
        a, b = sequences(cache, 2, t + 3)
        out = [model.forward_paged(PagedBatch.build(cache, [(a, prompt[0, :16], 0, False)]),
                                   cache)]
        out.append(model.forward_paged(PagedBatch.build(
            cache, [(a, prompt[0, 16:], 16, True), (b, prompt[1], 0, True)]), cache))
        for i in range(3):
            out.append(model.forward_paged(PagedBatch.build(
                cache, [(a, [7 + i], t + i, True), (b, [9 + i], t + i, True)]), cache))
        runs[fused] = (out, [k.copy() for k in cache.keys + cache.values],
                       [s.copy() for s in cache.recurrent.arrays])
    assert model._decode_step() is None  # the last run really was the per-kernel path
    model.fused_decode = True
    model._step_built = False
    assert model._decode_step() is not None
    for got, want in zip(runs[True], runs[False]):
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y)


def test_fused_paged_step_rejects_a_state_slot_outside_the_cache():
    require_native()
    model = load(FIXTURES / "qwen3_5_text", backend="native").model
    cache = model.make_paged_cache(num_blocks=4, block_size=16, max_sequences=1)
    (seq,) = sequences(cache, 1, 3)
    batch = PagedBatch.build(cache, [(seq, [1, 2, 3], 0, True)])
    batch.state_slots[0] = 1  # the cache has one slot, 0
    with pytest.raises(ValueError, match="recurrent-state slot is outside the cache"):
        model.forward_paged(batch, cache)


def test_batch_runner_serves_qwen3_5(tmp_path):
    """Concurrent requests equal each run alone; a request extending an earlier prompt
    restores the state snapshot at that prompt's last full block instead of recomputing."""
    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    folder = fixture_with_tokenizer("qwen3_5_text", tmp_path, eos_token_id=-1)
    engine = Engine.load(str(folder))
    first = "The quick brown fox jumps over the lazy dog, " * 2 + "and then"  # 98 tokens
    prompts = [first, first + " once more", "hello"]
    options = BatchingOptions(block_size=16, kv_cache_tokens=1024, max_running=4)

    def run(prompts, together):
        engine.start_batching(options)
        out, cached = {}, {}
        pending = list(prompts)
        while pending or engine.has_unfinished():
            if pending and (together or not engine.has_unfinished()):
                rid = engine.add_request(pending.pop(0), max_tokens=12, temperature=0)
                out[rid] = []
            for o in engine.step():
                out[o.request_id] += o.token_ids
                cached[o.request_id] = o.cached_tokens
        assert engine.runner.cache.stats()["blocks_used"] == 0
        return list(out.values()), list(cached.values())

    alone = [run([p], True)[0][0] for p in prompts]
    together, _ = run(prompts, True)
    assert together == alone
    sequential, cached = run(prompts[:2], False)
    assert sequential == alone[:2]
    assert cached == [0, 96]  # the first prompt's 6 full blocks, state restored at 96


def test_decoding_keeps_only_its_newest_state_snapshot(tmp_path):
    """Past the prompt, a sequence keeps one recurrent-state snapshot (its newest full
    block): a follow-up turn whose prompt is the whole exchange resumes there, bit for bit
    what recomputing gives, while the blocks it decoded through hold no 19 MB copies."""
    from lattice_engine.batching import BatchingOptions
    from lattice_engine.engine import Engine
    from lattice_engine.sampling import SamplingParams
    folder = fixture_with_tokenizer("qwen3_5_text", tmp_path, eos_token_id=-1)
    engine = Engine.load(str(folder))
    options = BatchingOptions(block_size=16, kv_cache_tokens=1024, max_running=2)
    params = SamplingParams(temperature=0.0, max_tokens=44)

    def serve(runner, prompt):
        seq = runner.make_sequence(prompt, params, ignore_eos=True)
        runner.enqueue(seq)
        tokens, cached = [], None
        while runner.has_unfinished():
            for o in runner.step():
                tokens += o.token_ids
                cached = o.cached_tokens
        return tokens, cached

    prompt = [(7 + 13 * t) % 200 + 3 for t in range(20)]
    runner = engine.start_batching(options)
    answer, _ = serve(runner, prompt)          # 20 + 44 tokens: blocks end at 16 .. 64
    snapshots = runner.cache.recurrent.snapshots
    # the prompt's last full block (16), and of 32, 48 (and 64, not yet computed) only 48
    assert len(snapshots) == 2
    follow_up = prompt + answer + [5, 6, 7]
    resumed, cached = serve(runner, follow_up)
    assert cached == 48
    fresh, cached = serve(engine.start_batching(options), follow_up)
    assert cached == 0 and resumed == fresh


def test_snapshots_fit_their_byte_budget():
    from lattice_engine.cache.recurrent import RecurrentStateSlots
    model = load(FIXTURES / "qwen3_5_text", backend="numpy").model
    cache = model.make_paged_cache(num_blocks=4, block_size=16, max_sequences=1)
    per = cache.recurrent.slot_bytes
    slots = RecurrentStateSlots(cache.recurrent.shapes, 1, snapshot_budget_bytes=3 * per + 1)
    assert slots.max_snapshots == 3
    assert RecurrentStateSlots([(4,)], 1, max_snapshots=2).max_snapshots == 2


@pytest.mark.parametrize("fused", [True, False])
def test_paged_verify_rolls_back_to_decodings_state(fused):
    """A verify of 5 rows (next to a plain decode row of another sequence) in one step,
    fused C step or per-kernel path, cut back to m kept rows: the slot's recurrent state and
    the next logits are bit for bit those of decoding the m tokens one step at a time; the
    fused and per-kernel verifies give the same logits."""
    require_native()
    model = load(FIXTURES / "qwen3_5_text", backend="native").model
    model.fused_decode = fused
    model._step_built = False
    prompt = load_file(str(FIXTURES / "qwen3_5_text" / "golden.safetensors"))["prompt_ids"][0]
    t, extra = len(prompt), [11, 12, 13, 14, 15]
    verify_logits = {}
    for m in range(1, 6):
        cache = model.make_paged_cache(num_blocks=24, block_size=16, max_sequences=2)
        a, b = sequences(cache, 2, t + 8)
        model.forward_paged(PagedBatch.build(cache, [(a, prompt, 0, True),
                                                     (b, prompt[::-1], 0, True)]), cache)
        logits = model.forward_paged(PagedBatch.build(
            cache, [(a, extra, t, len(extra)), (b, [3], t, True)]), cache)
        verify_logits[m] = logits[:len(extra)]
        cache.recurrent.rollback(a.state_slot, m)
        kept = [s[a.state_slot].copy() for s in cache.recurrent.arrays]
        nxt = model.forward_paged(PagedBatch.build(cache, [(a, [42], t + m, True)]), cache)
        # the same tokens decoded one step at a time
        ref = model.make_paged_cache(num_blocks=24, block_size=16, max_sequences=1)
        (c,) = sequences(ref, 1, t + 8)
        model.forward_paged(PagedBatch.build(ref, [(c, prompt, 0, True)]), ref)
        for i, tok in enumerate(extra[:m]):
            step = model.forward_paged(PagedBatch.build(ref, [(c, [tok], t + i, True)]), ref)
            np.testing.assert_array_equal(step[0], logits[i])
        for x, y in zip(kept, [s[c.state_slot] for s in ref.recurrent.arrays]):
            np.testing.assert_array_equal(x, y)
        want = model.forward_paged(PagedBatch.build(ref, [(c, [42], t + m, True)]), ref)
        np.testing.assert_array_equal(nxt, want)
    assert (model._decode_step() is not None) == fused
    model.fused_decode = True
    model._step_built = False
