"""Adapters over the OpenAI API: `model: "<adapter>"` per request, GET /v1/models lists
them, hot load / unload (API key required), OpenAI error objects for bad input (400 / 404),
and the server keeps serving everything else."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from conftest import CORE_FIXTURES, LORA_FIXTURES

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from lattice_engine.batching import BatchingOptions  # noqa: E402
from lattice_engine.engine import Engine  # noqa: E402
from lattice_engine.testing.server import LoopbackServer  # noqa: E402
from lattice_engine.testing.checkpoints import write_tokenizer_files  # noqa: E402

KEY = "sekrit"


class Server(LoopbackServer):
    def __init__(self, engine, **settings):
        super().__init__(engine, model_name="tiny",
                         options=BatchingOptions(kv_cache_tokens=1024, block_size=4), **settings)

    def call(self, method, path, body=None, key=KEY):
        return self.request(method, path, body, key=key)


@pytest.fixture
def engine(tmp_path):
    folder = tmp_path / "llama"
    shutil.copytree(CORE_FIXTURES / "llama", folder)
    write_tokenizer_files(folder, eos_token_id=-1)
    return Engine.load(str(folder), backend="numpy")


def complete(srv, model, **kw):
    return srv.call("POST", "/v1/completions", dict(model=model, prompt="The quick brown",
                                                     max_tokens=6, temperature=0, **kw))


def test_load_serve_list_unload(engine):
    srv = Server(engine, api_key=KEY)
    try:
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "sql", "lora_path": str(LORA_FIXTURES / "llama")})
        assert status == 200 and body["modules"] == 14, body
        status, body = srv.call("GET", "/v1/models")
        assert [m["id"] for m in body["data"]] == ["tiny", "sql"]
        assert body["data"][1]["parent"] == "tiny"
        base = complete(srv, "tiny")[1]["choices"][0]["text"]
        adapted = complete(srv, "sql")[1]["choices"][0]["text"]
        want = engine.generate("The quick brown", adapter="sql", max_tokens=6,
                               temperature=0).text
        assert adapted == want and adapted != base
        status, body = srv.call("POST", "/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 200
        status, body = complete(srv, "sql")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert "'tiny'" in body["error"]["message"]
    finally:
        srv.stop()


def test_bad_adapters_are_clear_errors_and_disturb_nothing(engine, tmp_path):
    srv = Server(engine, api_key=KEY)
    try:
        ok = complete(srv, "tiny")[1]["choices"][0]["text"]
        # an adapter for another base model (qwen3's: q_proj is [128, 64] there)
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "x", "lora_path": str(LORA_FIXTURES / "qwen3")})
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
        msg = body["error"]["message"]
        assert "adapter 'x' (for base model tests/fixtures/qwen3)" in msg
        assert "self_attn.k_proj' has lora_A (4, 64) and lora_B (64, 4)" in msg
        assert "[32, 64]" in msg and "must be (4, 64) and (32, 4)" in msg
        # a truncated weights file
        cut = tmp_path / "cut"
        shutil.copytree(LORA_FIXTURES / "llama", cut)
        data = (cut / "adapter_model.safetensors").read_bytes()
        (cut / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "x", "lora_path": str(cut)})
        assert status == 400 and "truncated" in body["error"]["message"]
        # a missing folder, a missing field
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "x", "lora_path": str(tmp_path / "nope")})
        assert status == 400 and "not a folder" in body["error"]["message"]
        status, body = srv.call("POST", "/v1/load_lora_adapter", {"lora_name": "x"})
        assert status == 400 and body["error"]["param"] == "lora_path"
        # unknown names
        status, body = srv.call("POST", "/v1/unload_lora_adapter", {"lora_name": "nope"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = complete(srv, "nope")
        assert status == 404 and body["error"]["param"] == "model"
        # the server still serves, with the same output
        assert complete(srv, "tiny")[1]["choices"][0]["text"] == ok
        assert srv.call("GET", "/health")[1]["status"] == "ok"
    finally:
        srv.stop()


def test_adapter_management_needs_an_api_key(engine):
    srv = Server(engine)   # no key configured: generation is open, management is not
    try:
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "a", "lora_path": str(LORA_FIXTURES / "llama")},
                                key=None)
        assert status == 403 and body["error"]["code"] == "api_key_required"
    finally:
        srv.stop()
    srv = Server(engine, api_key=KEY)
    try:
        status, body = srv.call("POST", "/v1/load_lora_adapter",
                                {"lora_name": "a", "lora_path": str(LORA_FIXTURES / "llama")},
                                key="wrong")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    finally:
        srv.stop()


def test_adapt_endpoint_trains_between_steps_and_streams_keep_their_version(engine):
    srv = Server(engine, api_key=KEY)
    try:
        srv.call("POST", "/v1/load_lora_adapter",
                 {"lora_name": "a", "lora_path": str(LORA_FIXTURES / "llama")})
        before = complete(srv, "a")[1]["choices"][0]["text"]
        # a long request in flight on version 1 while the adapter trains
        results = {}

        def long_request():
            results["long"] = srv.call("POST", "/v1/completions", dict(
                model="a", prompt="The quick brown", max_tokens=40, temperature=0))

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.time() + 30
        while not srv.app.lattice.engine.runner.num_running():   # it holds version 1 now
            assert time.time() < deadline
            time.sleep(0.005)
        status, body = srv.call("POST", "/v1/adapt_lora_adapter", {
            "lora_name": "a", "text": "the lazy dog sleeps. " * 4, "steps": 5,
            "optimizer": {"kind": "adamw", "lr": 0.05, "clip": 1.0}})
        t.join(timeout=120)
        assert status == 200, body
        assert body["version"] == 2 and len(body["loss"]) == 5
        assert body["loss"][-1] < body["loss"][0]
        base_text = engine.generate("The quick brown", max_tokens=40, temperature=0).text
        long = results["long"][1]["choices"][0]["text"]
        assert long.startswith(before)           # the in-flight request kept version 1
        assert long != base_text
        after = complete(srv, "a")[1]["choices"][0]["text"]
        assert after != before                    # new requests use version 2
        # bad training input: 400 / 404, and nothing else changes
        status, body = srv.call("POST", "/v1/adapt_lora_adapter",
                                {"lora_name": "a", "text": "x y", "optimizer": {"kind": "lion"}})
        assert status == 400 and "lion" in body["error"]["message"]
        status, body = srv.call("POST", "/v1/adapt_lora_adapter",
                                {"lora_name": "zz", "text": "x y"})
        assert status == 404
        status, body = srv.call("POST", "/v1/adapt_lora_adapter",
                                {"lora_name": "a", "text": "x y"}, key=None)
        assert status == 401
        assert complete(srv, "a")[1]["choices"][0]["text"] == after
    finally:
        srv.stop()
