"""A plugin written from the hook docs and lattice_engine.contract alone, outside the repo:
a weight format and a quant method, a sampler, a logits processor and an architecture that
subclasses none of the core's model classes. It is pip-installed into a temporary venv,
selected in a lattice.toml, and driven through `lattice generate`, `lattice ppl` and
`lattice serve` in that venv's subprocesses, as a user would."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from lattice_engine.testing.checkpoints import write_tokenizer_files

PLUGIN = '''
"""toy-lattice: a bigram language model stored in an int8 block format of its own."""
import numpy as np

from lattice_engine import hookimpl, require_plugin_api
from lattice_engine.cache.paged import PagedKVCache
from lattice_engine.quant.formats import WeightFormat
from lattice_engine.quant.methods import QuantMethod

require_plugin_api(1, 0, plugin="toy-lattice")  # written against hook contract 1.0

BLOCK = 16  # values per block: a float32 scale, then 16 int8


def quantize(w):
    rows, cols = w.shape
    b = np.asarray(w, np.float32).reshape(rows, cols // BLOCK, BLOCK)
    scale = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    q = np.rint(b / np.where(scale > 0, scale, 1)).astype(np.int8)
    out = np.empty((rows, cols // BLOCK, 4 + BLOCK), np.uint8)
    out[..., :4] = scale.astype(np.float32).view(np.uint8)
    out[..., 4:] = q.view(np.uint8)
    return out.reshape(rows, -1)


def to_float(data, cols):
    rows = data.shape[0]
    b = np.ascontiguousarray(data).reshape(rows, cols // BLOCK, 4 + BLOCK)
    scale = np.ascontiguousarray(b[..., :4]).view(np.float32)
    q = np.ascontiguousarray(b[..., 4:]).view(np.int8).astype(np.float32)
    return (q * scale).reshape(rows, cols)


TOY8 = WeightFormat("toy8", BLOCK, 4 + BLOCK, quantize, to_float)
TOY8_METHOD = QuantMethod("toy8", linear="toy8", embedding="f32", lm_head="f32",
                          tied_embedding="f32", fallback="f32",
                          description="int8 blocks of 16 with a float32 scale")


class BigramLM:
    """logits of the next token = column `previous token` of a [V, V] table."""

    def __init__(self, config, table, ops):
        self.config, self.table, self.ops = config, table, ops

    @classmethod
    def from_checkpoint(cls, checkpoint, loader, ops):
        v = int(checkpoint.config["vocab_size"])
        config = type("BigramConfig", (), {"vocab_size": v, "max_position_embeddings": 4096})()
        return cls(config, loader.matrix("bigram.weight", (v, v), "linear"), ops)

    def make_cache(self, batch=1, capacity=256):
        return None  # a bigram remembers nothing

    def hidden_states(self, tokens, cache):
        tokens = np.asarray(tokens, np.int64)
        return np.eye(self.config.vocab_size, dtype=np.float32)[tokens]

    def logits(self, hidden):
        return self.ops.matmul(hidden, self.table)

    def forward(self, tokens, cache, last_only=False):
        hidden = self.hidden_states(tokens, cache)
        return self.logits(hidden[:, -1:] if last_only else hidden)

    def make_paged_cache(self, num_blocks, block_size=16, variant="", max_sequences=0):
        # no keys to keep; the pool still tracks each sequence's blocks
        return PagedKVCache(0, 1, 1, num_blocks, block_size, variant)

    def forward_paged(self, batch, cache):
        return self.logits(self.hidden_states(batch.tokens[batch.logit_rows][None], None))[0]


def second_best(rng):
    return lambda logits: int(np.argsort(-logits, kind="stable")[1])


def ban_token(value):
    if value is None or int(value) < 0:
        return None

    def apply(token_ids, logits):
        logits[int(value)] = -np.inf
        return logits
    return apply


@hookimpl
def register_architectures(register):
    register("toy_bigram", BigramLM)


@hookimpl
def register_weight_formats(register):
    register(TOY8)


@hookimpl
def register_quant_methods(register):
    register(TOY8_METHOD)


@hookimpl
def register_samplers(register):
    register("second_best", second_best)


@hookimpl
def register_logits_processors(register):
    register("ban_token", ban_token)
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "toy-lattice"
version = "0.1.0"
dependencies = []

[project.entry-points.lattice_engine]
toy = "toy_lattice"

[project.entry-points."lattice_engine.quant_methods"]
toy8 = "toy_lattice"
'''

V = 256


def bigram_table() -> np.ndarray:
    """table[next, previous]: after byte i, i + 1 scores 5, i + 2 scores 4, i + 3 scores 3."""
    t = np.zeros((V, V), np.float32)
    for i in range(V):
        for step, score in ((1, 5.0), (2, 4.0), (3, 3.0)):
            t[(i + step) % V, i] = score
    return t


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The plugin pip-installed into its own folder, a checkpoint and a lattice.toml."""
    root = tmp_path_factory.mktemp("external")
    src = root / "toy-lattice"
    (src / "toy_lattice").mkdir(parents=True)
    (src / "toy_lattice" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (src / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    # a venv of its own, which sees the engine installed here (a .pth line adds this
    # interpreter's site-packages, editable installs, pip and setuptools included) and gets
    # the plugin from pip
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    import site as this_site
    ours = [p for p in this_site.getsitepackages() if Path(p).is_dir()]
    (Path(site_dir) / "lattice_engine_host.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", str(src)], check=True)
    model = root / "bigram"
    model.mkdir()
    from safetensors.numpy import save_file
    save_file({"bigram.weight": bigram_table()}, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "toy_bigram", "vocab_size": V}))
    write_tokenizer_files(model, eos_token_id=0)
    (root / "lattice.toml").write_text(textwrap.dedent(f'''
        [model]
        path = "{model}"
        [quant]
        method = "toy8"
        [sampling]
        sampler = "second_best"
        processors = {{ ban_token = {ord("e")} }}
        [plugins]
        load = ["toy"]
    '''))
    env = dict(os.environ)
    env.pop("LATTICE_PLUGINS", None)
    env.pop("PYTHONPATH", None)
    return root, env, str(python)


def lattice(installed, *args, timeout=120) -> subprocess.CompletedProcess:
    root, env, python = installed
    return subprocess.run([python, "-m", "lattice_engine.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_generate_uses_the_plugin_model_format_sampler_and_processor(installed):
    root, env, python = installed
    listed = lattice(installed, "plugins")
    assert listed.returncode == 0, listed.stderr
    toy = next(p for p in json.loads(listed.stdout) if p["name"] == "toy")
    assert toy["distribution"] == "toy-lattice"
    assert toy["registers"]["quant_methods"] == ["toy8"]
    out = lattice(installed, "generate", "a", "--raw", "--max-tokens", "3", "--json")
    assert out.returncode == 0, out.stderr
    # after "a": second best is "c"; after "c" the best "d" stays and "e" is banned, so the
    # second best is "f"; after "f", "h"
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == "cfh"
    # the CLI picks a sampler and a processor value over the config's
    out = lattice(installed, "generate", "a", "--raw", "--max-tokens", "3", "--json",
                  "--sampler", "greedy")
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == "bcd", out.stderr
    out = lattice(installed, "generate", "a", "--raw", "--max-tokens", "3", "--json",
                  "--processor", f"ban_token={ord('c')}")
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == "dfh", out.stderr
    out = lattice(installed, "generate", "a", "--raw", "--processor", "seed=3")
    assert out.returncode == 2 and "sampling.processors.seed" in out.stderr


def test_ppl_scores_with_the_plugin_model(installed):
    root, env, python = installed
    # consecutive byte values: each next byte is the table's favourite
    (root / "chain.txt").write_text("".join(chr(c) for c in range(33, 127)))
    out = lattice(installed, "ppl", "--file", "chain.txt", "--window", "32", "--stride", "16")
    assert out.returncode == 0, out.stderr
    ppl = json.loads(out.stdout.strip().splitlines()[-1])["ppl"]
    # p = e^5 / (e^5 + e^4 + e^3 + 253) for every scored byte, up to
    # the int8 rounding of the stored table (half a step of 5/127 per logit)
    exact = 1 / (math.exp(5) / (math.exp(5) + math.exp(4) + math.exp(3) + 253))
    assert abs(ppl - exact) <= exact * (math.exp(2 * 5 / 254) - 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_the_plugin_model(installed):
    root, env, python = installed
    port = free_port()
    server = subprocess.Popen([python, "-m", "lattice_engine.cli", "serve", "--port",
                               str(port), "--log-level", "warning"], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if server.poll() is not None:
                pytest.fail(f"lattice serve exited: {server.stderr.read()}")
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))["data"][0]["id"]

        def complete(**extra):
            body = json.dumps({"model": model, "prompt": "a", "max_tokens": 3, **extra})
            request = urllib.request.Request(base + "/v1/completions", body.encode(),
                                             {"Content-Type": "application/json"})
            try:
                return json.load(urllib.request.urlopen(request, timeout=60))
            except urllib.error.HTTPError as exc:
                return {"status": exc.code, **json.load(exc)}

        assert complete()["choices"][0]["text"] == "cfh"              # lattice.toml's choices
        # per request: a sampler, and a processor value over the configured one
        assert complete(sampler="greedy")["choices"][0]["text"] == "bcd"
        assert complete(logits_processors={"ban_token": ord("b")})["choices"][0]["text"] == "dfh"
        refused = complete(sampler="nope")
        assert refused["status"] == 400 and "second_best" in refused["error"]["message"]
        refused = complete(logits_processors={"top_k": 3})
        assert refused["status"] == 400 and "top-level 'top_k'" in refused["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
