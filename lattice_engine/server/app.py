"""The OpenAI-compatible HTTP API on Starlette (ASGI; served by uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events whose last chunk carries usage), POST /v1/embeddings (any model: an
encoder served for embeddings only, or a chat model pooled by its last token; see
`lattice_engine.embedding`), GET /v1/models, GET /health, GET /metrics (Prometheus, with
the drift detector's distance and alarm when server.drift_window is set), POST /tokenize
and /detokenize (llama.cpp's server's shapes), and the adapter routes of
`adapter_routes` (a request's `model` may name a loaded adapter).
Errors are OpenAI error objects with a 4xx status for anything the client got wrong.
`/v1/*`, /tokenize and /detokenize need `Authorization: Bearer <api_key>` when a key is set.
Request bodies over `max_body_bytes` get 413; generation requests beyond
`max_concurrency` in flight get 429.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import DEFAULT_SPECULATION, BatchingOptions, RequestOutput
from ..config import ServerSection
from ..errors import CheckpointError, ConfigError, LatticeError, RequestError
from ..input_parts import has_images
from ..sampling import SEED_LIMIT
from . import metrics
from .adapter_routes import adapter_routes, hold, model_entries, resolve_model
from .async_engine import AsyncEngine, EngineClosed, EngineFailed
from .protocol import SCHEMA as _SCHEMA
from .protocol import (APIError, bad, chat_messages, choices_per_prompt, completion_prompts,
                       embedding_request, ignore_eos, parse_body, sampling_from,
                       speculation_from, stream_flags)
from ..chat_template import template_source
from .tools import OPEN as TOOL_OPEN
from .tools import content_before_call, parse_calls, template_messages, tool_request
from .responses import (Choice, ChoiceState, TokenText, chat_logprobs, completion_logprobs,
                        prompt_entries)

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
        self.tokens = TokenText(engine.tokenizer)  # token texts for logprobs
        self.embeddings = metrics.EmbeddingStats()
        self.drift = None  # a drift.DriftDetector when server.drift_window is set
        self.drift_errors = 0


def create_app(engine, *, model_name: str, settings: ServerSection = ServerSection(),
               options: Optional[BatchingOptions] = None) -> Starlette:
    """An ASGI app serving `engine` (an `Engine`) under the name `model_name`."""
    runner = engine.start_batching(options) if engine.can_generate else None
    state = _State(engine, AsyncEngine(runner), model_name, settings)
    if settings.drift_window:
        from ..drift import DriftDetector
        state.drift = DriftDetector(settings.drift_window, every=settings.drift_every,
                                    threshold=settings.drift_threshold)

    async def health(request: Request) -> Response:
        ok = state.async_engine.error is None
        return JSONResponse({"status": "ok" if ok else "degraded", "model": model_name})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.render(runner, state.http, state.embeddings,
                                                state.drift, state.drift_errors),
                                 media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        _authorize(request, state)
        return JSONResponse({"object": "list",
                             "data": model_entries(engine, model_name, state.created)})

    vocab_size = int(engine.model.config.vocab_size)

    async def completions(request: Request) -> Response:
        _authorize(request, state)
        body = await _read_json(request, state)
        adapter = resolve_model(body, engine, model_name)
        _check_generates(state, "prompt")
        prompts = completion_prompts(_fill_in_the_middle(body, engine.tokenizer),
                                     engine.tokenizer)
        params = sampling_from(body, engine.sampling, "max_tokens",
                               engine.plugin_manager.registry, chat=False,
                               vocab_size=vocab_size)
        n = choices_per_prompt(body)
        stream, usage = stream_flags(body)
        speculation = speculation_from(body, engine)
        make_mask = await _output_constraint(engine, body)
        echo = bool(body.get("echo"))
        texts = body["prompt"] if isinstance(body["prompt"], list) and len(prompts) > 1 \
            else [body["prompt"]]
        choices = []
        for p, ids in enumerate(prompts):
            _check_n(state, n, ids, params)
            echo_text = None
            if echo:
                echo_text = texts[p] if isinstance(texts[p], str) else \
                    (engine.tokenizer.decode(ids, skip_special_tokens=False)
                     if engine.tokenizer is not None else "")
            choices.extend(_copies(len(choices), p, ids, params, n, echo_text, make_mask))
        return await _generate(request, state, choices, stream, chat=False,
                               ignore_eos=ignore_eos(body), include_usage=usage,
                               speculation=speculation, adapter=adapter)

    async def chat(request: Request) -> Response:
        _authorize(request, state)
        body = await _read_json(request, state)
        adapter = resolve_model(body, engine, model_name)
        _check_generates(state, "messages")
        messages = chat_messages(body)
        params = sampling_from(body, engine.sampling, "max_completion_tokens",
                               engine.plugin_manager.registry, chat=True,
                               vocab_size=vocab_size)
        n = choices_per_prompt(body)
        stream, usage = stream_flags(body)
        if engine.tokenizer is None:
            raise bad("this model has no tokenizer, so it cannot take chat messages; use "
                      "/v1/completions with 'prompt' as an array of token ids", "messages")
        tools = tool_request(body)
        images = None
        if has_images(messages):  # decoded and preprocessed off the event loop
            if tools is not None:
                raise bad("'tools' cannot be combined with image parts; send the image in "
                          "a request without tools", "tools")
            try:
                ids, images = await asyncio.to_thread(engine.chat_prompt, messages)
            except LatticeError as exc:
                raise bad(str(exc), "messages") from None
        extra = {}
        if tools is not None:
            if "tools" not in template_source(engine.tokenizer.config):
                raise bad("this model's chat template has no tools section, so it cannot be "
                          "shown 'tools'; describe the functions in a message instead",
                          "tools")
            extra["tools"] = tools.tools
        if images is None:
            try:
                ids = engine.tokenizer.apply_chat_template(template_messages(messages),
                                                           add_generation_prompt=True, **extra)
            except LatticeError as exc:
                raise bad(f"the chat template cannot render these messages: {exc}",
                          "messages")
        if tools is not None and tools.constrained:
            if any(body.get(k) is not None for k in ("response_format", "regex", "grammar")):
                raise bad(f"'tool_choice' = {body['tool_choice']!r} constrains the output to "
                          f"a tool call; it cannot be combined with response_format, regex "
                          f"or grammar", "tool_choice")
            ids = ids + engine.tokenizer.encode(TOOL_OPEN + "\n", add_special_tokens=False)
            try:
                make_mask = await _output_constraint(engine, {"response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "tool_call", "schema": tools.schema()}}}, "tools")
            except APIError as exc:
                raise bad(f"'tools': the parameters schema of "
                          f"{', '.join(tools.names()) if tools.name is None else tools.name} "
                          f"cannot constrain a call: {exc.message}", "tools") from None
        else:
            make_mask = await _output_constraint(engine, body)
        _check_n(state, n, ids, params)
        choices = _copies(0, 0, ids, params, n, None, make_mask, tools)
        for choice in choices:
            choice.images = images
        return await _generate(request, state, choices, stream, chat=True,
                               ignore_eos=ignore_eos(body), include_usage=usage,
                               speculation=speculation_from(body, engine), adapter=adapter)

    async def tokenize(request: Request) -> Response:
        """llama.cpp's POST /tokenize: {"content", "add_special" (false), "with_pieces"
        (false)} -> {"tokens": [id, ...]} or, with pieces, [{"id", "piece"}, ...] where a
        piece that is not whole UTF-8 is its list of bytes."""
        _authorize(request, state)
        body = await _read_json(request, state)
        tokenizer = _require_tokenizer(engine, "/tokenize")
        content = _SCHEMA["content"].get(body, "content")
        if content is None:
            raise bad("'content' is required: the text to tokenize", "content")
        ids = tokenizer.encode(content, add_special_tokens=_SCHEMA["add_special"].get(
            body, "add_special", False))
        if not _SCHEMA["with_pieces"].get(body, "with_pieces", False):
            return JSONResponse({"tokens": ids})
        pieces = []
        for token in ids:
            text, raw = state.tokens(token)
            whole = bytes(raw).decode("utf-8", "strict") if "\ufffd" not in text else None
            pieces.append({"id": token, "piece": whole if whole is not None else raw})
        return JSONResponse({"tokens": pieces})

    async def detokenize(request: Request) -> Response:
        """llama.cpp's POST /detokenize: {"tokens": [id, ...]} -> {"content": text}."""
        _authorize(request, state)
        body = await _read_json(request, state)
        tokenizer = _require_tokenizer(engine, "/detokenize")
        tokens = _SCHEMA["tokens"].get(body, "tokens")
        if tokens is None:
            raise bad("'tokens' is required: an array of token ids", "tokens")
        out_of_range = [t for t in tokens if not 0 <= t < vocab_size]
        if out_of_range:
            raise bad(f"'tokens' holds {out_of_range[0]}, not a token id of this model: ids "
                      f"are in [0, {vocab_size})", "tokens")
        return JSONResponse({"content": tokenizer.decode(tokens, skip_special_tokens=False)})

    async def embeddings(request: Request) -> Response:
        _authorize(request, state)
        body = await _read_json(request, state)
        _check_model(body, state)
        return await _embed(state, embedding_request(body))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
    ] + adapter_routes(state, _authorize, _read_json)

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
    """The base model, for routes adapters do not apply to (embeddings)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", "model")
    if model != state.model_name:
        raise APIError(404, f"model {model!r} does not exist here; this server serves "
                            f"{state.model_name!r} (see GET /v1/models)",
                       param="model", code="model_not_found")


async def _output_constraint(engine, body: dict[str, Any], param: Optional[str] = None):
    """A function making a fresh grammar matcher (one per choice) for the body's
    `response_format` / `regex` / `grammar`, or None.
    Compiling can take a while for a large schema, so it runs off the event loop; a bad
    schema or grammar (xgrammar's message), or a server without the grammar extra, is a
    400 naming the field."""
    if not any(body.get(k) is not None for k in ("response_format", "regex", "grammar")):
        return None
    param = param or next(k for k in ("response_format", "regex", "grammar")
                          if body.get(k) is not None)
    try:
        spec = await asyncio.to_thread(engine.request_grammar, body)
        if spec is None:
            return None
        compiler = engine.grammar_compiler
        return lambda: compiler.matcher(spec)
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


def _fill_in_the_middle(body: dict[str, Any], tokenizer) -> dict[str, Any]:
    """`suffix`: the prompt in the model's fill-in-the-middle form (prefix, suffix, then
    the middle to generate), when its vocabulary has FIM tokens (Qwen2.5-Coder's
    <|fim_prefix|>..., StarCoder's <fim_prefix>...); a 400 otherwise."""
    suffix = _SCHEMA["suffix"].get(body, "suffix")
    if suffix is None:
        return body
    for marks in (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
                  ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")):
        if tokenizer is not None and all(tokenizer.tokenizer.token_to_id(m) is not None
                                         for m in marks):
            break
    else:
        raise bad("'suffix' needs a model with a fill-in-the-middle template (FIM tokens "
                  "such as <|fim_prefix|> in its vocabulary); this one has none: put the "
                  "whole text in 'prompt'", "suffix")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("'suffix' needs 'prompt' to be a single string", "suffix")
    pre, suf, mid = marks
    return {**body, "prompt": f"{pre}{prompt}{suf}{suffix}{mid}"}


def _check_n(state: _State, n: int, ids: list[int], params) -> None:
    """The n copies of a prompt must fit the KV pool at once: the prompt's full blocks
    once (shared), and each copy's partial block plus its first token."""
    cache = state.async_engine.runner.cache
    full = len(ids) // cache.block_size
    own = cache.blocks_for(len(ids) + 1) - full
    if params.prompt_logprobs is not None:  # echo with logprobs computes every copy's prompt
        full, own = 0, cache.blocks_for(len(ids) + 1)
    need = full + n * own
    if n > 1 and need > cache.num_blocks:
        most = max(0, (cache.num_blocks - full) // own)
        raise bad(f"'n' = {n} copies of this {len(ids)}-token prompt need {need} KV blocks "
                  f"at once, and the pool has {cache.num_blocks} (server.kv_cache_tokens): "
                  f"at most n = {most} here", "n")


def _copies(first: int, prompt_index: int, ids: list[int], params, n: int,
            echo_text: Optional[str], make_mask, tools=None) -> list[Choice]:
    """The n choices of one prompt. With a seed, copy i samples with seed + i (so the
    copies differ and the request is reproducible); copies after the first share the
    prompt's blocks with it (unless each computes its prompt for logprobs)."""
    out = []
    for i in range(n):
        p = params
        if n > 1 and params.seed is not None:
            p = params.with_overrides(seed=(params.seed + i) % SEED_LIMIT)
        share = first if i > 0 and params.prompt_logprobs is None else None
        out.append(Choice(first + i, prompt_index, ids, p, echo_text, make_mask, share, tools))
    return out


class _Merged:
    """The outputs of several request streams as (choice index, output), in the order
    they arrive; an exception from any stream is raised here. `cancel` ends them all."""

    _DONE = object()

    def __init__(self, streams):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.left = len(streams)
        self.tasks = [asyncio.ensure_future(self._pump(i, s)) for i, s in enumerate(streams)]

    async def _pump(self, index, stream):
        try:
            async for out in stream:
                self.queue.put_nowait((index, out))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.queue.put_nowait((index, exc))
            return
        self.queue.put_nowait((index, self._DONE))

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self.left:
            index, item = await self.queue.get()
            if item is self._DONE:
                self.left -= 1
                continue
            if isinstance(item, Exception):
                self.left = 0
                raise item
            return index, item
        raise StopAsyncIteration

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


async def _generate(request: Request, state: _State, choices: list[Choice], stream: bool,
                    chat: bool, ignore_eos: bool = False,
                    include_usage: bool = False,
                    speculation=DEFAULT_SPECULATION, adapter: Optional[str] = None) -> Response:
    # no await between this check and taking the slot: the event loop runs one handler at
    # a time here, so a burst cannot slip past the limit
    if state.in_flight >= state.settings.max_concurrency:
        raise APIError(429, f"{state.in_flight} requests are in flight, the limit "
                            f"(server.max_concurrency) is {state.settings.max_concurrency}; "
                            f"retry later", type="rate_limit_error", code="too_many_requests")
    slot = _Slot(state)
    try:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        rids = [rid] if len(choices) == 1 else [f"{rid}-{c.index}" for c in choices]
        seqs = []
        engine = state.async_engine
        for c, r in zip(choices, rids):
            try:
                # each copy holds the adapter version current now until it ends
                seqs.append(engine.prepare(
                    c.ids, c.params, request_id=r, ignore_eos=ignore_eos,
                    logits_mask=c.make_mask() if c.make_mask is not None else None,
                    prefix_leader=seqs[c.share_with] if c.share_with is not None else None,
                    images=c.images,
                    encoder=state.engine.encoder if c.images is not None else None,
                    speculation=speculation, adapter=hold(state.engine, adapter)))
            except (LatticeError, APIError) as exc:
                for seq in seqs:  # never queued: let go of their adapter references
                    release = seq.detail.pop("on_free", None)
                    if release is not None:
                        release()
                if isinstance(exc, APIError):
                    raise
                msg = str(exc)
                code = "context_length_exceeded" if ("context" in msg or "KV cache" in msg) \
                    else None
                if not chat and choices[-1].prompt_index > 0:
                    msg = f"prompt[{c.prompt_index}]: {msg}"
                raise bad(msg, "messages" if chat else "prompt", code) from None
        merged = _Merged([engine.submit(seq) for seq in seqs])
        if state.drift is not None:
            for ids in {c.prompt_index: c.ids for c in choices}.values():
                _watch_prompt(state, ids)
        created = int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}
        states = [ChoiceState(c) for c in choices]
        if stream:
            response = _SlotStreamingResponse(
                _sse(state, merged, head, chat, states, rids, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                slot=slot)
            slot = None  # the response gives it back
            return response
        return await _collect(request, state, merged, head, chat, states, rids)
    finally:
        if slot is not None:
            slot.release()


def _check_generates(state: _State, param: str) -> None:
    if state.async_engine.runner is None:
        raise APIError(400, f"model {state.model_name!r} is an embedding-only model (an "
                            f"encoder): it cannot generate text; use POST /v1/embeddings",
                       param=param, code="model_cannot_generate")


def _embedder(state: _State):
    """The engine's Embedder, or a 400 saying why this model cannot embed."""
    try:
        return state.engine.embedder
    except (CheckpointError, ConfigError) as exc:
        raise APIError(400, f"model {state.model_name!r} cannot embed: {exc}", param="model",
                       code="model_cannot_embed") from None


async def _embed(state: _State, req) -> Response:
    embedder = _embedder(state)
    try:
        embedder.check_dimensions(req.dimensions)
        # tokenizing a large batch takes a while: off the event loop (the tokenizer is
        # thread-safe; the model is only driven by the engine thread, below)
        ids = await asyncio.to_thread(embedder.tokenize, req.inputs)
    except RequestError as exc:
        msg = str(exc)
        code = "context_length_exceeded" if "at most" in msg and "tokens" in msg else None
        param = "dimensions" if msg.startswith("dimensions") else "input"
        raise bad(msg, param, code) from None
    if state.in_flight >= state.settings.max_concurrency:
        raise APIError(429, f"{state.in_flight} requests are in flight, the limit "
                            f"(server.max_concurrency) is {state.settings.max_concurrency}; "
                            f"retry later", type="rate_limit_error", code="too_many_requests")
    slot = _Slot(state)
    try:
        pooled = await state.async_engine.call(lambda: embedder.pooled(ids))
    except EngineClosed as exc:
        raise APIError(503, str(exc), type="server_error", code="server_shutting_down") from None
    finally:
        slot.release()
    vectors = embedder.finish(pooled, dimensions=req.dimensions)
    tokens = sum(len(i) for i in ids)
    state.embeddings.add(len(ids), tokens)
    if state.drift is not None and state.async_engine.runner is None:
        # an encoder's server watches what it embeds; a chat model's server watches its
        # generation prompts (`prompt_vector`), one kind of vector per detector
        _watch(state, embedder.finish(pooled))
    data = []
    for i, v in enumerate(vectors):
        if req.encoding_format == "base64":
            value: Any = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        else:
            value = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return JSONResponse({"object": "list", "data": data, "model": state.model_name,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _watch(state: _State, vectors) -> None:
    """Feed the drift detector in a worker thread (a check runs Sinkhorn) without holding
    up the response; a failure is logged and counted, never the request's."""

    def observe():
        try:
            state.drift.observe(vectors)
        except Exception:
            state.drift_errors += 1
            log.exception("drift detector failed")

    asyncio.get_running_loop().run_in_executor(None, observe)


def prompt_vector(model, ids) -> Optional[Any]:
    """What the drift detector watches for a generation request: the L2-normalised mean of
    the prompt tokens' input embeddings (a bag of embeddings: no forward pass, so watching
    costs the server next to nothing). None for a model without an `embed_tokens` table."""
    import numpy as np

    from .. import ops
    table = getattr(model, "embed_tokens", None)
    if table is None or not ids:
        return None
    mean = ops.embed(table, np.asarray(ids, dtype=np.int64)).astype(np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return mean / norm if norm > 0 else mean


def _watch_prompt(state: _State, ids: list[int]) -> None:
    """A generation request's prompt for the drift detector (in a worker thread)."""

    def observe():
        try:
            vector = prompt_vector(state.engine.model, ids)
            if vector is not None:
                state.drift.observe(vector)
        except Exception:
            state.drift_errors += 1
            log.exception("drift detector failed")

    asyncio.get_running_loop().run_in_executor(None, observe)


def _usage(states: list[ChoiceState]) -> dict[str, Any]:
    prompts = {s.choice.prompt_index: len(s.choice.ids) for s in states}
    prompt = sum(prompts.values())
    completion = sum(s.completion_tokens for s in states)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in states)}}


def _echo_piece(state: _State, st: ChoiceState, out: Optional[RequestOutput]):
    """The echoed prompt of a completions choice: its text and, when logprobs were asked
    for, the prompt's logprobs (from the output that carries them)."""
    st.echoed = True
    text = st.choice.echo_text
    if st.choice.params.prompt_logprobs is None:
        return text, None
    ids, lps, tops = prompt_entries(out, st.choice.ids)
    if not st.choice.params.prompt_logprobs:  # logprobs 0: no alternatives, as for the rest
        tops = [None] * len(tops)
    logprobs = completion_logprobs(state.tokens, ids, lps, tops, st.offset)
    st.offset += sum(len(t) for t in logprobs["tokens"])
    return text, logprobs


def _piece_logprobs(state: _State, st: ChoiceState, out: RequestOutput, chat: bool):
    if st.choice.params.logprobs is None:
        return None
    if chat:
        return {"content": chat_logprobs(state.tokens, out.token_ids, out.logprobs,
                                         out.top_logprobs)}
    tops = out.top_logprobs if st.choice.params.logprobs else [None] * len(out.token_ids)
    logprobs = completion_logprobs(state.tokens, out.token_ids, out.logprobs, tops, st.offset)
    st.offset += sum(len(t) for t in logprobs["tokens"])
    return logprobs


def _merge_completion_logprobs(first: Optional[dict], second: Optional[dict]) -> Optional[dict]:
    if first is None or second is None:
        return first or second
    return {k: first[k] + second[k] for k in first}


def _chunk(head, chat: bool, index: int, text: str, finish: Optional[str],
           logprobs=None, first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text} if first else (
            {"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}
    return {**head, "object": "text_completion",
            "choices": [{"index": index, "text": text, "logprobs": logprobs,
                         "finish_reason": finish}]}


async def _sse(state: _State, merged: _Merged, head, chat: bool, states: list[ChoiceState],
               rids: list[str], include_usage: bool):
    finished = False
    try:
        for st in states:
            if chat:
                yield _event(_chunk(head, chat, st.choice.index, "", None, first=True))
            elif st.choice.echo_text is not None and st.choice.params.prompt_logprobs is None:
                text, _ = _echo_piece(state, st, None)
                yield _event(_chunk(head, chat, st.choice.index, text, None))
        try:
            async for index, out in merged:
                st = states[index]
                if out.finish_reason == "error":  # this request alone failed: say so
                    finished = True
                    if out.text:
                        yield _event(_chunk(head, chat, index, out.text, None))
                    yield _event(_request_failed(out).body())
                    break
                st.add(out)
                text, logprobs = out.text, None
                if not chat and not st.echoed and st.choice.echo_text is not None:
                    echo, logprobs = _echo_piece(state, st, out)
                    text = echo + text
                logprobs = _merge_completion_logprobs(
                    logprobs, _piece_logprobs(state, st, out, chat)) if not chat else \
                    _piece_logprobs(state, st, out, chat)
                if chat and logprobs is not None and not logprobs["content"]:
                    logprobs = None
                calls, finish = None, out.finish_reason
                if st.choice.tools is not None:
                    text, calls = _stream_tools(st, out.finished)
                    if calls:
                        finish = _tool_finish(finish)
                if out.finished:
                    if text or logprobs:
                        yield _event(_chunk(head, chat, index, text, None, logprobs))
                    if calls:
                        delta = _chunk(head, chat, index, "", None)
                        delta["choices"][0]["delta"] = {"tool_calls": [
                            {"index": k, **call} for k, call in enumerate(calls)]}
                        yield _event(delta)
                    last = _chunk(head, chat, index, "", finish)
                    if len(states) == 1:
                        last["usage"] = _usage(states)
                    yield _event(last)
                elif text or logprobs:
                    yield _event(_chunk(head, chat, index, text, None, logprobs))
            else:
                finished = True
                if len(states) > 1 and include_usage:
                    yield _event({**head, "object": "chat.completion.chunk" if chat else
                                  "text_completion", "choices": [], "usage": _usage(states)})
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
        merged.cancel()
        if not finished:  # the client went away (or the engine failed): free its blocks now
            for rid in rids:
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


async def _collect(request: Request, state: _State, merged: _Merged, head, chat: bool,
                   states: list[ChoiceState], rids: list[str]) -> Response:
    prompt_logprobs: dict[int, RequestOutput] = {}

    async def run():
        async for index, out in merged:
            if out.finish_reason == "error":
                raise _request_failed(out)
            if out.prompt_logprobs is not None:
                prompt_logprobs[index] = out
            states[index].add(out)

    task = asyncio.ensure_future(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                merged.cancel()
                for rid in rids:
                    state.async_engine.abort(rid)
                return Response(status_code=499)
        try:
            task.result()
        except EngineClosed as exc:
            raise _closed(exc) from None
        except EngineFailed as exc:
            raise APIError(500, str(exc), type="server_error", code="internal_error") from None
    finally:
        merged.cancel()
        if not task.done():
            task.cancel()
    choices = []
    for st in states:
        c = st.choice
        want = c.params.logprobs
        if chat:
            logprobs = None if want is None else {"content": chat_logprobs(
                state.tokens, st.token_ids, st.logprobs, st.tops)}
            message = {"role": "assistant", "content": st.text}
            finish = st.finish_reason
            if c.tools is not None:
                message["content"], calls = parse_calls(st.text, c.tools)
                if calls:
                    message["tool_calls"] = calls
                    finish = _tool_finish(finish)
            choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                            "finish_reason": finish})
            continue
        text, logprobs = st.text, None
        if c.echo_text is not None:
            echo, logprobs = _echo_piece(state, st, prompt_logprobs.get(c.index))
            text = echo + text
        if want is not None:
            tops = st.tops if want else [None] * len(st.token_ids)
            logprobs = _merge_completion_logprobs(logprobs, completion_logprobs(
                state.tokens, st.token_ids, st.logprobs, tops, st.offset))
        choices.append({"index": c.index, "text": text, "logprobs": logprobs,
                        "finish_reason": st.finish_reason})
    obj = "chat.completion" if chat else "text_completion"
    return JSONResponse({**head, "object": obj, "choices": choices, "usage": _usage(states)})


def _tool_finish(finish: Optional[str]) -> Optional[str]:
    """A choice that ends in tool calls finishes with "tool_calls" (one cut off by
    max_tokens keeps "length")."""
    return "tool_calls" if finish == "stop" else finish


def _stream_tools(st: ChoiceState, finished: bool):
    """(content to send now, tool calls at the end) of a streamed choice with tools:
    content streams up to where a tool call begins; the calls go out as one delta each
    when the choice ends (a constrained choice sends no content at all)."""
    tools = st.choice.tools
    text = st.text
    if not finished:
        if tools.constrained or st.in_call:
            return "", None
        allowed, st.in_call = content_before_call(text)
        piece, st.sent = allowed[st.sent:], max(st.sent, len(allowed))
        return piece, None
    content, calls = parse_calls(text, tools)
    if calls:
        if tools.constrained:
            return "", calls
        allowed, _ = content_before_call(text)
        piece = allowed[st.sent:]
        st.sent = max(st.sent, len(allowed))
        return piece, calls
    piece = text[st.sent:]
    st.sent = len(text)
    return piece, None


def _require_tokenizer(engine, route: str):
    if engine.tokenizer is None:
        raise bad(f"this model has no tokenizer, so {route} cannot work")
    return engine.tokenizer
