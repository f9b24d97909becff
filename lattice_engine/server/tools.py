"""Tool calling: `tools` / `tool_choice` in, `tool_calls` out.

The tools are rendered by the model's own chat template (its `tools` variable: Qwen2.5's
template lists them in the system turn and asks for calls as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, the Hermes format). A
template that never reads `tools` cannot show them to the model: such a request is a 400.

- `none`: the tools are not rendered and nothing is parsed.
- `auto`: the model decides; every `<tool_call>` block it writes whose body is a JSON
  object with a string `name` of a given tool becomes a tool call (the text outside the
  blocks stays the content). Small models often answer with the call's JSON alone,
  bare or in a ```json fence, instead of the tags: an answer that is exactly such an
  object ({"name": a given tool, "arguments": {...}}) is taken as the call too.
- `required` / a named function: the prompt ends with the opening `<tool_call>\\n` and the
  output is constrained (xgrammar, JSON schema) to `{"name": one of the tools (or the named
  one), "arguments": that tool's parameters schema}`, so it always parses and validates.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from .protocol import SCHEMA, bad

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]      # as the client sent them (rendered by the template)
    choice: str                      # "auto", "required" or "named"
    name: Optional[str] = None       # the named function

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "named")

    def schema(self) -> dict[str, Any]:
        """The JSON schema a forced call's body must follow."""
        options = []
        for tool in self.tools:
            fn = tool["function"]
            if self.name is not None and fn["name"] != self.name:
                continue
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            options.append({"type": "object",
                            "properties": {"name": {"const": fn["name"]}, "arguments": params},
                            "required": ["name", "arguments"], "additionalProperties": False})
        return options[0] if len(options) == 1 else {"anyOf": options}

    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def tool_request(body: dict[str, Any]) -> Optional[ToolRequest]:
    """The body's tools and tool_choice, checked; None when no tool is to be offered
    (no tools, or tool_choice "none")."""
    tools = SCHEMA["tools"].get(body, "tools")
    choice = SCHEMA["tool_choice"].get(body, "tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(fn, dict):
            raise bad(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}",
                      "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_', '.' "
                      f"or '-', got {str(name)[:80]!r}", "tools")
        if name in names:
            raise bad(f"tools[{i}].function.name {name!r} is given twice", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters must be a JSON schema object",
                      "tools")
        names.append(name)
    if choice is None or choice == "auto":
        return ToolRequest(tools, "auto")
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tools, "required")
    if isinstance(choice, str):
        raise bad(f"'tool_choice' = {choice[:80]!r} is not one of 'none', 'auto', 'required' "
                  f"or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                  "tool_choice")
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise bad("'tool_choice' as an object must be {\"type\": \"function\", \"function\": "
                  "{\"name\": ...}}", "tool_choice")
    if name not in names:
        raise bad(f"'tool_choice' names {name[:80]!r}, which is not among the tools: "
                  f"{', '.join(names)}", "tool_choice")
    return ToolRequest(tools, "named", name)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: an assistant's tool_calls with their
    arguments as objects (OpenAI clients send JSON strings; templates write them with
    `tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                fn = dict(call.get("function", {}))
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                fixed.append({**call, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": name,
                         "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parse_calls(text: str, request: ToolRequest) -> tuple[Optional[str], list[dict]]:
    """(content, tool calls) of a finished output. A constrained output is the body of
    one call; otherwise each `<tool_call>` block naming a given tool is a call, and blocks
    that do not parse stay in the content."""
    if request.constrained:
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut short by max_tokens: no complete call
        return None, [_call(body["name"], body["arguments"])]
    calls, kept, last = [], [], 0
    for match in _BLOCK.finditer(text):
        try:
            body = json.loads(match.group(1).strip())
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or body.get("name") not in request.names():
            continue
        calls.append(_call(body["name"], body.get("arguments", {})))
        kept.append(text[last:match.start()])
        last = match.end()
    kept.append(text[last:])
    if not calls:
        body = _bare_call(text, request)
        if body is not None:
            return None, [_call(body["name"], body.get("arguments", body.get("parameters")))]
        return text, []
    content = "".join(kept).strip()
    return (content or None), calls


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


def _bare_call(text: str, request: ToolRequest) -> Optional[dict]:
    """The answer as a whole is one call's JSON ({"name", "arguments"}), maybe fenced."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in request.names():
        return None
    arguments = value.get("arguments", value.get("parameters"))
    if not isinstance(arguments, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    return value


def content_before_call(text: str) -> tuple[str, bool]:
    """For streaming with tool_choice auto: how much of `text` (everything generated so
    far) can be sent as content now, and whether a tool call has begun. A tail that could
    still become the opening tag is held back."""
    at = text.find(OPEN)
    if at >= 0:
        return text[:at], True
    head = text.lstrip()
    if head.startswith(("{", "```")) or (head and "```".startswith(head)):
        return "", False  # maybe a bare call: held until the answer ends
    for keep in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-keep:]):
            return text[:-keep], False
    return text, False
