"""The paged KV cache: block pool bookkeeping, prefix sharing, recurrent-state snapshots,
paged attention (numpy reference and native kernels) and the paged model forward against
transformers' golden logits."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import ARCHITECTURES, FIXTURES, check_paged_against_golden
from lattice_engine import kernels, ops
from lattice_engine.cache import (BlockPool, PagedKVCache, RecurrentStateSlots,
                                  SequenceBlocks, chain_block_hashes)
from lattice_engine.loading import load
from lattice_engine.models.paged_forward import PagedBatch
from lattice_engine.testing.pytest_plugin import core_variant, require as require_native
from lattice_engine.testing.tolerance import attention_bound


# ---- block pool ---------------------------------------------------------------------------

def test_pool_refcounts_and_lru_eviction_order():
    pool = BlockPool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.num_free() == 0
    with pytest.raises(MemoryError):
        pool.allocate()
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    pool.release([a, b])                 # released in reverse: b then a, so b is older
    assert pool.num_cached() == 2 and pool.num_free() == 2
    assert pool.lookup(b"ha") == a       # a hit takes a back out of the LRU
    assert pool.refcount[a] == 1 and pool.num_cached() == 1
    assert pool.allocate() == b          # evicts the only cached block, b
    assert not pool.contains(b"hb") and pool.evictions == 1
    assert pool.lookup(b"hb") is None
    pool.release([c])                    # never hashed: free, not cached
    assert len(pool.free) == 1 and pool.num_cached() == 0
    with pytest.raises(ValueError):
        pool.release([c])


def test_pool_register_keeps_the_first_copy_of_equal_content():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"same")
    pool.register(b, b"same")            # b duplicates a: stays unhashed
    pool.release([a, b])
    assert pool.num_cached() == 1 and len(pool.free) == 1


def test_chained_hashes_depend_on_prefix_and_variant():
    toks = list(range(8))
    h = chain_block_hashes(toks, 4)
    assert len(h) == 2 and chain_block_hashes(toks + [9], 4) == h   # partial block ignored
    other_prefix = chain_block_hashes([7, 7, 7, 7] + toks[4:], 4)
    assert other_prefix[1] != h[1]       # same tokens after a different prefix differ
    assert chain_block_hashes(toks, 4, variant="lora-a") != h
    # continuing a chain equals hashing from scratch
    assert chain_block_hashes(toks, 4, start=1, parent=h[0]) == h[1:]


# ---- paged cache --------------------------------------------------------------------------

def _cache(num_blocks=8, block_size=4, **kw):
    return PagedKVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=num_blocks,
                        block_size=block_size, **kw)


def test_prefix_sharing_reserve_commit_and_free():
    cache = _cache()
    prompt = list(range(10))
    first = SequenceBlocks()
    assert cache.match_prefix(prompt, first) == 0
    assert cache.reserve(first, len(prompt))
    assert len(first.table) == 3
    assert len(cache.commit(first, prompt, 10)) == 2       # two full blocks computed
    second = SequenceBlocks()
    assert cache.match_prefix(prompt, second) == 8
    assert second.table == first.table[:2]
    assert cache.pool.refcount[first.table[0]] == 2
    # the whole prompt cached still leaves the last token to compute
    exact = SequenceBlocks()
    assert cache.match_prefix(prompt[:8], exact) == 4
    for seq in (first, second, exact):
        cache.free(seq)
    assert cache.pool.num_used() == 0 and cache.pool.num_cached() == 2
    assert cache.stats()["prefix_hit_tokens"] == 12


def test_reserve_is_all_or_nothing():
    cache = _cache(num_blocks=3)
    seq = SequenceBlocks()
    assert not cache.reserve(seq, 13)            # needs 4 blocks of 4
    assert seq.table == [] and cache.pool.num_free() == 3
    assert cache.reserve(seq, 12)


def test_slots_and_write_follow_the_block_table():
    cache = _cache()
    seq = SequenceBlocks(table=[5, 2])
    np.testing.assert_array_equal(cache.slots(seq, 2, 4), [22, 23, 8, 9])
    k = np.arange(8, dtype=np.float32).reshape(4, 1, 2)
    cache.write(0, cache.slots(seq, 2, 4), k, -k)
    np.testing.assert_array_equal(cache.keys[0][2, 0], k[2])
    np.testing.assert_array_equal(cache.values[0][5, 3], -k[1])


# ---- recurrent-state slots ---------------------------------------------------------------

def _toy_recurrent_step(state, token):
    """A decaying running sum: depends on every earlier token, like a linear-attention
    state, so resuming from a wrong snapshot gives a different result."""
    state[0][:] = 0.5 * state[0] + token


def test_recurrent_snapshots_resume_a_shared_prefix_exactly():
    slots = RecurrentStateSlots([(3,)], num_slots=2)
    cache = _cache(recurrent=slots)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    first = SequenceBlocks(state_slot=slots.acquire())
    cache.match_prefix(prompt, first)
    cache.reserve(first, len(prompt))
    for i, tok in enumerate(prompt):
        _toy_recurrent_step(slots.state(first.state_slot), tok)
        for h in cache.commit(first, prompt, i + 1):
            slots.snapshot(first.state_slot, h)
    expected = slots.state(first.state_slot)[0].copy()
    second = SequenceBlocks(state_slot=slots.acquire())
    skip = cache.match_prefix(prompt, second)
    assert skip == 8
    slots.restore(second.state_slot, second.block_hashes[-1])
    for tok in prompt[skip:]:
        _toy_recurrent_step(slots.state(second.state_slot), tok)
    np.testing.assert_array_equal(slots.state(second.state_slot)[0], expected)
    cache.free(first)
    cache.free(second)
    assert slots.num_free() == 2


def test_prefix_without_a_snapshot_is_not_reused():
    slots = RecurrentStateSlots([(1,)], num_slots=1)
    cache = _cache(recurrent=slots)
    prompt = list(range(9))
    seq = SequenceBlocks(state_slot=slots.acquire())
    cache.reserve(seq, 9)
    hashes = cache.commit(seq, prompt, 9)
    slots.snapshot(seq.state_slot, hashes[0])      # only the first boundary is saved
    cache.free(seq)
    again = SequenceBlocks()
    assert cache.match_prefix(prompt, again) == 4
    cache.free(again)
    cache.pool.reset_prefix_cache()                # evicting a block drops its snapshot
    assert not slots.has_snapshot(hashes[0])
    with pytest.raises(MemoryError):
        slots.acquire(), slots.acquire()


def test_snapshot_arrays_are_reused_and_bounded():
    """Snapshots beyond max_snapshots push out the oldest, and a new snapshot copies into
    the arrays of a dropped one (no fresh allocation: a page fault per 4 KiB otherwise)."""
    slots = RecurrentStateSlots([(4,)], num_slots=1, max_snapshots=2)
    slot = slots.acquire()
    for i in range(3):
        slots.state(slot)[0][:] = i
        assert slots.snapshot(slot, bytes([i]))
    assert list(slots.snapshots) == [b"\x01", b"\x02"]
    assert not slots.snapshot(slot, b"\x02")          # already there
    dropped = slots.snapshots[b"\x01"][0]
    slots.drop_snapshot(b"\x01")
    slots.state(slot)[0][:] = 7
    slots.snapshot(slot, b"\x07")
    assert slots.snapshots[b"\x07"][0] is dropped
    np.testing.assert_array_equal(slots.snapshots[b"\x07"][0], 7)
    slots.restore(slot, b"\x02")
    np.testing.assert_array_equal(slots.state(slot)[0], 2)
    assert RecurrentStateSlots([(4,)], 1, snapshot_budget_bytes=0).snapshot(0, b"x") is False


# ---- paged attention ----------------------------------------------------------------------

def _random_paged_problem(rng, hq=4, hkv=2, d=16, bs=4, num_blocks=24):
    k_pool = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    v_pool = rng.standard_normal((num_blocks, bs, hkv, d)).astype(np.float32)
    # three sequences: a decode row at position 9, a prefill chunk of 6 at 3, a fresh 5
    rows, pos = [1, 6, 5], [9, 3, 0]
    perm = rng.permutation(num_blocks)
    tables = np.zeros((3, 4), np.int32)
    tables[0, :3], tables[1, :3], tables[2, :2] = perm[:3], perm[3:6], perm[6:8]
    q_start = np.concatenate([[0], np.cumsum(rows)])
    q = rng.standard_normal((q_start[-1], hq, d)).astype(np.float32)
    return q, k_pool, v_pool, q_start, np.array(pos), tables


def paged_bound(q, k_pool, v_pool, q_start, pos, tables, scale) -> np.ndarray:
    """attention_bound (lattice_engine.testing.tolerance) for each sequence of a paged
    problem, on its keys and values gathered into contiguous arrays."""
    out = np.zeros(q.shape)
    bs, hkv, d = k_pool.shape[1:]
    for i in range(len(pos)):
        rows = slice(q_start[i], q_start[i + 1])
        n = pos[i] + rows.stop - rows.start
        k = k_pool[tables[i]].reshape(-1, hkv, d)[:n]
        v = v_pool[tables[i]].reshape(-1, hkv, d)[:n]
        out[rows] = attention_bound(q[None, rows], k[None], v[None], pos[i], scale)[0]
    return out


def test_paged_attention_reference_equals_contiguous_attention():
    rng = np.random.default_rng(0)
    q, kp, vp, qs, ps, bt = _random_paged_problem(rng)
    out = ops.paged_attention(q, kp, vp, qs, ps, bt, 0.25)
    for i in range(3):
        n = ps[i] + qs[i + 1] - qs[i]
        k = kp[bt[i]].reshape(-1, 2, 16)[:n]
        v = vp[bt[i]].reshape(-1, 2, 16)[:n]
        want = ops.attention(q[None, qs[i]:qs[i + 1]], k[None], v[None], ps[i], 0.25)[0]
        bound = attention_bound(q[None, qs[i]:qs[i + 1]], k[None], v[None], ps[i], 0.25)[0]
        assert (np.abs(out[qs[i]:qs[i + 1]] - want) <= bound).all()


@pytest.fixture(params=["generic", "avx2"])
def isa(request):
    """The ISA levels of the paged attention kernel (it has no VNNI variants)."""
    with core_variant(request.param) as name:
        yield name


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (3, 3, 20), (14, 2, 64)])
def test_native_paged_attention_matches_reference(isa, hq, hkv, d):
    rng = np.random.default_rng(1)
    q, kp, vp, qs, ps, bt = _random_paged_problem(rng, hq, hkv, d)
    want = ops.paged_attention(q, kp, vp, qs, ps, bt, 0.3)
    got = kernels.paged_attention(q, kp, vp, qs, ps, bt, 0.3)
    assert (np.abs(got - want) <= paged_bound(q, kp, vp, qs, ps, bt, 0.3)).all()
    # a row's result does not depend on the other sequences in the call
    alone = kernels.paged_attention(q[qs[1]:qs[2]], kp, vp, np.array([0, 6]), ps[1:2], bt[1:2], 0.3)
    np.testing.assert_array_equal(alone, got[qs[1]:qs[2]])


@pytest.mark.parametrize("hq,hkv,d,bs", [(14, 2, 64, 16), (8, 2, 256, 16), (4, 4, 24, 8)])
def test_native_paged_attention_long_prefix_and_any_chunking(isa, hq, hkv, d, bs):
    """Keys across several of the kernel's tiles (64 keys), a chunk starting mid-tile, and
    the same prompt prefilled in different chunkings: identical bits row for row (what lets
    a request's output not depend on the prefill pacer's chunk sizes)."""
    rng = np.random.default_rng(3)
    n, blocks = 203, 40
    kp = rng.standard_normal((blocks, bs, hkv, d)).astype(np.float32)
    vp = rng.standard_normal((blocks, bs, hkv, d)).astype(np.float32)
    table = rng.permutation(blocks)[:-(-n // bs)].astype(np.int32)[None]
    q = rng.standard_normal((n, hq, d)).astype(np.float32)
    whole = kernels.paged_attention(q, kp, vp, np.array([0, n]), np.array([0]), table, 0.2)
    want = ops.paged_attention(q, kp, vp, np.array([0, n]), np.array([0]), table, 0.2)
    bound = paged_bound(q, kp, vp, np.array([0, n]), np.array([0]), table, 0.2)
    assert (np.abs(whole - want) <= bound).all()
    for cuts in ([0, 1, 70, 77, 150, 203], [0, 5, 128, 129, 200, 203]):
        for a, b in zip(cuts, cuts[1:]):
            part = kernels.paged_attention(q[a:b], kp, vp, np.array([0, b - a]), np.array([a]),
                                           table, 0.2)
            np.testing.assert_array_equal(part, whole[a:b])
    # decode rows of two sequences in one call: each as alone
    t2 = np.stack([table[0], np.roll(table[0], 3)])
    rows = q[[150, 202]]
    both = kernels.paged_attention(rows, kp, vp, np.array([0, 1, 2]), np.array([150, 202]), t2, 0.2)
    np.testing.assert_array_equal(both[0], whole[150])
    alone = kernels.paged_attention(rows[1:], kp, vp, np.array([0, 1]), np.array([202]), t2[1:], 0.2)
    np.testing.assert_array_equal(both[1], alone[0])


def test_native_paged_attention_rejects_bad_tables():
    require_native()
    rng = np.random.default_rng(2)
    q, kp, vp, qs, ps, bt = _random_paged_problem(rng)
    with pytest.raises(ValueError, match="outside the pool"):
        kernels.paged_attention(q, kp, vp, qs, ps, bt + 100, 0.3)
    with pytest.raises(ValueError, match="block table"):
        kernels.paged_attention(q, kp, vp, qs, ps + 20, bt, 0.3)


# ---- paged forward against the golden logits ---------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "native"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_paged_forward_matches_transformers(name, backend):
    """Row 0 prefills in two chunks while row 1 prefills whole, then both decode in one
    batch: every logit equals transformers' (the golden fixture) within the float32 bound."""
    if backend == "native":
        require_native()
    model = load(FIXTURES / name, backend=backend).model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    prompt, steps = golden["prompt_ids"], golden["decode_ids"]
    t = prompt.shape[1]
    cache = model.make_paged_cache(num_blocks=16, block_size=4)
    seqs = [SequenceBlocks(), SequenceBlocks()]
    for s in seqs:
        assert cache.reserve(s, t + steps.shape[1])
    check_paged_against_golden(model, golden, cache, seqs, cut=t // 2)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_fused_paged_step_is_the_per_kernel_path_bit_for_bit(name):
    """The one-call C step over a paged batch (mixed prefill chunks and decode rows) runs
    the per-kernel path's kernels in its order: identical logits and identical KV pools."""
    require_native()
    model = load(FIXTURES / name, backend="native").model
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    prompt = golden["prompt_ids"]
    t = prompt.shape[1]
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        model._step_built = False
        cache = model.make_paged_cache(num_blocks=16, block_size=4)
        seqs = [SequenceBlocks(), SequenceBlocks()]
        for s in seqs:
            assert cache.reserve(s, t + 3)
        out = [model.forward_paged(PagedBatch.build(cache, [(seqs[0], prompt[0, :3], 0, True)]),
                                   cache)]
        out.append(model.forward_paged(PagedBatch.build(
            cache, [(seqs[0], prompt[0, 3:], 3, True), (seqs[1], prompt[1], 0, False)]), cache))
        out.append(model.forward_paged(PagedBatch.build(
            cache, [(seqs[0], [7], t, True), (seqs[1], [9], t, True)]), cache))
        runs[fused] = out, [k.copy() for k in cache.keys], [v.copy() for v in cache.values]
    assert model._decode_step() is None  # the last run really was the per-kernel path
    model.fused_decode = True
    model._step_built = False
    assert model._decode_step() is not None
    for a, b in zip(runs[True][0], runs[False][0]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[True][1] + runs[True][2], runs[False][1] + runs[False][2]):
        np.testing.assert_array_equal(a, b)


def test_fused_paged_step_rejects_a_slot_outside_the_pool():
    require_native()
    model = load(FIXTURES / ARCHITECTURES[0], backend="native").model
    cache = model.make_paged_cache(num_blocks=4, block_size=4)
    seq = SequenceBlocks()
    assert cache.reserve(seq, 3)
    batch = PagedBatch.build(cache, [(seq, [1, 2, 3], 0, True)])
    batch.slots[1] = 4 * 4  # one past the pool
    with pytest.raises(ValueError, match="outside the KV pool"):
        model.forward_paged(batch, cache)
