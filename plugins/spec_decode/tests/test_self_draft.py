"""Qwen3.5's own drafters: `mtp` (the checkpoint's MTP head) and `self` (the linear-
attention layers on the target's recurrent state). At temperature 0 both give plain
decoding's tokens, one request at a time and under continuous batching beside plain
requests; the MTP drafter pairs each kept hidden state with the right token and position;
misuse (a per-request choice: a RequestError) is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_model
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.errors import RequestError
from lattice_engine.speculative import DraftRequest
from lattice_spec_decode.self_draft import MTPDrafter, SelfDrafter

PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "abcabcabcabcabc",
           "Hello there", "0123456789" * 4]
METHODS = ["mtp", "self"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The tiny Qwen3.5 fixture that carries an mtp.* head."""
    return Engine.load(str(tiny_model("qwen3_5_vl", tmp_path_factory.mktemp("q35"))))


@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory):
    """The tiny Qwen3.5-MoE fixture with an MTP head added: its layer built like the model's
    full-attention layer 2 (gated attention and an MoE MLP, the layout of Qwen3.5-MoE's
    released MTP heads), fc and norms random."""
    from safetensors.numpy import load_file, save_file
    folder = tiny_model("qwen3_5_moe", tmp_path_factory.mktemp("q35moe"))
    weights = load_file(str(folder / "model.safetensors"))
    rng = np.random.default_rng(7)
    h = weights["model.norm.weight"].shape[0]
    mtp = {"mtp.layers.0." + k[len("model.layers.2."):]:
           (v + rng.normal(0, 0.02, v.shape)).astype(np.float32)
           for k, v in weights.items() if k.startswith("model.layers.2.")}
    mtp["mtp.fc.weight"] = rng.normal(0, 0.1, (h, 2 * h)).astype(np.float32)
    for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        mtp[f"mtp.{name}.weight"] = rng.normal(0, 0.1, h).astype(np.float32)
    save_file(mtp, str(folder / "mtp.safetensors"))
    return Engine.load(str(folder))


def test_moe_mtp_head_has_the_models_moe_mlp_and_drafts_plain_decodings_tokens(moe_engine):
    from lattice_engine.models.moe import SparseMoE
    head = moe_engine.model.mtp_head()
    assert isinstance(head.mlp, SparseMoE) and head.mlp.shared is not None
    spec = {"method": "mtp", "num_draft_tokens": 3, "adaptive": False}
    for prompt in PROMPTS:
        plain = moe_engine.generate(prompt, max_tokens=32, speculative=False)
        got = moe_engine.generate(prompt, max_tokens=32, speculative=spec)
        assert got.tokens == plain.tokens, prompt
    stats = moe_engine.speculation_for(spec).stats
    assert stats.verifies > 0 and stats.failures == 0


@pytest.mark.parametrize("vocab", [None, 64])
@pytest.mark.parametrize("method", METHODS)
def test_single_request_equals_plain(engine, method, vocab):
    spec = {"method": method, "num_draft_tokens": 3, "adaptive": False,
            "options": {} if vocab is None else {"draft_vocab": vocab}}
    for prompt in PROMPTS:
        plain = engine.generate(prompt, max_tokens=40, speculative=False)
        got = engine.generate(prompt, max_tokens=40, speculative=spec)
        assert got.tokens == plain.tokens, prompt
    stats = engine.speculation_for(spec).stats
    assert stats.verifies > 0 and stats.failures == 0


@pytest.mark.parametrize("method", METHODS)
def test_batching_mixed_with_plain_equals_plain(engine, method):
    spec = {"method": method, "num_draft_tokens": 3, "adaptive": False}
    requests = [(p, dict(max_tokens=32, speculative=spec if i % 2 == 0 else False))
                for i, p in enumerate(PROMPTS)]
    requests += [(p, dict(max_tokens=17, speculative=spec)) for p in PROMPTS]
    engine.start_batching(BatchingOptions(kv_cache_tokens=2048, block_size=4, step_tokens=32,
                                          interleave_tokens=8))
    ids = [engine.add_request(p, **kw) for p, kw in requests]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.finish_reason != "error", out.error
            tokens[out.request_id] += out.token_ids
    assert engine.runner.cache.stats()["blocks_used"] == 0
    for (prompt, kw), i in zip(requests, ids):
        plain = engine.generate(prompt, speculative=False, max_tokens=kw["max_tokens"])
        assert tokens[i] == plain.tokens, (prompt, kw)
    assert engine.speculation_for(spec).stats.verifies > 0


def test_mtp_rows_pair_hidden_token_and_position(engine):
    """The drafter's head rows are the head run on (target hidden at t, token t + 1,
    position t) for the kept positions: its first draft and its cached keys match that
    computed directly from one target forward over the whole sequence."""
    model = engine.model
    drafter = MTPDrafter(model)
    ids = [int(t) for t in np.random.default_rng(0).integers(0, 256, 12)]
    hidden = model.hidden_states(np.array([ids]), model.make_cache(1))[0]
    head = model.mtp_head()
    # after the prefill of ids[:6]: token_ids = ids[:7] (the pending one last), one row
    req = DraftRequest("r", ids[:7], None, True, np.random.default_rng(0), 256)
    req.hidden = hidden[5:6]
    draft = drafter.propose(req, 3)
    fresh = head.make_cache()
    want = int(np.argmax(head.logits(head.hidden([ids[6]], hidden[5:6], [5], fresh))[0]))
    assert draft.tokens[0] == want and len(draft.tokens) == 3
    # a verify kept one draft: two more tokens, their two rows
    req.token_ids[:] = ids[:9]
    req.hidden = hidden[6:8]
    drafter.propose(req, 2)
    cache = req.state["mtp"]
    assert list(cache.positions[:3]) == [5, 6, 7]
    fresh = head.make_cache()
    head.hidden(ids[6:9], hidden[5:8], [5, 6, 7], fresh)
    assert np.abs(cache.kv.keys[0][0, :3] - fresh.kv.keys[0][0, :3]).max() <= 1e-4
    assert np.abs(cache.kv.values[0][0, :3] - fresh.kv.values[0][0, :3]).max() <= 1e-4


def test_draft_vocab_drafts_among_the_first_ids(engine):
    model = engine.model
    cache = model.make_cache(1)
    model.forward(np.array([[1, 2, 3, 4]]), cache)
    req = DraftRequest("r", [1, 2, 3, 4, 5], None, True, np.random.default_rng(0), 256)
    req.recurrent = [(c[0], d[0]) for c, d in zip(cache.conv, cache.delta)]
    assert all(t < 32 for t in SelfDrafter(model, draft_vocab=32).propose(req, 6).tokens)
    hidden = model.hidden_states(np.array([[1, 2, 3, 4, 5]]), model.make_cache(1))[0]
    req = DraftRequest("m", [1, 2, 3, 4, 5, 6], None, True, np.random.default_rng(0), 256)
    req.hidden = hidden[-1:]
    assert all(t < 32 for t in MTPDrafter(model, draft_vocab=32).propose(req, 6).tokens)


def test_self_draft_leaves_the_target_state_alone(engine):
    model = engine.model
    cache = model.make_cache(1)
    model.forward(np.array([[1, 2, 3, 4]]), cache)
    before = [a.copy() for a in cache.conv + cache.delta]
    req = DraftRequest("r", [1, 2, 3, 4, 5], None, True, np.random.default_rng(0), 256)
    req.recurrent = [(c[0], d[0]) for c, d in zip(cache.conv, cache.delta)]
    assert len(SelfDrafter(model).propose(req, 4).tokens) == 4
    assert all(np.array_equal(a, b) for a, b in zip(before, cache.conv + cache.delta))


def test_misuse_is_a_clear_error(models, engine):
    llama = Engine.load(str(models["llama"]))
    for method in METHODS:
        with pytest.raises(RequestError, match="Qwen3.5"):
            llama.generate("hi", max_tokens=2, speculative={"method": method})
        with pytest.raises(RequestError, match="takes: draft_vocab"):
            engine.generate("hi", max_tokens=2,
                            speculative={"method": method, "options": {"x": 1}})
        for bad in (8, 24, 512, "64"):
            with pytest.raises(RequestError, match="draft_vocab = .* multiple of 16 in "
                                                   r"\[16, 256\]"):
                engine.generate("hi", max_tokens=2,
                                speculative={"method": method, "options": {"draft_vocab": bad}})
    no_mtp = Engine.load(str(models["qwen3_5_text"]))
    with pytest.raises(RequestError, match="no MTP head"):
        no_mtp.generate("hi", max_tokens=2, speculative={"method": "mtp"})
