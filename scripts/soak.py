"""Soak: hostile inputs for as long as asked, against a live `lattice serve` and the CLI.

    python scripts/soak.py --minutes 10 [--seed 1] [--out soak-failures]

Kinds of input, in turn until the time is up:
- request bodies: random mixes of valid and invalid values for every request field, sent
  to /v1/completions and /v1/chat/completions (some as bursts of concurrent streams);
- raw bodies: valid JSON with bytes flipped, cut short, NaN / Infinity literals, lone
  surrogates, deep nesting;
- checkpoints: the tiny golden llama as a GGUF with header bytes overwritten or cut, and
  as an HF folder with its safetensors header or config.json values replaced, each run
  through `lattice generate` in this process;
- config files: random TOML through `lattice generate --config`.
A failure is a 5xx answer, a stream that ends without [DONE] or an error event, a CLI
run that raises or exits with anything but 0 / 2 (or prints more than one error line), or
the server process dying. Each failing input is written to --out. Prints one line per
minute, a summary line, then (last) one JSON object; exits 1 if anything failed.
Talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fixture builders the tests use

MODEL = "smollm2-135m"
EDGE = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, 10**30, -2**63, 0.0, -0.0, 1e-40,
        5e-324, 1e308, 0.5, 2.0, 100.0, "", "x", "\u00e9\u6f22", "1e-5", [], {}, [1, 2],
        {"a": 1}, "<|im_end|>", "\n" * 3]


def rand_value(rng: random.Random, depth: int = 0):
    roll = rng.random()
    if roll < 0.5 or depth > 3:
        return rng.choice(EDGE)
    if roll < 0.7:
        return rng.randint(-2**40, 2**40)
    if roll < 0.8:
        return rng.uniform(-10, 10)
    if roll < 0.9:
        return [rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["type", "text", "role", "x"]): rand_value(rng, depth + 1)
            for _ in range(rng.randint(0, 3))}


GOOD = {
    "model": lambda r: MODEL,
    "prompt": lambda r: r.choice(["Hello", "Once upon a time", "", "x" * r.randint(1, 300),
                                  [r.randint(0, 300) for _ in range(r.randint(0, 20))]]),
    "messages": lambda r: [{"role": r.choice(["user", "system", "assistant"]),
                            "content": r.choice(["hi", "", "What is 2+2?",
                                                 [{"type": "text", "text": "hi"}]])}
                           for _ in range(r.randint(1, 3))],
    "max_tokens": lambda r: r.randint(1, 8), "temperature": lambda r: r.uniform(0, 2),
    "top_p": lambda r: r.uniform(0.01, 1), "top_k": lambda r: r.randint(0, 50),
    "min_p": lambda r: r.uniform(0, 0.9), "repetition_penalty": lambda r: r.choice(
        [1.0, 1.3, 1e-40, 100.0, r.uniform(0.01, 5)]),
    "seed": lambda r: r.randint(0, 2**64 - 1), "stop": lambda r: r.choice(["\n", ["a", "b"]]),
    "stream": lambda r: r.random() < 0.5, "ignore_eos": lambda r: r.random() < 0.5,
    "stream_options": lambda r: {"include_usage": r.random() < 0.5},
    "response_format": lambda r: r.choice([{"type": "json_object"}, {"type": "text"}]),
    "regex": lambda r: r.choice(["[0-9]{1,3}", "(", "a|b"]),
    "n": lambda r: r.choice([1, 2]), "logprobs": lambda r: r.choice([None, False, True]),
}


def rand_body(rng: random.Random) -> dict:
    body = {"model": MODEL, "max_tokens": rng.randint(1, 8)}
    for key, good in GOOD.items():
        roll = rng.random()
        if roll < 0.25:
            body[key] = good(rng)
        elif roll < 0.32:
            body[key] = rand_value(rng)
        elif roll < 0.36:
            body.pop(key, None)
    if "temperature" in body and rng.random() < 0.2:
        body["temperature"] = rng.choice([1e-40, 5e-324, 1e-30])  # the old batch killer
    return body


def mangle(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.randrange(7)
    if kind == 0 and raw:
        at = rng.randrange(len(raw))
        return raw[:at] + bytes([rng.randrange(256)]) + raw[at + 1:]
    if kind == 1:
        return raw[:rng.randrange(len(raw) + 1)]
    if kind == 2:
        return raw.replace(b"1", b"NaN", 1).replace(b"0.", b"Infinity", 1)
    if kind == 3:
        return raw.replace(b'"model"', b'"\\ud800": 1, "model"', 1)
    if kind == 4:
        depth = rng.choice([50, 70, 1000, 100_000])
        return raw[:-1] + b', "x": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == 5:
        return raw.replace(b'"prompt": "', b'"prompt": "\\udfff', 1)
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))


class Soak:
    def __init__(self, args):
        self.rng = random.Random(args.seed)
        self.out = Path(args.out)
        self.counts: Counter = Counter()
        self.failures: list[dict] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="lattice-soak-"))
        from conftest import fixture_with_tokenizer
        self.folder = fixture_with_tokenizer("llama", self.tmp, eos_token_id=-1)
        from test_gguf_reader import write_gguf
        self.gguf = self.tmp / "tiny.gguf"
        write_gguf(self.gguf, "llama")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = subprocess.Popen(
            [sys.executable, "-m", "lattice_engine.cli", "serve", str(self.folder), "--port",
             str(self.port), "--model-name", MODEL, "--log-level", "critical",
             "--max-concurrency", "64"], stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or self.server.poll() is not None:
                    raise SystemExit("soak: the server did not start")
                time.sleep(0.3)

    def fail(self, kind: str, what: str, data) -> None:
        self.failures.append({"kind": kind, "what": what})
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{kind}-{len(self.failures)}"
        if isinstance(data, bytes):
            path.with_suffix(".bin").write_bytes(data)
        else:
            path.with_suffix(".json").write_text(json.dumps(data, default=str))
        print(f"soak: FAIL {kind}: {what[:300]} (input: {path})", flush=True)

    # ---- the server ------------------------------------------------------------------------
    def post(self, path: str, raw: bytes) -> None:
        self.counts["http"] += 1
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            conn.request("POST", path, raw, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            self.fail("http", f"{path}: no answer ({exc})", raw)
            return
        if status >= 500:
            self.fail("http", f"{path}: {status} {body[:200]!r}", raw)
        elif status >= 400:
            try:
                assert json.loads(body)["error"]["message"]
            except Exception:
                self.fail("http", f"{path}: {status} without an error object", raw)
        elif body.startswith(b"data: ") and not body.rstrip().endswith(b"[DONE]"):
            self.fail("http", f"{path}: a stream ended without [DONE]", raw)

    def request_round(self) -> None:
        body = rand_body(self.rng)
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        raw = json.dumps(body).encode()
        if self.rng.random() < 0.3:
            raw = mangle(self.rng, raw)
        if self.rng.random() < 0.1:  # a burst: concurrent streams beside this one
            others = [json.dumps({"model": MODEL, "prompt": f"burst {i}", "stream": True,
                                  "max_tokens": 16, "temperature": 0.8}).encode()
                      for i in range(4)]
            threads = [threading.Thread(target=self.post, args=("/v1/completions", o))
                       for o in others]
            for t in threads:
                t.start()
            self.post(path, raw)
            for t in threads:
                t.join()
        else:
            self.post(path, raw)

    # ---- the CLI -------------------------------------------------------------------------
    def cli(self, kind: str, argv: list[str], data) -> None:
        from lattice_engine.cli import main
        from lattice_engine.plugins import reset_plugin_manager
        self.counts[kind] += 1
        reset_plugin_manager()
        err, out = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
        except BaseException as exc:  # what a user would see as a traceback
            self.fail(kind, f"{type(exc).__name__}: {exc}", data)
            return
        lines = [l for l in err.getvalue().splitlines() if l.startswith("lattice: error")]
        if code not in (0, 2) or (code == 2 and len(lines) != 1):
            self.fail(kind, f"exit {code}: {err.getvalue()[-300:]}", data)

    def gguf_round(self) -> None:
        data = bytearray(self.gguf.read_bytes())
        end = min(len(data), 12_000)  # the header: metadata and tensor infos
        for _ in range(self.rng.randint(1, 4)):
            pattern = self.rng.choice([b"\0", b"\xff" * 4, struct.pack("<I", 2**31),
                                       struct.pack("<Q", 2**62), struct.pack("<I", 9),
                                       bytes(self.rng.randrange(256) for _ in range(4))])
            at = self.rng.randrange(end - len(pattern))
            data[at:at + len(pattern)] = pattern
        if self.rng.random() < 0.2:
            data = data[:self.rng.randrange(len(data))]
        path = self.tmp / "fuzz.gguf"
        path.write_bytes(bytes(data))
        self.cli("gguf", ["generate", "hi", "--model", str(path), "--max-tokens", "2",
                          "--raw"], bytes(data[:end]))

    def folder_round(self) -> None:
        folder = self.tmp / "fuzz-folder"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(self.folder, folder)
        if self.rng.random() < 0.5:
            config = json.loads((folder / "config.json").read_text())
            for _ in range(self.rng.randint(1, 3)):
                config[self.rng.choice(list(config) + ["quantization"])] = rand_value(self.rng)
            (folder / "config.json").write_text(json.dumps(config))
            data = config
        else:
            weights = folder / "model.safetensors"
            raw = weights.read_bytes()
            (n,) = struct.unpack("<Q", raw[:8])
            header = json.loads(raw[8:8 + n])
            name = self.rng.choice(sorted(header))
            if isinstance(header[name], dict) and self.rng.random() < 0.8:
                header[name][self.rng.choice(["dtype", "shape", "data_offsets"])] = \
                    rand_value(self.rng)
            else:
                header[name] = rand_value(self.rng)
            body = json.dumps(header).encode()
            weights.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n:])
            data = header
        if self.rng.random() < 0.1:
            (folder / "tokenizer.json").unlink()
        self.cli("folder", ["generate", "hi", "--model", str(folder), "--max-tokens", "2"],
                 data)

    def config_round(self) -> None:
        sections = {"model": ["path", "backend", "threads"],
                    "quant": ["method", "overrides", "group_size"],
                    "sampling": ["temperature", "top_k", "top_p", "min_p", "seed",
                                 "repetition_penalty", "max_tokens", "stop"],
                    "server": ["port", "max_concurrency", "kv_cache_tokens", "api_key"],
                    "plugins": ["load"], "quarot": ["enabled"]}
        lines = []
        for name in self.rng.sample(list(sections), self.rng.randint(1, 3)):
            lines.append(f"[{name}]")
            for key in self.rng.sample(sections[name], min(len(sections[name]),
                                                             self.rng.randint(1, 2))):
                value = self.rng.choice(["-1", "0", "1", "2", "1e-40", "inf", "nan", "-inf",
                                         "1099511627776", "100000", '""', '"x"', "true",
                                         "[1, 2]", "{ a = 1 }", "3.5", "18446744073709551616"])
                lines.append(f"{key} = {value}")
        text = "\n".join(lines) + "\n"
        path = self.tmp / "fuzz.toml"
        path.write_text(text)
        self.cli("config", ["generate", "hi", "--model", str(self.folder), "--max-tokens",
                            "2", "--config", str(path)], text)

    def run(self, minutes: float) -> int:
        rounds = [self.request_round] * 6 + [self.gguf_round, self.folder_round,
                                             self.config_round]
        start = time.time()
        next_report = start + 60
        while time.time() - start < minutes * 60:
            self.rng.choice(rounds)()
            if self.server.poll() is not None:
                self.fail("server", f"the server exited with {self.server.returncode}", {})
                break
            if time.time() >= next_report:
                next_report += 60
                print(f"soak: {(time.time() - start) / 60:.0f} min, {sum(self.counts.values())}"
                      f" inputs {dict(self.counts)}, {len(self.failures)} failures", flush=True)
        alive = self.server.poll() is None
        if alive:
            try:
                health = json.loads(urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/health", timeout=10).read())
            except OSError as exc:
                health = {"status": f"no answer ({exc})"}
            if health.get("status") != "ok":
                self.fail("server", f"/health says {health}", {})
        seconds = time.time() - start
        total = sum(self.counts.values())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
        print(f"soak: {total} inputs in {seconds / 60:.1f} min ({dict(self.counts)}), "
              f"{len(self.failures)} failures, server {'alive' if alive else 'DEAD'}, "
              f"soak process peak RSS {rss} MB", flush=True)
        print(json.dumps({"inputs": total, "by_kind": dict(self.counts), "seconds":
                          round(seconds), "failures": len(self.failures),
                          "first_failures": self.failures[:10], "server_alive": alive,
                          "peak_rss_mb": rss}))
        return 1 if self.failures or not alive else 0

    def close(self) -> None:
        if self.server.poll() is None:
            self.server.terminate()
            self.server.wait(timeout=60)
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="soak-failures", help="where failing inputs are kept")
    args = ap.parse_args()
    soak = Soak(args)
    try:
        return soak.run(args.minutes)
    finally:
        soak.close()


if __name__ == "__main__":
    sys.exit(main())
