"""Adapters chosen per request under continuous batching: rows of one batch with different
adapters or none (the fused paged step on native, the per-kernel path on numpy), each
request as if alone; the prefix cache never shares blocks across adapters; a request keeps
the adapter version it started with; unknown names are refused before anything queues."""

from __future__ import annotations

import shutil

import pytest

from conftest import CORE_FIXTURES, LORA_FIXTURES, backends
from lattice_engine.adapters import UnknownAdapter
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.testing.checkpoints import write_tokenizer_files

OPTS = BatchingOptions(kv_cache_tokens=1024, block_size=4, step_tokens=24, interleave_tokens=8)


def make_engine(tmp_path, base: str, backend: str, quant=None) -> Engine:
    folder = tmp_path / base
    shutil.copytree(CORE_FIXTURES / base, folder)
    write_tokenizer_files(folder, eos_token_id=-1)  # random weights: never stop early
    engine = Engine.load(str(folder), backend=backend, quant=quant)
    engine.load_adapter(LORA_FIXTURES / base, name="a")
    engine.adapters.mix("b", [("a", -2.0)])          # another adapter: a different update
    return engine


def run_all(engine, requests):
    engine.start_batching(OPTS)
    ids = [engine.add_request(p, **kw) for p, kw in requests]
    out = {i: [[], None, 0] for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0] += o.token_ids
            out[o.request_id][2] = max(out[o.request_id][2], o.cached_tokens)
            if o.finished:
                out[o.request_id][1] = o.finish_reason
    assert engine.runner.cache.stats()["blocks_used"] == 0
    return [out[i] for i in ids]


REQUESTS = [("The quick brown fox", dict(max_tokens=8, adapter="a")),
            ("The quick brown fox", dict(max_tokens=8)),
            ("hello there, adapters", dict(max_tokens=6, adapter="b")),
            ("0123456789" * 3, dict(max_tokens=7, adapter="a")),
            ("xyz", dict(max_tokens=5, adapter="b"))]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("base,quant", [("llama", None), ("qwen3_5_text", None),
                                        ("llama", "q8_0"), ("qwen3_5_text", "f16")])
def test_rows_with_different_adapters_equal_each_request_alone(tmp_path, base, quant, backend):
    # quantized bases: the native kernels read float16 factors (and f16 KV), same contract
    engine = make_engine(tmp_path, base, backend, quant)
    batched = run_all(engine, REQUESTS)
    for (prompt, kw), (tokens, reason, _) in zip(REQUESTS, batched):
        single = engine.generate(prompt, **kw)          # dense cache, one adapter
        assert tokens == single.tokens, (prompt, kw)
        assert reason == "length"
    # the adapters change the output: the same prompt with and without "a" differs
    assert batched[0][0] != batched[1][0]
    assert not engine.adapters.slots.refs or all(
        n == 1 for n in engine.adapters.slots.refs.values())  # requests let go


def test_prefix_cache_is_keyed_by_adapter(tmp_path):
    engine = make_engine(tmp_path, "llama", "numpy")
    prompt = "a shared prefix that spans blocks"
    first = run_all(engine, [(prompt, dict(max_tokens=2, adapter="a"))])
    # the runner (and its prefix cache) stays: later requests can hit the first's blocks
    ids = {}
    for name, kw in (("same", dict(adapter="a")), ("other", dict(adapter="b")),
                     ("none", {})):
        ids[name] = engine.add_request(prompt, max_tokens=2, **kw)
        cached = 0
        while engine.has_unfinished():
            for o in engine.step():
                cached = max(cached, o.cached_tokens)
        ids[name] = cached
    assert first[0][2] == 0
    assert ids["same"] > 0 and ids["other"] == 0 and ids["none"] == 0


def test_a_running_request_keeps_its_adapter_version(tmp_path):
    engine = make_engine(tmp_path, "llama", "numpy")
    want = engine.generate("version check", adapter="a", max_tokens=10).tokens
    engine.start_batching(OPTS)
    rid = engine.add_request("version check", adapter="a", max_tokens=10)
    tokens = []
    for o in engine.step():
        tokens += o.token_ids
    engine.adapters.mix("a", [("b", 3.0)])   # replace "a" while the request runs
    engine.unload_adapter("b")
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            tokens += o.token_ids
    assert tokens == want
    assert engine.generate("version check", adapter="a", max_tokens=10).tokens != want
    assert sorted(engine.adapters.slots.weights) == [engine.adapters.by_name["a"]]


def test_an_unknown_adapter_is_refused_before_queueing(tmp_path):
    engine = make_engine(tmp_path, "llama", "numpy")
    engine.start_batching(OPTS)
    with pytest.raises(UnknownAdapter, match="'nope' is not loaded; loaded: a, b"):
        engine.add_request("x", adapter="nope")
    with pytest.raises(UnknownAdapter):
        engine.generate("x", adapter="nope")
    assert not engine.has_unfinished()


def test_config_section_and_cli_adapter(tmp_path, capsys):
    from lattice_engine.cli import main
    from lattice_engine.config import config_from_dict
    from lattice_engine.errors import ConfigError
    folder = tmp_path / "llama"
    shutil.copytree(CORE_FIXTURES / "llama", folder)
    write_tokenizer_files(folder, eos_token_id=-1)
    lora = str(LORA_FIXTURES / "llama")
    config = config_from_dict({"model": {"path": str(folder), "backend": "numpy"},
                               "lora": {"adapters": {"a": lora},
                                        "mixtures": {"half": {"a": 0.5}}}})
    engine = Engine.from_config(config)
    assert engine.adapters.names() == ["a", "half"]
    want = engine.generate("abc", adapter="a", max_tokens=5, temperature=0).text
    from lattice_engine.plugins import get_plugin_manager
    bad = config_from_dict({"lora": {"adapters": {"a": lora}, "mixtures": {"m": {"b": 1.0}}}})
    with pytest.raises(ConfigError, match=r"mixtures.m.b: no adapter 'b' in adapters"):
        bad.validate(get_plugin_manager().registry)
    merged = Engine.from_config(config_from_dict(
        {"model": {"path": str(folder), "backend": "numpy"},
         "lora": {"adapters": {"a": lora}, "merge": "a"}}))
    assert merged.generate("abc", max_tokens=5, temperature=0).text == want
    # the CLI: lattice generate --adapter DIR
    rc = main(["generate", "abc", "--raw", "--model", str(folder), "--backend", "numpy",
               "--adapter", lora, "--max-tokens", "5", "--temperature", "0", "--json"])
    assert rc == 0
    import json
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"] == want


def test_a_quarot_rotated_model_refuses_adapters(tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(CORE_FIXTURES / "llama", folder)
    engine = Engine.load(str(folder), backend="numpy")
    engine.loaded.checkpoint.config["quarot"] = {"seed": 0}   # as the QuaRot transform marks it
    from lattice_engine.errors import RequestError
    with pytest.raises(RequestError, match="QuaRot-rotated"):
        engine.load_adapter(LORA_FIXTURES / "llama")
