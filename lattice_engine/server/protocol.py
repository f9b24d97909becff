"""OpenAI request bodies -> prompt ids and `SamplingParams`, with OpenAI-style errors.

Only what the engine can honour is accepted: an unsupported option with a non-default
value (n > 1, logprobs, echo, best_of, ...) is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..errors import RequestError
from ..sampling import SamplingParams


class APIError(Exception):
    """An error answered as {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type, param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_NUMBER = (int, float)


def _get(body: dict, name: str, types, default=None, check=None, rule: str = ""):
    """body[name] if present and not null, checked for type and range."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise bad(f"'{name}' must be {rule or _type_name(types)}, got {value!r}", name)
    if not isinstance(value, types):
        raise bad(f"'{name}' must be {rule or _type_name(types)}, got {type(value).__name__} "
                  f"{value!r}", name)
    if check is not None and not check(value):
        raise bad(f"'{name}' = {value!r} is out of range: it must be {rule}", name)
    return value


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


# options with no effect here: accepted only at their default value
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None,
                "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None,
                "presence_penalty": 0, "frequency_penalty": 0}


@dataclass
class ParsedRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool


def sampling_from(body: dict, defaults: SamplingParams, max_tokens_field: str) -> SamplingParams:
    for name, default in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value != default and not (name == "logprobs" and value is False):
            raise bad(f"'{name}' = {value!r} is not supported by this server (only "
                      f"{default!r})", name)
    max_tokens = _get(body, max_tokens_field, int, None, lambda v: v >= 1, "an integer >= 1")
    if max_tokens_field != "max_tokens":  # chat: the older max_tokens name works too
        max_tokens = max_tokens or _get(body, "max_tokens", int, None, lambda v: v >= 1,
                                        "an integer >= 1")
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise bad("'stop' must be a string or an array of at most 4 strings", "stop")
    values = dict(
        temperature=_get(body, "temperature", _NUMBER, None, lambda v: 0 <= v <= 2,
                         "a number in [0, 2]"),
        top_p=_get(body, "top_p", _NUMBER, None, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        top_k=_get(body, "top_k", int, None, lambda v: v >= 0, "an integer >= 0"),
        min_p=_get(body, "min_p", _NUMBER, None, lambda v: 0 <= v < 1, "a number in [0, 1)"),
        repetition_penalty=_get(body, "repetition_penalty", _NUMBER, None, lambda v: v > 0,
                                "a number > 0"),
        seed=_get(body, "seed", int),
        max_tokens=max_tokens,
        stop=tuple(stop) if stop is not None else None,
    )
    try:
        return defaults.with_overrides(**values)
    except RequestError as exc:
        raise bad(str(exc)) from None


def ignore_eos(body: dict) -> bool:
    """vLLM's extension: keep generating past end-of-sequence (fixed-length benchmarks)."""
    return _get(body, "ignore_eos", bool, False)


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, {})
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return stream, include


def completion_prompt(body: dict, tokenizer) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise bad("'prompt' is required", "prompt")
    else:
        raise bad("'prompt' must be a string or an array of token ids (batches of several "
                  "prompts are not supported: send one request each)", "prompt")
    if not ids:
        raise bad("'prompt' is empty", "prompt")
    return ids


def chat_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or \
                        not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}].content: only text parts are supported",
                              "messages")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or an array of text parts",
                      "messages")
        out.append({"role": m["role"], "content": content})
    return out
