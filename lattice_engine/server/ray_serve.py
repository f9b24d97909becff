"""Replicas of the engine on Ray Serve behind one OpenAI endpoint (the `ray` extra).

    ingress (LatticeIngress, one Ray Serve deployment, the HTTP entry)
      - reads the body, tokenizes the prompt with the model's tokenizer (chat template
        applied as a replica would), hashes its first full KV blocks (`routing.prefix_key`)
      - calls the replica deployment through a DeploymentHandle with a `RouteHint`
      - streams the replica's ASGI response back; /metrics merges every replica's
    request router (ray_router.PrefixAffinityRouter, Ray Serve's custom request router API: it runs
      in the ingress's process, inside the handle) picks the replica: consistent hashing
      of the key over the live replicas, the least loaded when the preferred one is too busy
    replicas (LatticeReplica, `ray.replicas` of them or autoscaled): each loads the model
      once with its own thread count and runs the unchanged Starlette app (`app.create_app`)
      in process: same routes, same validation, same error objects, same SSE.

A replica that dies: Ray's controller starts a new one; the router drops the dead one at
once (Ray tells it when a call fails with ActorDiedError); streams it was serving end with
an OpenAI error event (`data: {"error": {...}}`, code "replica_failed"); a request whose
replica died before it answered anything is sent to another replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Optional

from ..config import Config
from ..errors import ConfigError, LatticeError
from .protocol import APIError
from . import routing
from .routing import RouteHint, merge_metrics, prefix_key

log = logging.getLogger(__name__)

APP_NAME = "lattice"
REPLICA = "LatticeReplica"
INGRESS = "LatticeIngress"
ROUTES = ("/v1/chat/completions", "/v1/completions")  # the routes with a prompt to hash
RETRIES = 2  # a request whose replica died before answering goes to another one


def require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError("`lattice serve --replicas` needs Ray Serve: "
                          "pip install 'lattice-engine[ray]'") from None


# ---- the replica -------------------------------------------------------------------------

class ReplicaServer:
    """One engine and its Starlette app, called in process with a request's method, path,
    headers and body; `handle` yields the ASGI response: ("start", status, headers), then
    body chunks (bytes)."""

    def __init__(self, config: Config):
        from ..engine import Engine
        from .app import create_app
        self.config = config
        self.engine = Engine.from_config(config)
        name = config.server.model_name or config.model.path
        self.app = create_app(self.engine, model_name=name, settings=config.server,
                              options=config.server.batching_options())
        try:
            from ray import serve
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # run outside a Ray replica (tests of this class)
            self.name = f"pid{os.getpid()}"

    def info(self) -> dict[str, Any]:
        return {"replica": self.name, "pid": os.getpid(),
                "threads": self.config.model.threads}

    async def metrics(self) -> dict[str, Any]:
        status, _, chunks = 0, None, []
        async for item in self.handle(RouteHint(), "GET", "/metrics", [], b""):
            if isinstance(item, tuple):
                status = item[1]
            else:
                chunks.append(item)
        return {**self.info(), "status": status, "text": b"".join(chunks).decode()}

    async def handle(self, hint: RouteHint, method: str, path: str, headers, body: bytes,
                     query: bytes = b""):
        """Run one request through the app; closing this generator early (the client went
        away: Ray cancels the call) disconnects it, which aborts the request in the engine.
        `hint` is the router's (Ray reads it from the call's arguments), unused here."""
        queue: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        sent_body = False

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await queue.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query, "root_path": "",
                 "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
        done = object()

        async def run():
            try:
                await self.app(scope, receive, send)
            finally:
                await queue.put(done)

        task = asyncio.ensure_future(run())
        try:
            while True:
                message = await queue.get()
                if message is done:
                    break
                if message["type"] == "http.response.start":
                    yield ("start", message["status"],
                           [(k.decode("latin-1"), v.decode("latin-1"))
                            for k, v in message.get("headers", [])] +
                           [("x-lattice-replica", self.name)])
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        break
        finally:
            gone.set()
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), timeout=5)
                except (asyncio.TimeoutError, Exception):
                    task.cancel()


# ---- the ingress -------------------------------------------------------------------------

def load_tokenizer(config: Config):
    """The model's tokenizer without its weights (the ingress only needs token ids)."""
    from ..loading import open_checkpoint, resolve_source
    from ..plugins import get_plugin_manager
    from ..tokenizer import TextTokenizer
    pm = get_plugin_manager(config.plugins.load)
    checkpoint = open_checkpoint(resolve_source(config.model.path),
                                 pm.registry.items.get("weight_formats", {}))
    if checkpoint.tokenizer is None:
        return None
    return TextTokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config,
                         checkpoint.generation_config, checkpoint.config)


def prompt_ids(path: str, body: dict, tokenizer) -> Optional[list[int]]:
    """The prompt token ids a replica would run for this request body (the first prompt of
    a completions batch), or None when they cannot be known here (the replica then answers
    with its own error, if any)."""
    from .protocol import chat_messages, completion_prompts
    from .tools import template_messages, tool_request
    if tokenizer is None and path == "/v1/chat/completions":
        return None
    try:
        if path == "/v1/completions":
            prompts = completion_prompts(body, tokenizer)
            return list(prompts[0]) if prompts else None
        messages = chat_messages(body)
        if any(isinstance(m.get("content"), list) for m in messages):
            return None  # image parts: the engine builds that prompt
        extra = {}
        tools = tool_request(body)
        if tools is not None:
            extra["tools"] = tools.tools
        return list(tokenizer.apply_chat_template(template_messages(messages),
                                                  add_generation_prompt=True, **extra))
    except (APIError, LatticeError, ValueError, TypeError, KeyError):
        return None


class IngressServer:
    """The HTTP entry: routes each request to a replica and relays its response."""

    def __init__(self, replicas, config: Config):
        self.config = config
        self.handle = replicas
        self.tokenizer = load_tokenizer(config)
        self.block_size = config.server.block_size

    def route_hint(self, path: str, raw: bytes) -> RouteHint:
        if path not in ROUTES or len(raw) > self.config.server.max_body_bytes:
            return RouteHint()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return RouteHint()
        if not isinstance(body, dict):
            return RouteHint()
        ids = prompt_ids(path, body, self.tokenizer)
        if not ids:
            return RouteHint()
        return RouteHint(key=prefix_key(ids, self.block_size, self.config.ray.prefix_blocks))

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
        path = request.url.path
        if request.method == "GET" and path == "/metrics":
            return PlainTextResponse(await self.metrics_text(),
                                     media_type="text/plain; version=0.0.4")
        authorized = self.authorized(request)
        if request.method == "GET" and path == "/internal/replicas":
            if not authorized:
                return JSONResponse(APIError(401, "invalid or missing API key: send "
                                                  "'Authorization: Bearer <key>'",
                                             type="authentication_error",
                                             code="invalid_api_key").body(), status_code=401)
            return JSONResponse({"replicas": await self.replica_info()})
        raw = await request.body()
        # an unauthorized request is not tokenized here: the replica answers it with a 401
        hint = self.route_hint(path, raw) if authorized else RouteHint()
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")]
        headers.append(("content-length", str(len(raw))))
        for attempt in range(RETRIES + 1):
            stream = self.handle.options(stream=True).handle.remote(
                hint, request.method, path, headers, raw, request.url.query.encode())
            try:
                first = await stream.__anext__()
                break
            except StopAsyncIteration:
                return _error(500, "the replica ended the request without an answer",
                              "internal_error")
            except Exception as exc:  # the replica died before it answered: another one
                if not _replica_gone(exc) or attempt == RETRIES:
                    log.error("replica call failed on %s", path, exc_info=exc)
                    return _error(503, f"no engine replica could answer ({type(exc).__name__})"
                                       f"; retry the request", "replica_failed")
                log.warning("replica died before answering %s; retrying on another", path)
        _, status, out_headers = first
        replica = _header(out_headers, "x-lattice-replica")
        media = _header(out_headers, "content-type") or ""
        if not media.startswith("text/event-stream"):
            # a whole response: read it all, so a replica dying midway is a clean 503
            chunks = []
            try:
                async for chunk in stream:
                    chunks.append(chunk)
            except Exception as exc:
                log.error("replica %s failed answering %s", replica, path, exc_info=exc)
                return _error(503, f"the engine replica serving this request stopped "
                                   f"({type(exc).__name__}); retry the request",
                              "replica_failed")
            from starlette.responses import Response
            return Response(b"".join(chunks), status_code=status,
                            headers=_relay_headers(out_headers))

        async def relay():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:  # the replica died mid-stream: an OpenAI error event
                log.error("replica %s failed mid-stream on %s", replica, path, exc_info=exc)
                body = APIError(503, f"the engine replica serving this stream stopped "
                                     f"({type(exc).__name__}); the stream was ended after the "
                                     f"tokens already sent, retry the request",
                                type="server_error", code="replica_failed").body()
                yield f"data: {json.dumps(body)}\n\n".encode()
            finally:
                stream.cancel()

        return StreamingResponse(relay(), status_code=status,
                                 headers=_relay_headers(out_headers), media_type=media)

    def authorized(self, request) -> bool:
        """The server's API key check (the replica makes it again for the /v1 routes)."""
        import hmac
        key = self.config.server.api_key
        if not key:
            return True
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        return hmac.compare_digest(token.encode("latin-1"), key.encode("utf-8"))

    async def _broadcast(self, method: str) -> list:
        response = self.handle.broadcast(method)
        return await response.results_async(timeout_s=30, return_exceptions=True)

    async def replica_info(self) -> list[dict]:
        return sorted((r for r in await self._broadcast("info") if isinstance(r, dict)),
                      key=lambda r: r["replica"])

    async def metrics_text(self) -> str:
        results = [r for r in await self._broadcast("metrics") if isinstance(r, dict)]
        text = merge_metrics({r["replica"]: r["text"] for r in results
                              if r.get("status") == 200})
        lines = ["# HELP lattice_replicas_live Engine replicas that answered this scrape.",
                 "# TYPE lattice_replicas_live gauge", f"lattice_replicas_live {len(results)}",
                 "# HELP lattice_router_decisions_total How the ingress placed requests.",
                 "# TYPE lattice_router_decisions_total counter"]
        totals: dict[str, int] = {}
        for policy in routing.ACTIVE:
            for kind, count in policy.decisions.items():
                totals[kind] = totals.get(kind, 0) + count
        for kind in ("affinity", "overloaded", "no_prefix", "round_robin"):
            lines.append(f'lattice_router_decisions_total{{decision="{kind}"}} '
                         f'{totals.get(kind, 0)}')
        return "\n".join(lines) + "\n" + text


def _header(headers, name: str) -> Optional[str]:
    return next((v for k, v in headers if k.lower() == name), None)


def _relay_headers(headers) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in ("content-length",
                                                           "transfer-encoding")}


def _replica_gone(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import DeploymentUnavailableError
    return isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError,
                            DeploymentUnavailableError))


def _error(status: int, message: str, code: str):
    from starlette.responses import JSONResponse
    return JSONResponse(APIError(status, message, type="server_error", code=code).body(),
                        status_code=status)


# ---- the application ---------------------------------------------------------------------

def build_app(config: Config):
    """The Ray Serve application: the ingress bound to the replica deployment."""
    require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    section = config.ray
    replica_config = config.override("model", threads=section.threads_per_replica)
    scaling: dict[str, Any] = {"num_replicas": section.replicas}
    if section.autoscaling:
        scaling = {"autoscaling_config": {
            "min_replicas": section.min_replicas, "max_replicas": section.max_replicas,
            "target_ongoing_requests": max(1, config.server.max_running // 2)}}
    router = RequestRouterConfig(
        request_router_class="lattice_engine.server.ray_router.PrefixAffinityRouter",
        request_router_kwargs={"routing": section.routing,
                               "max_imbalance": section.max_imbalance})

    @serve.deployment(name=REPLICA, ray_actor_options={"num_cpus": section.threads_per_replica},
                      max_ongoing_requests=config.server.max_concurrency,
                      request_router_config=router, health_check_period_s=2,
                      health_check_timeout_s=30, graceful_shutdown_timeout_s=5, **scaling)
    class LatticeReplica(ReplicaServer):
        def __del__(self):  # Ray calls it when it stops the replica
            self.app.lattice.async_engine.close_streams("the replica is shutting down")
            self.app.lattice.async_engine.shutdown()

    @serve.deployment(name=INGRESS, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=10_000)
    class LatticeIngress(IngressServer):
        pass

    return LatticeIngress.bind(LatticeReplica.bind(replica_config), config)


# Ray Serve gives its HTTP proxy 5 s to answer a readiness check and kills it after three
# misses, and `serve.start` then fails. Starting the proxy (a Python process importing
# uvicorn and Serve) took longer than that on a 2-core machine with both cores busy, so a
# loaded machine could not start `lattice serve --replicas` at all. The local cluster this
# process starts inherits its environment: these defaults reach the Serve controller, and
# a value the user set wins. (A cluster given by ray.address keeps its own settings.)
PATIENT_PROXY_CHECKS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


def _patient_proxy_checks():
    for name, value in PATIENT_PROXY_CHECKS.items():
        os.environ.setdefault(name, value)


def start(config: Config, *, log_level: str = "info", blocking: bool = True):
    """Connect to (config.ray.address) or start a local Ray cluster, run the application
    with its HTTP proxy on server.host:server.port, and (blocking) serve until
    interrupted."""
    require_ray()
    import signal

    import ray
    from ray import serve
    section = config.ray
    started_here = False
    if not ray.is_initialized():
        if section.address is not None:
            ray.init(address=section.address, logging_level=log_level.upper())
        else:
            _patient_proxy_checks()
            # logical CPUs: every replica's threads, and a core for the ingress and proxy
            ray.init(num_cpus=section.max_count() * section.threads_per_replica + 1,
                     include_dashboard=False, logging_level=log_level.upper())
            started_here = True
    serve.start(http_options={"host": config.server.host, "port": config.server.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    if not blocking:
        return
    import sys
    print(f"lattice serve: every replica is up on http://{config.server.host}:"
          f"{config.server.port}/v1", file=sys.stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt  # SIGTERM too: the cluster this process started goes with it
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
            ray.shutdown()
