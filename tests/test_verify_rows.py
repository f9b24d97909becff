"""The multi-row fused step of one sequence over a dense cache (`lk_decoder_step_rows`,
`lk_qwen35_step_rows`): what a single request's speculative verify (and a draft model
catching up on accepted tokens) runs instead of the per-kernel path.

- Each verify row's hidden state is bit for bit the one a plain decode step of that token
  gives (the same kernels, the same attention call as decoding, every row alone in the
  matmuls' row order), and its logits equal the per-kernel path's within the float32
  error model (`testing.tolerance.logits_bound`).
- A partial accept (`cache.truncate`) leaves the KV rows and Qwen3.5's recurrent states
  exactly as a plain decode of the accepted tokens leaves them.
- The verify trails of the paged recurrent-state slots reuse their buffers from verify to
  verify and still roll back exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import lattice_engine.models.qwen3_5 as qwen3_5_module
import lattice_engine.models.transformer as transformer_module
from conftest import FIXTURES
from lattice_engine.cache.recurrent import RecurrentStateSlots
from lattice_engine.engine import Engine
from lattice_engine.kernels import available
from lattice_engine.testing.tolerance import logits_bound

pytestmark = pytest.mark.skipif(not available(), reason="native kernels not built")

PROMPT = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13]], np.int64)
DRAFTS = np.array([[21, 3, 40, 17, 8]], np.int64)


def load(name: str, quant=None):
    return Engine.load(str(FIXTURES / name), quant=quant).model


def verify(model, cache, rows: np.ndarray) -> np.ndarray:
    """Hidden states of a recorded verify of rows [1, T] (as `SingleSession.step`)."""
    if hasattr(cache, "record_next"):
        cache.record_next()
    return model.hidden_states(rows, cache)


def per_kernel(model, monkeypatch) -> None:
    """Route multi-row dense forwards to the per-kernel path (the reference)."""
    module = qwen3_5_module if model.__module__.endswith("qwen3_5") else transformer_module
    monkeypatch.setattr(module, "FUSED_ROWS", 1)


@pytest.mark.parametrize("name,quant", [("llama", None), ("qwen2", None), ("qwen3", None),
                                        ("llama", "q8_0"), ("qwen3_5_text", None),
                                        ("qwen3_5_text", "q8_0")])
def test_verify_rows_are_decode_steps_and_match_the_per_kernel_path(name, quant,
                                                                    monkeypatch):
    model = load(name, quant)
    step = model._decode_step()
    assert step is not None, "the fixture must run the fused step"
    calls = []
    rows = step.rows
    monkeypatch.setattr(step, "rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    cache = model.make_cache(1)
    model.hidden_states(PROMPT, cache)
    fused = verify(model, cache, DRAFTS)[0]
    assert calls, "the verify did not run the multi-row fused step"

    plain = model.make_cache(1)
    model.hidden_states(PROMPT, plain)
    decoded = np.stack([model.hidden_states(DRAFTS[:, i:i + 1], plain)[0, 0]
                        for i in range(DRAFTS.shape[1])])
    assert np.array_equal(fused, decoded), \
        f"verify rows differ from decode steps by {np.abs(fused - decoded).max():.3g}"

    monkeypatch.setattr(step, "rows", rows)
    per_kernel(model, monkeypatch)
    ref_cache = model.make_cache(1)
    model.hidden_states(PROMPT, ref_cache)
    ref = verify(model, ref_cache, DRAFTS)[0]
    got, want = model.logits(fused), model.logits(ref)
    bound = logits_bound(model, ref, PROMPT.shape[1] + DRAFTS.shape[1])
    assert np.abs(got - want).max() <= bound


@pytest.mark.parametrize("name", ["llama", "qwen3_5_text"])
@pytest.mark.parametrize("kept", [1, 3, 5])
def test_partial_accept_leaves_the_cache_of_a_plain_decode(name, kept):
    model = load(name)
    cache = model.make_cache(1)
    model.hidden_states(PROMPT, cache)
    verify(model, cache, DRAFTS)
    cache.truncate(PROMPT.shape[1] + kept)

    plain = model.make_cache(1)
    model.hidden_states(PROMPT, plain)
    for i in range(kept):
        model.hidden_states(DRAFTS[:, i:i + 1], plain)
    n = PROMPT.shape[1] + kept
    kv_a, kv_b = (getattr(c, "kv", c) for c in (cache, plain))
    assert kv_a.offset == kv_b.offset == n
    for a, b in zip(kv_a.keys + kv_a.values, kv_b.keys + kv_b.values):
        assert np.array_equal(a[:, :n], b[:, :n])
    for a, b in zip(getattr(cache, "conv", []) + getattr(cache, "delta", []),
                    getattr(plain, "conv", []) + getattr(plain, "delta", [])):
        assert np.array_equal(a, b), "recurrent state differs from a plain decode"
    nxt = np.array([[33]], np.int64)
    assert np.array_equal(model.forward(nxt, cache), model.forward(nxt, plain))


def test_rows_step_names_the_cache_it_does_not_fit():
    model = load("llama")
    step = model._decode_step()
    cache = model.make_cache(1, capacity=16)
    step.bind_cache(cache.keys, cache.values)
    cos, sin = model.ops.rope_tables(np.arange(14, 17), model.inv_freq)
    with pytest.raises(ValueError, match=r"rows 14 \.\. 16 are outside .*capacity 16"):
        step.rows(np.array([1, 2, 3]), 14, cos, sin)
    with pytest.raises(ValueError, match=r"3 rows need cos / sin \[3, "):
        step.rows(np.array([1, 2, 3]), 0, cos[:2], sin[:2])


def test_paged_trails_reuse_their_buffers_and_roll_back_exactly():
    slots = RecurrentStateSlots([(2,), (3, 2)], num_slots=2)
    s = slots.acquire()
    seen = []
    for rows, keep in ((4, 2), (2, 1), (4, 4), (3, 0)):
        start = [a.copy() for a in slots.state(s)]
        slots.start_trail(s, rows)
        seen.append(slots.trails[s][0])
        assert slots.trails[s][0].shape[0] == rows + 1
        for row in range(rows):
            for i, a in enumerate(slots.state(s)):
                a += row + 1
                slots.keep(s, i, row)
        slots.rollback(s, keep)
        added = sum(range(1, keep + 1))
        for a, b in zip(slots.state(s), start):
            assert np.array_equal(a, b + added)
    # the later verifies wrote into the first one's buffer: no fresh allocation per verify
    assert all(np.shares_memory(seen[0], t) for t in seen[1:])
    slots.release(s)


def test_replayed_arrays_roll_back_by_replaying_the_kept_rows():
    """An array declared replayed keeps row inputs in its trail, not states: the verify
    leaves it as it was and rollback(m) applies rows 1 .. m; keep=0 leaves it untouched; a
    new verify of a slot not rolled back first keeps all its rows."""
    from lattice_engine.cache import Replay

    def add_rows(state, rows):  # state [3], rows [n, 2]: a toy recurrence, order-sensitive
        for r in rows:
            state *= r[0]
            state += r[1]

    slots = RecurrentStateSlots([(2,), (3,)], num_slots=2, replays={1: Replay((2,), add_rows)})
    assert slots.row_shape(1) == (2,) and slots.row_shape(0) == (2,)
    s = slots.acquire()
    inputs = np.array([[2, 1], [3, 0], [1, 5]], np.float32)
    for keep in (0, 1, 2, 3):
        slots.state(s)[1][:] = [1, 2, 3]
        start = slots.state(s)[1].copy()
        slots.start_trail(s, 3)
        slots.trail_view(s, 1)[:, 0] = inputs
        for row in range(3):
            slots.state(s)[0][:] += 1
            slots.keep(s, 0, row)
        assert np.array_equal(slots.state(s)[1], start)  # the verify does not touch it
        slots.rollback(s, keep)
        want = start.copy()
        add_rows(want, inputs[:keep])
        assert np.array_equal(slots.state(s)[1], want), keep
    with pytest.raises(ValueError, match="replayed"):
        slots.start_trail(s, 2)
        slots.keep(s, 1, 0)
    slots.trail_view(s, 1)[:, 0] = inputs[:2]
    before = slots.state(s)[1].copy()
    slots.start_trail(s, 1)  # the pending 2-row verify is kept whole first
    add_rows(before, inputs[:2])
    assert np.array_equal(slots.state(s)[1], before)
    with pytest.raises(ValueError, match=r"replays \[5\]"):
        RecurrentStateSlots([(2,)], 1, replays={5: Replay((1,), add_rows)})
