"""The OpenAI server on loopback, in a thread, for tests (the core's and plugins').

    from lattice_engine.testing.server import LoopbackServer

    with LoopbackServer(Engine.load(folder), model_name="tiny") as server:
        out = server.client.completions.create(model="tiny", prompt="Hi", max_tokens=4)
        status, body = server.request("POST", "/v1/completions", {...})
        assert server.metrics()["lattice_requests_total"] >= 1

It runs the real app (`server.create_app`) behind uvicorn, or behind the server
`lattice serve` runs (`lattice_server=True`: `server.make_server`, with its header and body
timeouts), on a free port of 127.0.0.1, so a test talks to it exactly as a client would.
Needs the `serve` extra (uvicorn, starlette); `client` needs the `openai` package.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackServer:
    """`engine` served as `model_name` until `stop()` (or the end of a `with` block).

    Args:
        engine: a `lattice_engine.engine.Engine`.
        options: the continuous-batching options (`batching.BatchingOptions`); None: the
            server's defaults.
        lattice_server: run `lattice serve`'s server (its timeouts and limits) instead of a
            plain uvicorn one.
        client_timeout: seconds the `openai` client waits for a response.
        request_timeout: seconds `request` waits, unless told otherwise.
        log_level: uvicorn's; "critical" keeps a fuzzing test's log quiet.
        **settings: fields of `config.ServerSection` (api_key, max_body_bytes, ...).
    """

    def __init__(self, engine, *, model_name: str, options=None, lattice_server: bool = False,
                 client_timeout: float = 120, request_timeout: float = 60,
                 log_level: str = "warning",
                 start_timeout: float = 60, **settings: Any):
        from ..config import ServerSection
        from ..server import create_app

        self.port = free_port()
        self.engine = engine
        self.model_name = model_name
        self.api_key = settings.get("api_key")
        self.client_timeout = client_timeout
        self.request_timeout = request_timeout
        self.app = create_app(engine, model_name=model_name,
                              settings=ServerSection(port=self.port, **settings),
                              options=options)
        if lattice_server:
            from ..server import make_server
            self.server = make_server(self.app, host="127.0.0.1", port=self.port,
                                      log_level=log_level)
        else:
            import uvicorn
            self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1",
                                                        port=self.port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the test server on port {self.port} did not start within "
                                   f"{start_timeout} s")
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}"
        self._client = None

    @property
    def client(self):
        """An `openai.OpenAI` client for this server (no retries: a failure shows)."""
        if self._client is None:
            import openai
            self._client = openai.OpenAI(base_url=self.base + "/v1",
                                         api_key=self.api_key or "none", max_retries=0,
                                         timeout=self.client_timeout)
        return self._client

    @property
    def runner(self):
        """The engine's `BatchRunner` (what the server steps)."""
        return self.app.lattice.engine.runner

    def request(self, method: str, path: str, body: Any = None, *,
                headers: Optional[dict] = None, key: Optional[str] = None,
                timeout: Optional[float] = None) -> tuple[int, Any]:
        """(status, parsed JSON body) of one request; `body` a JSON-able object or raw
        bytes; `key` sent as a bearer token. Error statuses return their body too."""
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        if key:
            sent["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=sent)
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.request_timeout) as resp:
                return resp.status, _json_or_bytes(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _json_or_bytes(err.read())

    def post(self, path: str, body: Any, **kwargs) -> tuple[int, Any]:
        return self.request("POST", path, body, **kwargs)

    def metrics(self) -> dict[str, float]:
        """/metrics as {sample name with labels: value}."""
        text = urllib.request.urlopen(self.base + "/metrics", timeout=10).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name: str) -> float:
        return self.metrics()[name]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> "LoopbackServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _json_or_bytes(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw
