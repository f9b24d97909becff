"""POST /v1/embeddings driven by the official `openai` client on loopback: an encoder served
for embeddings only (the tiny BERT fixture) and a chat model that also embeds; float and
base64 encodings, `dimensions`, token-id inputs, usage; 400s with clear messages for bad
inputs, too many tokens and a model that cannot embed; the drift detector in /metrics."""

from __future__ import annotations

import base64
import json
import time

import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import FIXTURES, fixture_with_tokenizer  # noqa: E402
from lattice_engine.engine import Engine  # noqa: E402
from lattice_engine.errors import ConfigError  # noqa: E402
from lattice_engine.loading import load  # noqa: E402
from lattice_engine.testing.server import LoopbackServer  # noqa: E402

NAME = "tiny-bert"
TEXTS = ["The river runs north of the city.", "Vector search over data", "school"]


def Served(engine: Engine, name: str = NAME, **settings) -> LoopbackServer:
    return LoopbackServer(engine, model_name=name, **settings)


@pytest.fixture(scope="module")
def bert_engine():
    return Engine.load(str(FIXTURES / "bert"))


@pytest.fixture(scope="module")
def served(bert_engine):
    s = Served(bert_engine)
    yield s
    s.stop()


def test_openai_client_float_base64_and_dimensions(served, bert_engine):
    want = bert_engine.embed(TEXTS)
    got = served.client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    assert [d.index for d in got.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in got.data], np.float32)
    assert np.array_equal(vectors, want)  # the same computation, serialised exactly
    tokens = sum(len(i) for i in bert_engine.embedder.tokenize(TEXTS))
    assert got.usage.prompt_tokens == tokens and got.usage.total_tokens == tokens
    assert got.model == NAME

    # asked for explicitly, base64 strings of little-endian float32 come back as they are
    b64 = served.client.embeddings.create(model=NAME, input=TEXTS, encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in b64.data])
    assert np.array_equal(decoded, want)
    # without encoding_format the client asks for base64 and decodes it itself
    default = served.client.embeddings.create(model=NAME, input=TEXTS)
    assert np.array_equal(np.array([d.embedding for d in default.data], np.float32), want)

    cut = served.client.embeddings.create(model=NAME, input=TEXTS, dimensions=8,
                                          encoding_format="float")
    cut = np.array([d.embedding for d in cut.data], np.float32)
    assert cut.shape == (3, 8)
    assert np.allclose(cut, bert_engine.embed(TEXTS, dimensions=8), atol=1e-7)
    assert np.allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-6)


def test_token_id_inputs(served, bert_engine):
    ids = bert_engine.embedder.tokenize(TEXTS)
    one = served.client.embeddings.create(model=NAME, input=ids[0])
    assert np.array_equal(np.array(one.data[0].embedding, np.float32), bert_engine.embed(TEXTS[0])[0])
    many = served.client.embeddings.create(model=NAME, input=ids)
    assert np.array_equal(np.array([d.embedding for d in many.data], np.float32),
                          bert_engine.embed(TEXTS))


def test_bad_inputs_are_400s_and_the_server_stays_up(served):
    cases = [
        ({"input": ""}, "input[0] is an empty string", "input"),
        ({"input": []}, "'input' is empty", "input"),
        ({"input": ["ok", ""]}, "input[1] is an empty string", "input"),
        ({"input": [[]]}, "input[0] is an empty token array", "input"),
        ({"input": [1.5]}, "input[0] must be a string or an array of token ids", "input"),
        ({"input": {"a": 1}}, "'input' must be a string", "input"),
        ({}, "'input' is required", "input"),
        ({"input": " ".join(["city"] * 40)}, "42 tokens; this model embeds at most 32", "input"),
        ({"input": [[1, 10 ** 6]]}, "token ids must lie in 0..", "input"),
        ({"input": "x", "dimensions": 65}, "must be an integer in 1..64", "dimensions"),
        ({"input": "x", "dimensions": 0}, "'dimensions' must be an integer >= 1", "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "'encoding_format' must be 'float' or "
                                                     "'base64'", "encoding_format"),
    ]
    for body, message, param in cases:
        status, err = served.post("/v1/embeddings", {"model": NAME, **body})
        assert status == 400, (body, err)
        assert message in err["error"]["message"], (body, err)
        assert err["error"]["param"] == param
    status, err = served.post("/v1/embeddings", {"model": NAME,
                                                 "input": " ".join(["city"] * 40)})
    assert err["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="empty string"):
        served.client.embeddings.create(model=NAME, input="")
    with pytest.raises(openai.NotFoundError):
        served.client.embeddings.create(model="other", input="x")
    # an embedding-only model cannot generate: a 400 that says where to go
    with pytest.raises(openai.BadRequestError, match="embedding-only"):
        served.client.chat.completions.create(model=NAME, messages=[{"role": "user",
                                                                     "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="embedding-only"):
        served.client.completions.create(model=NAME, prompt="hi")
    assert served.client.embeddings.create(model=NAME, input="still up").data
    assert served.metrics()['lattice_http_responses_total{status="400"}'] >= len(cases)


def test_a_chat_model_also_embeds(tmp_path):
    folder = fixture_with_tokenizer("qwen3", tmp_path)
    engine = Engine.load(str(folder))
    s = Served(engine, name="chat")
    try:
        got = s.client.embeddings.create(model="chat", input=["hello there", "hi"])
        want = engine.embed(["hello there", "hi"])  # last token, normalised
        assert np.array_equal(np.array([d.embedding for d in got.data], np.float32), want)
        chat = s.client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        s.stop()


def test_a_model_that_cannot_embed_is_a_400(tmp_path):
    folder = fixture_with_tokenizer("llama", tmp_path)
    loaded = load(folder)

    class NoWidth:  # a model whose config has no hidden_size cannot pool to a vector
        vocab_size = loaded.model.config.vocab_size

    engine = Engine(loaded)
    engine.start_batching()  # serve builds its runner from the real model first
    loaded.model.config, real = NoWidth(), loaded.model.config
    with pytest.raises(ConfigError, match="cannot embed"):
        engine.embedder
    loaded.model.config = real
    s = Served(engine, name="nowidth")
    try:
        loaded.model.config = NoWidth()
        status, err = s.post("/v1/embeddings", {"model": "nowidth", "input": "x"})
        assert status == 400 and err["error"]["code"] == "model_cannot_embed"
        assert "'nowidth' cannot embed" in err["error"]["message"]
    finally:
        loaded.model.config = real
        s.stop()


def test_drift_alarm_in_metrics(bert_engine):
    s = Served(bert_engine, drift_window=128, drift_every=16)
    try:
        m = s.metrics()
        assert m['lattice_drift_state{state="warming"}'] == 1
        rng = np.random.default_rng(0)
        vocab = json.loads((FIXTURES / "bert" / "tokenizer.json").read_text())["model"]["vocab"]
        words = [w for w in vocab if w.isalpha() and len(w) > 2]

        def batch(n, pool):
            return [" ".join(rng.choice(pool, size=6)) for _ in range(n)]

        for _ in range(6):  # 6 x 48 = 288 inputs: reference (128) + a full rolling window
            s.client.embeddings.create(model=NAME, input=batch(48, words))
        deadline = time.time() + 120
        while s.metrics()["lattice_drift_checks_total"] < 3:
            assert time.time() < deadline, "the drift checks did not run"
            time.sleep(0.2)
        m = s.metrics()
        assert m['lattice_drift_state{state="stable"}'] == 1 and m["lattice_drift_alarm"] == 0
        assert 0 <= m["lattice_drift_distance"] < m["lattice_drift_threshold"]
        # inputs from elsewhere: one repeated unknown-word string
        for _ in range(4):
            s.client.embeddings.create(model=NAME, input=["zzqx qqzx"] * 48)
        deadline = time.time() + 120
        while s.metrics()["lattice_drift_alarm"] != 1:
            assert time.time() < deadline, "no drift alarm after a shift"
            time.sleep(0.2)
        m = s.metrics()
        assert m['lattice_drift_state{state="drift"}'] == 1
        assert m["lattice_drift_distance"] > m["lattice_drift_threshold"]
        assert m["lattice_drift_observations_total"] == 6 * 48 + 4 * 48
        assert m["lattice_drift_errors_total"] == 0
    finally:
        s.stop()


def test_a_chat_server_watches_its_prompts_for_drift(tmp_path):
    from lattice_engine.server.app import prompt_vector
    folder = fixture_with_tokenizer("qwen3", tmp_path)
    engine = Engine.load(str(folder))
    v = prompt_vector(engine.model, [5, 6, 7])
    table = engine.model.embed_tokens.to_float()
    assert np.allclose(v, table[[5, 6, 7]].mean(0) / np.linalg.norm(table[[5, 6, 7]].mean(0)))
    s = Served(engine, name="chat", drift_window=128)
    try:
        for i in range(3):
            s.client.completions.create(model="chat", prompt=f"hello {i}", max_tokens=1)
        s.client.embeddings.create(model="chat", input=["not watched here"])
        deadline = time.time() + 60
        while s.metrics()["lattice_drift_observations_total"] < 3:
            assert time.time() < deadline, "the prompts were not observed"
            time.sleep(0.1)
        time.sleep(0.3)
        m = s.metrics()
        assert m["lattice_drift_observations_total"] == 3  # prompts only, not /v1/embeddings
        assert m['lattice_drift_state{state="warming"}'] == 1
    finally:
        s.stop()
