"""At temperature 0 speculative decoding gives plain decoding's tokens, for every drafter
(n-gram lookup, a draft model), on the llama family and Qwen3.5, one request at a time and
under continuous batching beside plain requests; on SmolLM2 too. Bad drafter options are
clear errors, and sampled requests run (their distribution is test_rejection's job)."""

from __future__ import annotations

import os

import pytest

from conftest import swap_two_tokens, tiny_model
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.errors import ConfigError, RequestError
from lattice_engine.speculative import SpeculativeOptions

# input-grounded prompts (the n-gram drafter's case) and plain ones
PROMPTS = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "abcabcabcabcabc",
           "Hello there", "0123456789" * 4]


def draft_options(models, target):
    """The target's own checkpoint at q8_0 as its draft (llama family: a near-copy, so
    most drafts are kept and some rejected); Qwen3.5 drafts with the llama fixture (an
    unrelated model: nearly every draft is rejected, which must still be exact)."""
    if target == "qwen3_5_text":
        return {"method": "draft_model", "num_draft_tokens": 3,
                "options": {"model": str(models["llama"])}}
    return {"method": "draft_model", "num_draft_tokens": 3,
            "options": {"model": str(models[target]), "quant": "q8_0"}}


CHOICES = {
    "ngram": lambda models, target: {"method": "ngram", "num_draft_tokens": 4,
                                     "options": {"prompt_lookup_min": 1, "prompt_lookup_max": 3}},
    "draft_model": draft_options,
    "other_draft": lambda models, target: {"method": "draft_model", "num_draft_tokens": 2,
                                           "options": {"model": str(models["qwen2"])}},
}


@pytest.fixture(scope="module", params=["llama", "qwen3_5_text"])
def target(request, models):
    return request.param, Engine.load(str(models[request.param]))


@pytest.mark.parametrize("choice", sorted(CHOICES))
def test_single_request_equals_plain(models, target, choice):
    name, eng = target
    spec = CHOICES[choice](models, name)
    for prompt in PROMPTS:
        plain = eng.generate(prompt, max_tokens=48, speculative=False)
        got = eng.generate(prompt, max_tokens=48, speculative=spec)
        assert got.tokens == plain.tokens, prompt
        assert got.text == plain.text and got.finish_reason == plain.finish_reason
    stats = eng.speculation_for(spec).stats
    assert stats.verifies > 0
    if choice == "ngram" or (choice == "draft_model" and name == "llama"):
        assert 0 < stats.accepted


@pytest.mark.parametrize("choice", ["ngram", "draft_model"])
def test_batching_mixed_with_plain_equals_plain(models, target, choice):
    name, eng = target
    spec = CHOICES[choice](models, name)
    opts = BatchingOptions(kv_cache_tokens=2048, block_size=4, step_tokens=32,
                           interleave_tokens=8)
    requests = [(p, dict(max_tokens=40, speculative=spec if i % 2 == 0 else False))
                for i, p in enumerate(PROMPTS)]
    requests += [(p, dict(max_tokens=21, speculative=spec, stop=["9"])) for p in PROMPTS]
    eng.start_batching(opts)
    ids = [eng.add_request(p, **kw) for p, kw in requests]
    text = {i: "" for i in ids}
    tokens = {i: [] for i in ids}
    usage = {}
    while eng.has_unfinished():
        for out in eng.step():
            text[out.request_id] += out.text
            tokens[out.request_id] += out.token_ids
            if out.finished:
                usage[out.request_id] = (out.completion_tokens, out.finish_reason)
    assert eng.runner.cache.stats()["blocks_used"] == 0
    for (prompt, kw), i in zip(requests, ids):
        plain_kw = {k: v for k, v in kw.items() if k != "speculative"}
        plain = eng.generate(prompt, speculative=False, **plain_kw)
        assert (text[i], tokens[i]) == (plain.text, plain.tokens), (prompt, kw)
        assert usage[i] == (len(plain.tokens), plain.finish_reason)


def test_sampled_requests_run_with_every_drafter(models, target):
    name, eng = target
    for choice in ("ngram", "draft_model"):
        spec = CHOICES[choice](models, name)
        a = eng.generate(PROMPTS[1], max_tokens=30, temperature=0.8, top_p=0.9, seed=4,
                         speculative=spec)
        b = eng.generate(PROMPTS[1], max_tokens=30, temperature=0.8, top_p=0.9, seed=4,
                         speculative=spec)
        assert a.tokens == b.tokens and len(a.tokens) == 30  # seeded: repeatable


def test_bad_options_are_clear_errors(models, tmp_path):
    eng = Engine.load(str(models["llama"]))
    other = swap_two_tokens(tiny_model("qwen2", tmp_path))
    with pytest.raises(RequestError, match="another tokenizer than the target"):
        eng.generate("x", max_tokens=2, speculative={"method": "draft_model",
                                                     "options": {"model": str(other)}})
    with pytest.raises(RequestError, match="recurrent state"):
        eng.generate("x", max_tokens=2, speculative={
            "method": "draft_model", "options": {"model": str(models["qwen3_5_text"])}})
    with pytest.raises(RequestError, match="needs speculative.model"):
        eng.generate("x", max_tokens=2, speculative={"method": "draft_model"})
    with pytest.raises(RequestError, match=r"num_draft_tokens=17 is out of range.*\[1, 16\]"):
        eng.generate("x", max_tokens=2, speculative={"method": "ngram",
                                                     "num_draft_tokens": 17})
    with pytest.raises(ConfigError, match="'medusa' is not a registered drafter; "
                                          "registered: draft_model, mtp, ngram, self"):
        Engine.load(str(models["llama"]), speculative=SpeculativeOptions(method="medusa"))


@pytest.fixture(scope="module")
def smollm2():
    if os.environ.get("LATTICE_OFFLINE"):
        pytest.skip("LATTICE_OFFLINE is set: not pulling SmolLM2")
    from lattice_engine.io.catalog import pull
    return pull("smollm2-135m", quiet=True)


def test_smollm2_ngram_and_draft_model_equal_plain(smollm2):
    eng = Engine.load(str(smollm2))
    messages = [{"role": "user", "content": "Fix the typo in this code and print the whole "
                 "code:\ndef add(a, b):\n    retrun a + b\n\nprint(add(1, 2))\n"}]
    ids = eng.prompt_ids(messages=messages)
    plain = eng.generate(ids, max_tokens=64, speculative=False)
    ngram = {"method": "ngram", "num_draft_tokens": 4}
    draft = {"method": "draft_model", "num_draft_tokens": 3,
             "options": {"model": str(smollm2), "quant": "q8_0"}}
    for spec in (ngram, draft):
        got = eng.generate(ids, max_tokens=64, speculative=spec)
        assert got.tokens == plain.tokens, spec["method"]
        assert eng.speculation_for(spec).stats.accepted > 0
    opts = BatchingOptions(kv_cache_tokens=4096, block_size=16)
    eng.start_batching(opts)
    rids = [eng.add_request(ids, max_tokens=64, speculative=spec)
            for spec in (ngram, False, draft, draft)]
    got = {r: [] for r in rids}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id] += out.token_ids
    assert all(got[r] == plain.tokens for r in rids)


@pytest.mark.parametrize("eos", [-1, 0])
def test_grammar_constrained_output_equals_plain(tmp_path, eos):
    """An xgrammar regex (the server's `regex` field) with n-gram drafts: the matcher
    advances over the drafts for each verify row and rolls back what was rejected. With
    eos -1 the grammar ends without a stop token, with eos 0 on one."""
    pytest.importorskip("xgrammar")
    eng = Engine.load(str(tiny_model("llama", tmp_path, eos_token_id=eos)))
    regex = r"(abc|abd|xyz){3,12}"
    spec = {"method": "ngram", "num_draft_tokens": 4, "options": {"prompt_lookup_min": 1}}
    prompt = "abcabdxyzabcabc"
    plain = eng.generate(prompt, max_tokens=40, regex=regex, speculative=False)
    got = eng.generate(prompt, max_tokens=40, regex=regex, speculative=spec)
    assert got.tokens == plain.tokens and got.finish_reason == plain.finish_reason
    assert eng.speculation_for(spec).stats.verifies > 0
    eng.start_batching(BatchingOptions(kv_cache_tokens=1024, block_size=4))
    a = eng.add_request(prompt, max_tokens=40, speculative=spec,
                        logits_mask=eng.grammar_matcher(regex=regex))
    b = eng.add_request(prompt, max_tokens=40, speculative=False,
                        logits_mask=eng.grammar_matcher(regex=regex))
    out = {a: [], b: []}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.token_ids
    assert out[a] == plain.tokens and out[b] == plain.tokens


def test_draft_model_batches_its_drafts_and_falls_back_when_its_pool_is_full(models):
    """Under continuous batching the draft model drafts every sequence in one batched
    forward per position (propose_batch); a draft pool too small for some requests leaves
    those decoding plainly; outputs stay plain decoding's either way."""
    eng = Engine.load(str(models["llama"]))
    opts = BatchingOptions(kv_cache_tokens=2048, block_size=4, step_tokens=64)
    for pool in (8192, 48):
        spec = {"method": "draft_model", "num_draft_tokens": 3, "adaptive": False,
                "options": {"model": str(models["llama"]), "quant": "q8_0",
                            "kv_cache_tokens": pool}}
        speculation = eng.speculation_for(spec)
        calls = []
        batch = speculation.drafter.propose_batch
        speculation.drafter.propose_batch = lambda reqs, ks: calls.append(len(reqs)) or \
            batch(reqs, ks)
        eng.start_batching(opts)
        ids = [eng.add_request(p, max_tokens=30, speculative=spec) for p in PROMPTS]
        got = {i: [] for i in ids}
        while eng.has_unfinished():
            for out in eng.step():
                got[out.request_id] += out.token_ids
        assert max(calls) > 1
        assert speculation.stats.accepted > 0
        for p, i in zip(PROMPTS, ids):
            assert got[i] == eng.generate(p, max_tokens=30, speculative=False).tokens
        assert speculation.drafter._pool.stats()["blocks_used"] == 0  # released at the end


def test_a_failing_propose_batch_falls_back_to_each_request(models):
    eng = Engine.load(str(models["llama"]))
    spec = {"method": "draft_model", "num_draft_tokens": 2, "adaptive": False,
            "options": {"model": str(models["qwen2"])}}
    speculation = eng.speculation_for(spec)

    def broken(reqs, ks):
        raise RuntimeError("batch broke")

    speculation.drafter.propose_batch = broken
    eng.start_batching(BatchingOptions(kv_cache_tokens=2048, block_size=4))
    ids = [eng.add_request(p, max_tokens=12, speculative=spec) for p in PROMPTS[:3]]
    got = {i: [] for i in ids}
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id] += out.token_ids
            assert out.finish_reason in (None, "length")
    for p, i in zip(PROMPTS[:3], ids):
        assert got[i] == eng.generate(p, max_tokens=12, speculative=False).tokens
    assert speculation.stats.verifies > 0


def test_single_request_decodes_drafts_and_verifies_in_fused_steps(models):
    """One request with a draft model: after the prompt (prefilled on the per-kernel path,
    being longer than a verify), the target's verifies and the draft model's drafts and
    catch-ups all run fused C steps (`lk_decoder_step` for one row, `lk_decoder_step_rows`
    for several), never the per-kernel path, whose first op is the embedding lookup."""
    eng = Engine.load(str(models["llama"]))
    spec = {"method": "draft_model", "num_draft_tokens": 3, "adaptive": False,
            "options": {"model": str(models["llama"]), "quant": "q8_0"}}
    drafter = eng.speculation_for(spec).drafter
    per_kernel, rows = [], []
    for ops in {id(m.ops): m.ops for m in (eng.model, drafter.model)}.values():
        embed = ops.embed
        ops.embed = lambda table, ids, embed=embed: per_kernel.append(ids.shape[1]) or \
            embed(table, ids)
    for model in (eng.model, drafter.model):
        step = model._decode_step()
        multi = step.rows
        step.rows = lambda *a, multi=multi, **k: rows.append(len(a[0])) or multi(*a, **k)
    prompt = "abcabcabcabcabc" * 3
    n = len(eng.prompt_ids(prompt=prompt))
    got = eng.generate(prompt, max_tokens=24, speculative=spec)
    # the prompt in the target; in the draft, the prompt and the first token (the draft
    # model sees the request first when the target has sampled from the prompt)
    assert per_kernel == [n, n + 1], per_kernel
    assert rows and max(rows) <= 4  # verifies of k + 1 = 4 rows, catch-ups of 2
    assert got.tokens == eng.generate(prompt, max_tokens=24, speculative=False).tokens


def test_a_draft_model_estimates_its_cost_from_its_weight_bytes(models):
    """Before anything is measured the batch plan weighs a draft token at the draft's
    weight bytes over the target's (contract.Drafter.relative_cost): a q8_0 copy of a
    float32 target reads about 34 / 128 of its bytes."""
    eng = Engine.load(str(models["llama"]))
    same = eng.speculation_for({"method": "draft_model",
                                "options": {"model": str(models["llama"])}})
    q8 = eng.speculation_for({"method": "draft_model",
                              "options": {"model": str(models["llama"]), "quant": "q8_0"}})
    assert same.drafter.relative_cost == pytest.approx(1.0)
    assert q8.drafter.relative_cost == pytest.approx(34 / 128, rel=0.05)
