"""OpenAI request bodies -> prompt ids and `SamplingParams`, with OpenAI-style errors.

Only what the engine can honour is accepted: an unsupported option with a non-default
value (best_of other than n, suffix without a fill-in-the-middle template, ...) is a 400
that names it, never silently ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..batching import DEFAULT_SPECULATION
from ..errors import LatticeError, RequestError
from ..sampling import (LOGIT_BIAS_LIMIT, LOGPROBS_MODES, MAX_TOKENS_LIMIT, MAX_TOP_LOGPROBS,
                        PENALTY_LIMIT, SEED_LIMIT, SamplingParams)


class APIError(Exception):
    """An error answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        # a message can quote the client's own text, lone surrogates included: escape
        # what UTF-8 cannot encode, or rendering the error itself fails with a 500
        message, param = _encodable(message), _encodable(param)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _encodable(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_NUMBER = (int, float)
MAX_DEPTH = 64  # nesting of a request body; JSON schemas in response_format stay far below
MAX_N = 128     # choices per prompt (the KV pool may allow fewer: checked per request)
MAX_PROMPTS = 256  # prompts in one /v1/completions batch
MAX_LOGIT_BIAS = 1024  # entries in logit_bias


@dataclass(frozen=True)
class Field:
    """The one rule for a request field: accepted types and, for numbers, the range
    (finite always: inf and NaN never reach sampling). `rule` is what errors quote."""

    types: tuple
    rule: str
    check: Optional[Callable[[Any], bool]] = None

    def get(self, body: dict, name: str, default=None):
        """body[name] if present and not null, else default; a 400 naming the field and
        its rule otherwise."""
        value = body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) and bool not in self.types or \
                not isinstance(value, self.types):
            got = repr(value) if isinstance(value, bool) else \
                f"{type(value).__name__} {_short(value)}"
            raise bad(f"'{name}' must be {self.rule}, got {got}", name)
        if isinstance(value, float) and not math.isfinite(value):
            raise bad(f"'{name}' = {value!r} is not a finite number; it must be {self.rule}",
                      name)
        if self.check is not None and not self.check(value):
            raise bad(f"'{name}' = {_short(value)} is out of range: it must be {self.rule}",
                      name)
        return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Every request field this server reads, with its rule. Sampling bounds match
# `SamplingParams` (which checks again for callers of the Python API).
SCHEMA: dict[str, Field] = {
    "model": Field((str,), "a string"),
    "max_tokens": Field((int,), f"an integer in [1, {MAX_TOKENS_LIMIT}] (0 with echo)",
                        lambda v: 0 <= v <= MAX_TOKENS_LIMIT),
    "max_completion_tokens": Field((int,), f"an integer in [1, {MAX_TOKENS_LIMIT}]",
                                   lambda v: 1 <= v <= MAX_TOKENS_LIMIT),
    "temperature": Field(_NUMBER, "a number in [0, 2]", lambda v: 0 <= v <= 2),
    "top_p": Field(_NUMBER, "a number in (0, 1]", lambda v: 0 < v <= 1),
    "top_k": Field((int,), "an integer in [0, 2**31)", lambda v: 0 <= v < 2**31),
    "min_p": Field(_NUMBER, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "repetition_penalty": Field(_NUMBER, "a number in (0, 100]", lambda v: 0 < v <= 100),
    "seed": Field((int,), "an integer in [0, 2**64)", lambda v: 0 <= v < SEED_LIMIT),
    "stream": Field((bool,), "a boolean"),
    "n": Field((int,), f"an integer in [1, {MAX_N}]", lambda v: 1 <= v <= MAX_N),
    "best_of": Field((int,), f"an integer in [1, {MAX_N}]", lambda v: 1 <= v <= MAX_N),
    "echo": Field((bool,), "a boolean"),
    "top_logprobs": Field((int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]",
                          lambda v: 0 <= v <= MAX_TOP_LOGPROBS),
    # completions: the number of alternatives; chat: a boolean (top_logprobs says how many)
    "logprobs": Field((int,), f"an integer in [0, {MAX_TOP_LOGPROBS}]",
                      lambda v: 0 <= v <= MAX_TOP_LOGPROBS),
    "chat_logprobs": Field((bool,), "a boolean"),
    "presence_penalty": Field(_NUMBER, f"a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]",
                              lambda v: abs(v) <= PENALTY_LIMIT),
    "frequency_penalty": Field(_NUMBER, f"a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]",
                               lambda v: abs(v) <= PENALTY_LIMIT),
    "logit_bias": Field((dict,), f"an object mapping token ids to numbers in "
                        f"[-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}] (at most "
                        f"{MAX_LOGIT_BIAS} entries)", lambda v: len(v) <= MAX_LOGIT_BIAS),
    "logprobs_mode": Field((str,), f"one of {', '.join(LOGPROBS_MODES)}",
                           lambda v: v in LOGPROBS_MODES),
    "suffix": Field((str,), "a string"),
    "tools": Field((list,), "an array of {type: function, function: {...}} objects",
                   lambda v: 1 <= len(v) <= 128),
    "tool_choice": Field((str, dict), "'none', 'auto', 'required' or {type: function, "
                         "function: {name}}"),
    "parallel_tool_calls": Field((bool,), "a boolean"),
    # /tokenize and /detokenize (llama.cpp's server)
    "content": Field((str,), "a string"),
    "add_special": Field((bool,), "a boolean"),
    "with_pieces": Field((bool,), "a boolean"),
    "tokens": Field((list,), "an array of token ids (integers)",
                    lambda v: all(isinstance(t, int) and not isinstance(t, bool) for t in v)),
    "stream_options": Field((dict,), "an object"),
    "ignore_eos": Field((bool,), "a boolean"),
    "stop": Field((str, list), "a string or an array of at most 4 strings",
                  lambda v: isinstance(v, str) or (len(v) <= 4 and
                                                   all(isinstance(s, str) for s in v))),
    # extensions (like vLLM's extra sampling parameters): a plugin's sampler and logits
    # processors by their registered names
    "sampler": Field((str,), "the name of a registered sampler"),
    "logits_processors": Field((dict,), "an object mapping registered logits processor "
                               "names to their values", lambda v: len(v) <= 64),
    # speculative decoding for this request: false (off), true (the server's default), or
    # {"method", "num_draft_tokens", "adaptive", "options"} (see `speculation_from`)
    "speculative": Field((bool, dict), "false, true, or an object {method, num_draft_tokens, "
                         "adaptive, options}", lambda v: isinstance(v, bool) or len(v) <= 8),
}

# drafters a request may pick with its own options: they load no file of the request's
# choosing (a request must not make the server read a model file it names): prompt lookup,
# and Qwen3.5's own MTP head (from the served checkpoint) and linear-attention layers
REQUEST_DRAFTERS = ("mtp", "ngram", "self")


def speculation_from(body: dict, engine):
    """The request's `speculative` field as a `Speculation` (None: off), or
    `DEFAULT_SPECULATION` for the server's own setting. A request may turn speculation off,
    tune num_draft_tokens / adaptive of the configured drafter, or pick a drafter that
    loads no file of its choosing (ngram; mtp and self on a Qwen3.5 model) with its options; anything else is a 400 naming the field and
    the choices."""
    value = _get(body, "speculative")
    if value is None or value is True:
        return DEFAULT_SPECULATION
    if value is not False:
        configured = engine.speculative.method
        method = value.get("method", configured)
        allowed = sorted({m for m in (configured, *REQUEST_DRAFTERS) if m})
        if method not in allowed:
            raise bad(f"'speculative.method' = {_short(method)} is not available to a request "
                      f"on this server; choices: {', '.join(allowed)} (a draft model is "
                      f"chosen in the server's [speculative] config)", "speculative")
        if "options" in value and method not in REQUEST_DRAFTERS:
            raise bad(f"'speculative.options' can be set by a request only for "
                      f"{', '.join(REQUEST_DRAFTERS)}; {method!r} takes its options from the "
                      f"server's [speculative] config", "speculative")
    try:
        return engine.speculation_for(value)
    except LatticeError as exc:
        raise bad(str(exc), "speculative") from None



def _get(body: dict, name: str, default=None):
    return SCHEMA[name].get(body, name, default)


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or a 400 that says what is wrong with it: not
    JSON, not an object, NaN / Infinity (not JSON, though Python's parser takes them),
    numbers out of float range, nesting deeper than MAX_DEPTH, strings that are not
    valid Unicode (a lone surrogate escape)."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number; use a finite number")

    def finite_float(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:40]} is out of range")
        return value

    try:
        body = json.loads(raw, parse_constant=no_constant, parse_float=finite_float)
    except RecursionError:
        raise bad(f"the request body is nested too deeply (the limit is {MAX_DEPTH} levels)",
                  code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:  # our hooks, int digit limits, bad bytes
        raise bad(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    stack = [(body, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad(f"the request body is nested too deeply at {path or 'the top'} (the "
                      f"limit is {MAX_DEPTH} levels)", code="invalid_json")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            where = f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"
            where = where.lstrip(".")
            for text in ((key, value) if isinstance(node, dict) else (value,)):
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        raise bad(f"'{where}' holds a lone UTF-16 surrogate (an unpaired "
                                  f"\\ud800-\\udfff escape), which is not text; send "
                                  f"valid Unicode", where.split(".")[0].split("[")[0]) \
                            from None
            if isinstance(value, (dict, list)):
                stack.append((value, where, depth + 1))




@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def plugin_sampling(body: dict, defaults: SamplingParams, registry) -> dict[str, Any]:
    """The request's `sampler` and `logits_processors`, checked against the registry: a name
    nobody registered is a 400 listing the choices. A built-in processor (temperature,
    top_k, ...) is set by its own top-level field, not here. The request's processor
    values are merged over the configured ones (`[sampling] processors`)."""
    out: dict[str, Any] = {}
    sampler = _get(body, "sampler")
    if sampler is not None:
        names = registry.names("samplers") if registry is not None else []
        if sampler not in names:
            raise bad(f"'sampler' = {_short(sampler)} is not a registered sampler; registered: "
                      f"{', '.join(names)}", "sampler")
        out["sampler"] = sampler
    requested = _get(body, "logits_processors")
    if requested:
        from ..sampling import BUILTIN_PROCESSORS
        names = registry.names("logits_processors") if registry is not None else []
        plugin_names = [n for n in names if n not in BUILTIN_PROCESSORS]
        for name in requested:
            if name in BUILTIN_PROCESSORS:
                raise bad(f"'logits_processors.{name}': the built-in {name!r} is set by the "
                          f"top-level '{name}' field", "logits_processors")
            if name not in plugin_names:
                raise bad(f"'logits_processors.{_short(name)}' is not a registered logits "
                          f"processor; registered by plugins: {', '.join(plugin_names) or '(none)'}",
                          "logits_processors")
        out["processors"] = {**defaults.processors, **requested}
    return out


def logit_bias(body: dict, vocab_size: Optional[int]) -> Optional[dict[int, float]]:
    """`logit_bias` as {token id: bias}: keys are token ids (JSON object keys are strings),
    each below the model's vocabulary size, values numbers in the OpenAI range."""
    raw = _get(body, "logit_bias")
    if raw is None:
        return None
    out = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(f"'logit_bias' key {_short(key)} is not a token id (an integer as a "
                      f"string, e.g. \"50256\")", "logit_bias") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise bad(f"'logit_bias' key {token} is not a token id of this model: ids are in "
                      f"[0, {vocab_size})", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, _NUMBER) or \
                not abs(value) <= LOGIT_BIAS_LIMIT:
            raise bad(f"'logit_bias[{token}]' = {_short(value)} is out of range: it must be a "
                      f"number in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]", "logit_bias")
        out[token] = float(value)
    return out


def logprobs_wanted(body: dict, chat: bool) -> Optional[int]:
    """How many alternatives per token the request wants reported, None for no logprobs.
    Chat: `logprobs: true` with `top_logprobs` (0 by default); completions: `logprobs` is
    the number itself (the legacy shape)."""
    if chat:
        on = SCHEMA["chat_logprobs"].get(body, "logprobs", False)
        top = _get(body, "top_logprobs")
        if top is not None and not on:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if on else None
    if body.get("top_logprobs") is not None:
        raise bad("'top_logprobs' is a chat completions field; in /v1/completions "
                  "'logprobs' is the number of alternatives", "top_logprobs")
    return _get(body, "logprobs")


def choices_per_prompt(body: dict) -> int:
    n = _get(body, "n", 1)
    best_of = _get(body, "best_of")
    if best_of is not None and best_of != n:
        raise bad(f"'best_of' = {best_of} is not supported by this server (only equal to "
                  f"'n' = {n}: every choice is returned)", "best_of")
    return n


def sampling_from(body: dict, defaults: SamplingParams, max_tokens_field: str,
                  registry=None, *, chat: Optional[bool] = None,
                  vocab_size: Optional[int] = None) -> SamplingParams:
    chat = max_tokens_field != "max_tokens" if chat is None else chat
    max_tokens = _get(body, max_tokens_field)
    if max_tokens_field != "max_tokens":  # chat: the older max_tokens name works too
        max_tokens = max_tokens or _get(body, "max_tokens")
        if max_tokens == 0:
            raise bad(f"'{max_tokens_field}' = 0 is out of range: it must be an integer in "
                      f"[1, {MAX_TOKENS_LIMIT}]", max_tokens_field)
    echo = not chat and _get(body, "echo", False)
    top = logprobs_wanted(body, chat)
    if max_tokens == 0 and not echo:
        raise bad("'max_tokens' = 0 is out of range without 'echo': it must be an integer in "
                  f"[1, {MAX_TOKENS_LIMIT}] (0 with echo scores the prompt only)", "max_tokens")
    stop = _get(body, "stop")
    if isinstance(stop, str):
        stop = [stop]
    values = dict(
        temperature=_get(body, "temperature"),
        top_p=_get(body, "top_p"),
        top_k=_get(body, "top_k"),
        min_p=_get(body, "min_p"),
        repetition_penalty=_get(body, "repetition_penalty"),
        seed=_get(body, "seed"),
        max_tokens=max_tokens,
        presence_penalty=_get(body, "presence_penalty"),
        frequency_penalty=_get(body, "frequency_penalty"),
        logit_bias=logit_bias(body, vocab_size),
        logprobs=top,
        prompt_logprobs=top if echo else None,
        logprobs_mode=_get(body, "logprobs_mode"),
        stop=tuple(stop) if stop is not None else None,
        **plugin_sampling(body, defaults, registry),
    )
    try:
        return defaults.with_overrides(**values)
    except RequestError as exc:
        raise bad(str(exc)) from None


def ignore_eos(body: dict) -> bool:
    """vLLM's extension: keep generating past end-of-sequence (fixed-length benchmarks)."""
    return _get(body, "ignore_eos", False)


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", False)
    options = _get(body, "stream_options", {})
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """`prompt` as a list of token-id lists: a string, an array of token ids, or a batch
    (an array of strings or of token-id arrays, at most MAX_PROMPTS)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad(f"'prompt' holds {len(prompt)} prompts; the limit is {MAX_PROMPTS} per "
                      f"request", "prompt")
        return [completion_prompt({"prompt": p}, tokenizer, where=f"prompt[{i}]")
                for i, p in enumerate(prompt)]
    return [completion_prompt(body, tokenizer)]


def completion_prompt(body: dict, tokenizer, where: str = "prompt") -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad("this model has no tokenizer, so 'prompt' must be an array of token ids",
                      "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise bad("'prompt' is required", "prompt")
    else:
        raise bad(f"'{where}' must be a string, an array of token ids, or an array of "
                  f"those (a batch)", "prompt")
    if not ids:
        raise bad(f"'{where}' is empty", "prompt")
    return ids


def chat_messages(body: dict) -> list[dict[str, Any]]:
    """The messages, content parts joined into text (a part list with image_url parts is
    kept: the engine decodes the images, `Engine.chat_prompt`). An assistant message may
    carry `tool_calls` (its content then may be null), a "tool" message answers one (its
    `tool_call_id` and `name` are kept for the template)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant" or not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict) and
                    isinstance(c["function"].get("name"), str) for c in calls):
                raise bad(f"messages[{i}].tool_calls must be an array of {{id, type, "
                          f"function: {{name, arguments}}}} on an assistant message",
                          "messages")
        content = m.get("content")
        if content is None and calls:
            content = ""
        if isinstance(content, list):  # content parts: text, and image_url for images
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    parts = None
                    break
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content[{j}]: a content part must be "
                              f"{{'type': 'text', 'text': ...}} or {{'type': 'image_url', "
                              f"'image_url': {{'url': 'data:image/png;base64,...'}}}}",
                              "messages")
                parts.append(part["text"])
            if parts is None:
                out.append({"role": m["role"], "content": content})
                continue
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or an array of text parts",
                      "messages")
        message = {"role": m["role"], "content": content}
        if calls:
            message["tool_calls"] = calls
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


MAX_EMBEDDING_INPUTS = 2048  # inputs in one /v1/embeddings request (OpenAI's limit)


@dataclass(frozen=True)
class EmbeddingRequest:
    """A checked /v1/embeddings body: `inputs` a list of strings or of token-id lists."""

    inputs: list
    encoding_format: str
    dimensions: Optional[int]


def embedding_request(body: dict) -> EmbeddingRequest:
    """The OpenAI fields: input (a string, an array of strings, an array of token ids, or an
    array of such arrays; none empty), encoding_format ("float" or "base64"), dimensions
    (an integer >= 1; the model's width bounds it later), user (accepted, unused)."""
    raw = body.get("input")
    if raw is None:
        raise bad("'input' is required: a string, an array of strings or an array of token "
                  "ids", "input")

    def is_id(t) -> bool:
        return isinstance(t, int) and not isinstance(t, bool)

    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(is_id(t) for t in raw):
        inputs = [raw]
    elif isinstance(raw, list):
        inputs = raw
        for i, item in enumerate(inputs):
            if isinstance(item, str) or (isinstance(item, list) and all(is_id(t) for t in item)):
                continue
            raise bad(f"input[{i}] must be a string or an array of token ids, got "
                      f"{type(item).__name__} {_short(item)}", "input")
    else:
        raise bad(f"'input' must be a string, an array of strings or an array of token ids, "
                  f"got {type(raw).__name__}", "input")
    if not inputs:
        raise bad("'input' is empty: give at least one string or token array", "input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise bad(f"'input' has {len(inputs)} items; the limit is {MAX_EMBEDDING_INPUTS} per "
                  f"request: split it", "input")
    for i, item in enumerate(inputs):
        if len(item) == 0:
            what = "an empty string" if isinstance(item, str) else "an empty token array"
            raise bad(f"input[{i}] is {what}; every input needs some text", "input")
    fmt = body.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ("float", "base64"):
        raise bad(f"'encoding_format' must be 'float' or 'base64', got {_short(fmt)}",
                  "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and not (is_id(dims) and dims >= 1):
        raise bad(f"'dimensions' must be an integer >= 1, got {_short(dims)}", "dimensions")
    if body.get("user") is not None and not isinstance(body.get("user"), str):
        raise bad("'user' must be a string", "user")
    return EmbeddingRequest(inputs, fmt, dims)
