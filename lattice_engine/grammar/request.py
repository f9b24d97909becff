"""What a request asks for: `GrammarSpec` (a JSON schema, JSON object mode, a regex or an
EBNF grammar) and `grammar_from_request`, the parser of the OpenAI-style request fields
(`response_format`, `regex`, `grammar`) that the CLI, the Python API and the HTTP server
share; `require_xgrammar` says how to install the optional extra."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from ..errors import ConfigError, RequestError

if TYPE_CHECKING:  # annotations only: the compiler module imports this one
    from .compiler import GrammarCompiler

INSTALL_HINT = 'pip install "lattice-engine[grammar]"'
KINDS = ("json_object", "json_schema", "regex", "ebnf")


def require_xgrammar():
    """The xgrammar module, or a ConfigError that says how to install it."""
    try:
        import xgrammar
    except ImportError as exc:
        raise ConfigError(
            f"structured output (response_format, regex, grammar) needs xgrammar, which is not "
            f"importable here ({exc}); install it with: {INSTALL_HINT}") from None
    return xgrammar


# --- what a request asks for --------------------------------------------------------------

@dataclass(frozen=True)
class GrammarSpec:
    """One output constraint. `source` is the schema as JSON text, the regex, or the EBNF
    grammar (root rule `root`); it is empty for "json_object" (any JSON object)."""

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise RequestError(f"grammar kind {self.kind!r} is not one of {', '.join(KINDS)}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> "GrammarSpec":
        # property order is kept: xgrammar emits properties in the schema's order
        text = schema if isinstance(schema, str) else json.dumps(schema, ensure_ascii=False)
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> "GrammarSpec":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "GrammarSpec":
        return cls("regex", pattern)

    @classmethod
    def ebnf(cls, grammar: str) -> "GrammarSpec":
        return cls("ebnf", grammar)


def grammar_from_request(body: Mapping[str, Any], compiler: Optional["GrammarCompiler"] = None
                         ) -> Optional[GrammarSpec]:
    """The output constraint an OpenAI-style request body asks for, or None.

    Reads `response_format` ({"type": "text"}, {"type": "json_object"} or {"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}}}), `regex` (a string) and
    `grammar` (an EBNF string whose root rule is `root`); at most one of the three may
    constrain the output. With `compiler`, the grammar is compiled (and cached) here, so an
    invalid schema or grammar is reported before any token is generated (a server calls
    `Engine.request_grammar(body)`, which does this and needs xgrammar only when the body
    asks for a constraint).

    Raises:
        RequestError: a field has the wrong shape, two constraints are given, or xgrammar
            rejects the schema / regex / grammar (its message is included). A server maps
            this to HTTP 400.
    """
    specs = []
    fmt = body.get("response_format")
    if fmt is not None:
        specs.append(("response_format", _response_format(fmt)))
    for field_name, kind in (("regex", "regex"), ("grammar", "ebnf")):
        value = body.get(field_name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise RequestError(f"{field_name} must be a non-empty string, got {value!r}")
        specs.append((field_name, GrammarSpec(kind, value)))
    specs = [(name, spec) for name, spec in specs if spec is not None]
    if len(specs) > 1:
        raise RequestError(f"give at most one output constraint; got {specs[0][0]} and "
                           f"{specs[1][0]}")
    spec = specs[0][1] if specs else None
    if spec is not None and compiler is not None:
        compiler.compile(spec)
    return spec


def _response_format(fmt: Any) -> Optional[GrammarSpec]:
    if not isinstance(fmt, Mapping) or not isinstance(fmt.get("type"), str):
        raise RequestError(f"response_format must be an object with a string 'type' "
                           f"('text', 'json_object' or 'json_schema'), got {fmt!r}")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec.json_object()
    if kind != "json_schema":
        raise RequestError(f"response_format.type {kind!r} is not one of 'text', "
                           f"'json_object', 'json_schema'")
    wrapper = fmt.get("json_schema")
    if not isinstance(wrapper, Mapping):
        raise RequestError("response_format.json_schema must be an object like "
                           "{\"name\": \"...\", \"schema\": {...}}, got "
                           f"{wrapper!r}")
    schema = wrapper.get("schema")
    if schema is None:  # OpenAI makes the schema optional: then any JSON object
        return GrammarSpec.json_object()
    if not isinstance(schema, (Mapping, bool)):
        raise RequestError(f"response_format.json_schema.schema must be a JSON schema "
                           f"object, got {schema!r}")
    return GrammarSpec.json_schema(json.dumps(schema, ensure_ascii=False))
