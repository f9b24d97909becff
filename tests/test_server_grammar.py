"""Structured output through the server (openai client, SmolLM2, skipped with
LATTICE_OFFLINE): response_format json_schema / json_object and the regex / grammar
fields constrain the output; an invalid schema is a 400 with xgrammar's message; a batch
mixing constrained and unconstrained requests gives each its own behaviour."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from grammar_support import require_xgrammar_or_skip

require_xgrammar_or_skip()
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

from test_server import MODEL, RunningServer, loaded  # noqa: E402,F401  (shared fixture)
from lattice_engine.batching import BatchingOptions  # noqa: E402

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "colour": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "colour"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(loaded):  # noqa: F811
    s = RunningServer(loaded, BatchingOptions(kv_cache_tokens=4096, max_running=8,
                                              step_tokens=256, interleave_tokens=32))
    yield s
    s.stop()


def schema_chat(client, temperature: float, seed: int = 0):
    return client.chat.completions.create(
        model=MODEL, temperature=temperature, seed=seed, max_tokens=80,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": PERSON}})


def test_json_schema_output_validates(server):
    for temperature in (0.0, 1.0):
        out = schema_chat(server.client, temperature)
        jsonschema.validate(json.loads(out.choices[0].message.content), PERSON)


def test_regex_and_grammar_fields_on_completions(server):
    out = server.client.completions.create(model=MODEL, prompt="The year was", max_tokens=12,
                                           temperature=0, extra_body={"regex": r" [12][0-9]{3}"})
    assert re.fullmatch(r" [12][0-9]{3}", out.choices[0].text)
    ebnf = 'root ::= "yes" | "no"'
    out = server.client.completions.create(model=MODEL, prompt="Is water wet?", max_tokens=5,
                                           temperature=1, seed=3, extra_body={"grammar": ebnf})
    assert out.choices[0].text in ("yes", "no")


def test_invalid_schema_is_a_400_and_the_server_goes_on(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client.chat.completions.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "frobnicate"}}})
    assert "frobnicate" in str(info.value)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model=MODEL, prompt="x", max_tokens=3,
                                         extra_body={"grammar": "root ::= ("})
    ok = server.client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3,
                                          temperature=0)
    assert ok.usage.completion_tokens == 3


def test_constrained_and_free_requests_share_a_batch(server):
    free = dict(model=MODEL, temperature=0, max_tokens=12,
                messages=[{"role": "user", "content": "Say hello."}])
    alone_free = server.client.chat.completions.create(**free).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(schema_chat, server.client, 0.0) if i % 2 else
                   pool.submit(server.client.chat.completions.create, **free) for i in range(6)]
        results = [f.result() for f in futures]
    for i, r in enumerate(results):
        text = r.choices[0].message.content
        if i % 2:
            jsonschema.validate(json.loads(text), PERSON)
        else:
            assert text == alone_free
    assert server.runner.cache.stats()["blocks_used"] == 0
