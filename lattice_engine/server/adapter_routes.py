"""The server's adapter side: adapters as models (`model: "<adapter name>"` in a request,
listed by GET /v1/models as vLLM lists LoRA modules), and hot loading / unloading /
training over the API (POST /v1/load_lora_adapter, /v1/unload_lora_adapter,
/v1/adapt_lora_adapter). Those three change what the server computes, so they need an API
key: without `server.api_key` they answer 403. Changes to the resident adapters run on the
engine thread between two steps; files are read and training runs off it, so streams keep
decoding meanwhile; a request keeps the adapter version it started with."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..adapters import UnknownAdapter
from ..errors import LatticeError
from .protocol import APIError, bad


def manager(engine):
    """The engine's AdapterManager if adapters were ever loaded, else None (creating one
    attaches tables to every linear: that is done on the engine thread, see `_mutate`)."""
    return getattr(engine, "_adapters", None)


def model_entries(engine, model_name: str, created: int) -> list[dict[str, Any]]:
    data = [{"id": model_name, "object": "model", "created": created,
             "owned_by": "lattice-engine"}]
    mgr = manager(engine)
    for name in mgr.names() if mgr is not None else []:
        data.append({"id": name, "object": "model", "created": created,
                     "owned_by": "lattice-engine", "parent": model_name, "root": name})
    return data


def resolve_model(body: dict, engine, model_name: str) -> Optional[str]:
    """The adapter a request names as its model (None: the base model); 404 for a name
    that is neither."""
    model = body.get("model")
    if not isinstance(model, str):
        raise bad("'model' is required and must be a string", "model")
    if model == model_name:
        return None
    mgr = manager(engine)
    if mgr is not None and model in mgr.by_name:
        return model
    served = [model_name] + (mgr.names() if mgr is not None else [])
    raise APIError(404, f"model {model!r} does not exist here; this server serves "
                        f"{', '.join(repr(n) for n in served)} (see GET /v1/models)",
                   param="model", code="model_not_found")


def hold(engine, adapter: Optional[str]):
    """The (slot, variant, release) a request runs with; 404 if the adapter went away."""
    try:
        return engine.adapter_for_request(adapter)
    except UnknownAdapter as exc:
        raise APIError(404, str(exc), param="model", code="model_not_found") from None


def _string(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad(f"'{key}' is required and must be a non-empty string", key)
    return value


def adapter_routes(state, authorize, read_json) -> list[Route]:
    engine = state.engine

    def require_key(request: Request) -> None:
        if not state.settings.api_key:
            raise APIError(403, "adapter management changes what this server computes and "
                                "needs an API key: start the server with --api-key (or "
                                "server.api_key)", type="permission_error",
                           code="api_key_required")
        authorize(request, state)

    async def mutate(fn):
        """fn() on the engine thread between steps."""
        return await state.async_engine.call(fn)

    async def load(request: Request) -> Response:
        require_key(request)
        body = await read_json(request, state)
        name, path = _string(body, "lora_name"), _string(body, "lora_path")
        kind = body.get("kind", "lora")
        if name == state.model_name:
            raise bad(f"lora_name {name!r} is the base model's name; pick another", "lora_name")
        mgr = manager(engine)
        if mgr is not None and name in mgr.by_name:
            raise bad(f"adapter {name!r} is already loaded; unload it first "
                      f"(POST /v1/unload_lora_adapter)", "lora_name")
        try:
            mgr = mgr or await mutate(lambda: engine.adapters)
            weights = await asyncio.to_thread(mgr.kind(kind).load, path, engine.model, name)
            await mutate(lambda: mgr.put(weights))
        except LatticeError as exc:
            raise bad(str(exc), "lora_path") from None
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "loaded",
                             "modules": len(weights.modules)})

    async def unload(request: Request) -> Response:
        require_key(request)
        body = await read_json(request, state)
        name = _string(body, "lora_name")
        mgr = manager(engine)
        try:
            if mgr is None:
                raise UnknownAdapter(name, [])
            await mutate(lambda: mgr.unload(name))
        except UnknownAdapter as exc:
            raise APIError(404, str(exc), param="lora_name", code="model_not_found") from None
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "unloaded"})

    training: dict[str, asyncio.Lock] = {}

    async def adapt(request: Request) -> Response:
        """Train a loaded adapter on one example: {"lora_name", "text" (or "prompt": token
        ids), "steps", "optimizer": {kind, lr, betas, eps, weight_decay, momentum, clip}}.
        The training runs off the engine thread (streams keep decoding); the new version
        is swapped in between two steps."""
        require_key(request)
        body = await read_json(request, state)
        name = _string(body, "lora_name")
        text, prompt = body.get("text"), body.get("prompt")
        if (text is None) == (prompt is None):
            raise bad("give exactly one of 'text' (a string) or 'prompt' (token ids)", "text")
        if text is not None and not isinstance(text, str):
            raise bad("'text' must be a string", "text")
        if prompt is not None and not (isinstance(prompt, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
            raise bad("'prompt' must be an array of token ids", "prompt")
        if text is not None and engine.tokenizer is None:
            raise bad("this model has no tokenizer: give 'prompt' as token ids", "text")
        options = body.get("optimizer") or {}
        if not isinstance(options, dict):
            raise bad("'optimizer' must be an object of optimizer settings", "optimizer")
        steps = body.get("steps", 1)
        mgr = manager(engine)
        if mgr is None or name not in mgr.by_name:
            raise APIError(404, str(UnknownAdapter(name, mgr.names() if mgr else [])),
                           param="lora_name", code="model_not_found")
        ids = engine.prompt_ids(text if text is not None else prompt)
        lock = training.setdefault(name, asyncio.Lock())
        async with lock:  # one training at a time per adapter: each builds on the last
            try:
                weights, info = await asyncio.to_thread(mgr.train, name, ids, options, steps)
                await mutate(lambda: mgr.put(weights))
            except UnknownAdapter as exc:
                raise APIError(404, str(exc), param="lora_name", code="model_not_found") \
                    from None
            except LatticeError as exc:
                raise bad(str(exc), "optimizer") from None
        return JSONResponse({"object": "lora_adapter", "id": name, "status": "trained",
                             "version": mgr.versions.get(name), "tokens": len(ids), **info})

    return [Route("/v1/load_lora_adapter", load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
            Route("/v1/adapt_lora_adapter", adapt, methods=["POST"])]
