"""The OpenAI-compatible HTTP API on Starlette (ASGI; served by uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events whose last chunk carries usage), GET /v1/models, GET /health,
GET /metrics (Prometheus). Errors are OpenAI error objects with a 4xx status for anything
the client got wrong. `/v1/*` needs `Authorization: Bearer <api_key>` when a key is set.
Request bodies over `max_body_bytes` get 413; generation requests beyond
`max_concurrency` in flight get 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import BatchingOptions, RequestOutput
from ..config import ServerSection
from ..errors import ConfigError, LatticeError
from ..input_parts import has_images
from . import metrics
from .async_engine import AsyncEngine, EngineClosed, EngineFailed
from .protocol import (APIError, bad, chat_messages, completion_prompt, ignore_eos,
                       parse_body, sampling_from, stream_flags)

log = logging.getLogger(__name__)


class _State:
    def __init__(self, engine, async_engine: AsyncEngine, model_name: str,
                 settings: ServerSection):
        self.engine = engine
        self.async_engine = async_engine
        self.model_name = model_name
        self.settings = settings
        self.http: dict[int, int] = {}
        self.created = int(time.time())
        self.in_flight = 0  # generation requests accepted and not yet answered


def create_app(engine, *, model_name: str, settings: ServerSection = ServerSection(),
               options: Optional[BatchingOptions] = None) -> Starlette:
    """An ASGI app serving `engine` (an `Engine`) under the name `model_name`."""
    runner = engine.start_batching(options)
    state = _State(engine, AsyncEngine(runner), model_name, settings)

    async def health(request: Request) -> Response:
        ok = state.async_engine.error is None
        return JSONResponse({"status": "ok" if ok else "degraded", "model": model_name})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.render(runner, state.http),
                                 media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        _authorize(request, state)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": state.created,
             "owned_by": "lattice-engine"}]})

    async def completions(request: Request) -> Response:
        _authorize(request, state)
        body = await _read_json(request, state)
        _check_model(body, state)
        ids = completion_prompt(body, engine.tokenizer)
        params = sampling_from(body, engine.sampling, "max_tokens", engine.plugin_manager.registry)
        stream, usage = stream_flags(body)
        mask = await _output_constraint(engine, body)
        return await _generate(request, state, ids, params, stream, chat=False,
                               ignore_eos=ignore_eos(body), logits_mask=mask)

    async def chat(request: Request) -> Response:
        _authorize(request, state)
        body = await _read_json(request, state)
        _check_model(body, state)
        messages = chat_messages(body)
        params = sampling_from(body, engine.sampling, "max_completion_tokens",
                               engine.plugin_manager.registry)
        stream, usage = stream_flags(body)
        if engine.tokenizer is None:
            raise bad("this model has no tokenizer, so it cannot take chat messages; use "
                      "/v1/completions with 'prompt' as an array of token ids", "messages")
        images = None
        if has_images(messages):  # decoded and preprocessed off the event loop
            try:
                ids, images = await asyncio.to_thread(engine.chat_prompt, messages)
            except LatticeError as exc:
                raise bad(str(exc), "messages") from None
        else:
            try:
                ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            except LatticeError as exc:
                raise bad(f"the chat template cannot render these messages: {exc}", "messages")
        mask = await _output_constraint(engine, body)
        return await _generate(request, state, ids, params, stream, chat=True,
                               ignore_eos=ignore_eos(body), logits_mask=mask, images=images,
                               encoder=engine.encoder if images is not None else None)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}; routes: " +
                   ", ".join(r.path for r in routes),
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return JSONResponse(APIError(exc.status_code, message.get(exc.status_code, exc.detail),
                                     type=kind).body(), status_code=exc.status_code)

    async def internal_error(request: Request, exc: Exception) -> Response:
        # the exception's text can hold paths and internals: it goes to the log under an id
        # that the client gets, never to the client
        error_id = "err-" + uuid.uuid4().hex[:16]
        log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path,
                  exc_info=exc)
        return JSONResponse(APIError(500, f"internal error; the server log has the details "
                                          f"under {error_id}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.async_engine.shutdown()

    app = Starlette(routes=routes, exception_handlers={
        APIError: api_error, HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan)
    app.state.lattice = state
    return _CountStatus(app, state)


class _CountStatus:
    """ASGI wrapper that counts responses by status for /metrics."""

    def __init__(self, app, lattice: _State):
        self.app, self.lattice = app, lattice

    def __getattr__(self, name):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                self.lattice.http[status] = self.lattice.http.get(status, 0) + 1
            await send(message)
        await self.app(scope, receive, counting_send)


def _authorize(request: Request, state: _State) -> None:
    key = state.settings.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    # Starlette decodes header bytes as latin-1: compare the bytes the client sent with the
    # key's UTF-8 bytes (a non-ASCII key could never match a UTF-8 client before)
    if not hmac.compare_digest(token.encode("latin-1"), key.encode("utf-8")):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="authentication_error", code="invalid_api_key")


async def _read_json(request: Request, state: _State) -> dict[str, Any]:
    limit = state.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit} "
                            f"(server.max_body_bytes)", code="request_too_large")
    chunks = []

    async def read():
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds {limit} bytes "
                                    f"(server.max_body_bytes)", code="request_too_large")
            chunks.append(chunk)

    timeout = state.settings.read_timeout
    try:  # a client that stops sending its body must not hold the request forever
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s "
                            f"(server.read_timeout)", code="request_timeout") from None
    return parse_body(b"".join(chunks))


def _check_model(body: dict, state: _State) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", "model")
    if model != state.model_name:
        raise APIError(404, f"model {model!r} does not exist here; this server serves "
                            f"{state.model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")


def _usage(out: RequestOutput) -> dict[str, Any]:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}


async def _output_constraint(engine, body: dict[str, Any]):
    """A grammar matcher for the body's `response_format` / `regex` / `grammar`, or None.
    Compiling can take a while for a large schema, so it runs off the event loop; a bad
    schema or grammar (xgrammar's message), or a server without the grammar extra, is a
    400 naming the field."""
    if not any(body.get(k) is not None for k in ("response_format", "regex", "grammar")):
        return None
    param = next(k for k in ("response_format", "regex", "grammar") if body.get(k) is not None)
    try:
        spec = await asyncio.to_thread(engine.request_grammar, body)
        return None if spec is None else engine.grammar_compiler.matcher(spec)
    except ConfigError as exc:  # the grammar extra is not installed on this server
        raise bad(f"structured output is not available on this server: {exc}", param) from None
    except LatticeError as exc:
        raise bad(str(exc), param) from None


class _Slot:
    """One request's place under server.max_concurrency, taken when the request is
    accepted and given back once, when its response is over (streams used to count only
    once their response started, so a burst of 9 got in under a limit of 4)."""

    def __init__(self, state: _State):
        self.state, self.held = state, True
        state.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.state.in_flight -= 1


class _SlotStreamingResponse(StreamingResponse):
    """A StreamingResponse that gives its slot back however the response ends (finished,
    failed, or a client gone before the first byte, when the body generator never runs)."""

    def __init__(self, *args, slot: _Slot, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


async def _generate(request: Request, state: _State, ids: list[int], params, stream: bool,
                    chat: bool, ignore_eos: bool = False, logits_mask=None, images=None,
                    encoder=None) -> Response:
    # no await between this check and taking the slot: the event loop runs one handler at
    # a time here, so a burst cannot slip past the limit
    if state.in_flight >= state.settings.max_concurrency:
        raise APIError(429, f"{state.in_flight} requests are in flight, the limit "
                            f"(server.max_concurrency) is {state.settings.max_concurrency}; "
                            f"retry later", type="rate_limit_error", code="too_many_requests")
    slot = _Slot(state)
    try:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            outputs = await state.async_engine.generate(ids, params, request_id=rid,
                                                        ignore_eos=ignore_eos,
                                                        logits_mask=logits_mask,
                                                        images=images, encoder=encoder)
        except LatticeError as exc:
            msg = str(exc)
            code = "context_length_exceeded" if ("context" in msg or "KV cache" in msg) \
                else None
            raise bad(msg, "messages" if chat else "prompt", code) from None
        created = int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        if stream:
            response = _SlotStreamingResponse(_sse(state, outputs, head, chat, rid),
                                              media_type="text/event-stream",
                                              headers={"Cache-Control": "no-cache"}, slot=slot)
            slot = None  # the response gives it back
            return response
        return await _collect(request, state, outputs, head, chat, rid)
    finally:
        if slot is not None:
            slot.release()


def _chunk(head, chat: bool, text: str, finish: Optional[str], first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}
    return {**head, "object": "text_completion",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _sse(state: _State, outputs: AsyncIterator[RequestOutput], head, chat: bool,
               rid: str):
    finished = False
    try:
        if chat:
            yield _event(_chunk(head, chat, "", None, first=True))
        try:
            async for out in outputs:
                if out.finish_reason == "error":  # this request alone failed: say so
                    finished = True
                    if out.text:
                        yield _event(_chunk(head, chat, out.text, None))
                    yield _event(_request_failed(out).body())
                    break
                if out.finished:
                    finished = True
                    if out.text:
                        yield _event(_chunk(head, chat, out.text, None))
                    last = _chunk(head, chat, "", out.finish_reason)
                    last["usage"] = _usage(out)
                    yield _event(last)
                elif out.text:
                    yield _event(_chunk(head, chat, out.text, None))
        except EngineClosed as exc:  # the server is stopping: say so, end the stream
            finished = True  # (the engine already freed its blocks)
            yield _event(_closed(exc).body())
            return
        except EngineFailed as exc:  # the batched forward failed: an error event, then done
            finished = True
            yield _event(APIError(500, str(exc), type="server_error",
                                  code="internal_error").body())
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the engine failed): free its blocks now
            state.async_engine.abort(rid)


def _request_failed(out: RequestOutput) -> APIError:
    if out.error_type == "server_error":
        return APIError(500, out.error or "internal error", type="server_error",
                        code="internal_error")
    return APIError(400, out.error or "the request failed", code="request_failed")


def _closed(exc: EngineClosed) -> APIError:
    return APIError(503, f"{exc}; the request was ended after the tokens already sent, "
                         f"retry it on a running server", type="server_error",
                    code="server_shutting_down")


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(request: Request, state: _State, outputs, head, chat: bool,
                   rid: str) -> Response:
    parts: list[str] = []
    last: Optional[RequestOutput] = None

    async def run():
        nonlocal last
        async for out in outputs:
            parts.append(out.text)
            last = out

    task = asyncio.ensure_future(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                state.async_engine.abort(rid)
                return Response(status_code=499)
        try:
            task.result()
        except EngineClosed as exc:
            raise _closed(exc) from None
        except EngineFailed as exc:
            raise APIError(500, str(exc), type="server_error", code="internal_error") from None
    finally:
        if not task.done():
            task.cancel()
    if last.finish_reason == "error":
        raise _request_failed(last)
    text = "".join(parts)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": last.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}
        obj = "text_completion"
    return JSONResponse({**head, "object": obj, "choices": [choice], "usage": _usage(last)})
