"""Chat templates rendered the way transformers renders them.

Same Jinja2 settings (sandboxed, trim_blocks, lstrip_blocks, loop controls), the same
helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text), and the
tokenizer's special tokens as variables, so prompts are byte-identical to
`tokenizer.apply_chat_template(..., tokenize=False)`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional

from .errors import RequestError

FALLBACK_TEMPLATE = (  # ChatML, for checkpoints that ship no template
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class TemplateError(RequestError):
    """The chat template refused the messages (raise_exception) or failed to render."""


def _raise_exception(message: str):
    raise TemplateError(f"the model's chat template rejected the messages: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not parse: {exc}") from exc


def template_source(tokenizer_config: dict[str, Any]) -> str:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template or FALLBACK_TEMPLATE


def render_chat(tokenizer_config: dict[str, Any], messages: list[dict[str, Any]], *,
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages):
        raise RequestError("messages must be a list of objects with a 'role' and 'content'")
    special = {k: _token_text(v) for k, v in tokenizer_config.items()
               if k.endswith("_token") and v is not None}
    template = compile_template(template_source(tokenizer_config))
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special, **extra)
    except TemplateError:
        raise
    except Exception as exc:  # jinja runtime errors from a template we do not control
        raise TemplateError(f"the chat template failed to render: {exc}") from exc


def _token_text(value: Any) -> Any:
    # tokenizer_config may store special tokens as {"content": "<s>", ...}
    return value.get("content") if isinstance(value, dict) else value
