"""Per-request speculation over the OpenAI server: the `speculative` body field (off, the
server's default, a tuned draft length, ngram with its options), 400s naming the field
for what a request may not choose, and the lattice_spec_* series in /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from conftest import tiny_model
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.speculative import SpeculativeOptions

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from lattice_engine.testing.server import LoopbackServer
    folder = tiny_model("llama", tmp_path_factory.mktemp("server"))
    engine = Engine.load(str(folder), speculative=SpeculativeOptions(
        method="ngram", num_draft_tokens=3, adaptive=False,  # counts independent of timing
        options={"prompt_lookup_min": 1}))
    srv = LoopbackServer(engine, model_name="tiny",
                         options=BatchingOptions(kv_cache_tokens=2048, block_size=4))
    yield srv.base, engine
    srv.stop()

def post(base, body):
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_speculative_field_selects_per_request(server):
    base, engine = server
    prompt = "abcabcabcabc abcabc"
    want = engine.generate(prompt, max_tokens=24, speculative=False).text
    for choice in (None, False, True, {"num_draft_tokens": 2},
                   {"method": "ngram", "options": {"prompt_lookup_max": 2}}):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0}
        if choice is not None:
            body["speculative"] = choice
        status, out = post(base, body)
        assert status == 200, out
        assert out["choices"][0]["text"] == want, choice
        assert out["usage"]["completion_tokens"] == 24
    # log-probabilities (and their alternatives) of verified tokens are plain decoding's
    lp = {}
    for choice in (False, True):
        status, out = post(base, {"model": "tiny", "prompt": prompt, "max_tokens": 24,
                                  "temperature": 0, "logprobs": 3, "speculative": choice})
        assert status == 200, out
        lp[choice] = out["choices"][0]["logprobs"]
    assert lp[True] == lp[False] and len(lp[True]["token_logprobs"]) == 24
    text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line.startswith("lattice_spec_")}
    assert series['lattice_spec_verifies_total{method="ngram"}'] > 0
    assert 0 < series['lattice_spec_acceptance_rate{method="ngram"}'] <= 1
    assert series['lattice_spec_mean_accepted_per_verify{method="ngram"}'] >= 1


@pytest.mark.parametrize("choice, message", [
    ({"method": "draft_model"}, "'speculative.method' = 'draft_model' is not available to a "
                                "request on this server; choices: mtp, ngram, self"),
    ({"method": "mtp"}, "speculative method 'mtp' drafts with a Qwen3.5 model's own layers"),
    ({"method": "ngram", "num_draft_tokens": 0}, "num_draft_tokens=0 is out of range"),
    ({"method": "ngram", "options": {"prompt_lookup_max": 0}},
     "prompt_lookup_max = 0 is out of range"),
    ({"mthod": "ngram"}, "unknown speculative field(s) mthod"),
    ("yes", "'speculative'"),
])
def test_bad_choices_are_400s_naming_the_field(server, choice, message):
    base, _ = server
    status, out = post(base, {"model": "tiny", "prompt": "hi", "max_tokens": 4,
                              "speculative": choice})
    assert status == 400, out
    assert message in out["error"]["message"]
    assert post(base, {"model": "tiny", "prompt": "hi", "max_tokens": 2})[0] == 200
