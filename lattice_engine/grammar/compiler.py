"""`GrammarCompiler`: xgrammar's view of one model's tokenizer plus a cache of compiled
grammars, the checks that refuse schema keywords xgrammar would accept without enforcing,
and `grammar_compiler`, one compiler per (tokenizer, vocab size)."""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from typing import Any

from ..errors import RequestError
from .matcher import GrammarMatcher
from .request import GrammarSpec, require_xgrammar
from .vocab import detect_vocab_type, encoded_vocab, tokenizer_parts

COMPILED_CACHE_SIZE = 64  # compiled grammars kept per model; schemas repeat across requests


class GrammarCompiler:
    """Compiles grammars for one model's tokenizer and keeps the recent ones.

    `vocab_size` is the model's logits width, which may exceed the tokenizer's vocabulary
    (padded embeddings) or fall short of it (added tokens the model never produces).
    """

    def __init__(self, tokenizer, vocab_size: int, *, threads: int = 2):
        xgr = require_xgrammar()
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_type, add_prefix_space = detect_vocab_type(
            tokenizer_parts(tokenizer.tokenizer), vocab)
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = [i for i in tokenizer.eos_token_ids if 0 <= i < self.vocab_size]
        self.info = xgr.TokenizerInfo(
            encoded_vocab(tokenizer, self.vocab_size, self.vocab_type, vocab),
            xgr.VocabType[self.vocab_type], vocab_size=self.vocab_size,
            # without EOS ids the matcher ends itself when the grammar is complete
            stop_token_ids=self.stop_token_ids or None, add_prefix_space=add_prefix_space)
        # xgrammar's own cache is keyed by the same sources; ours saves the FFI round trip
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=False)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: GrammarSpec):
        """The xgrammar CompiledGrammar for spec (cached).

        Raises:
            RequestError: xgrammar rejects the schema, regex or grammar; the message is
                xgrammar's, with its source-file prefix removed.
        """
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        compiled = self._compile(spec)
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: GrammarSpec):
        c = self._compiler
        try:
            if spec.kind == "json_object":
                # compact separators: unbounded whitespace lets small models loop forever
                return c.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                             strict_mode=False)
            if spec.kind == "json_schema":
                _check_enforceable(spec.source)
                return c.compile_json_schema(spec.source, any_whitespace=False)
            if spec.kind == "regex":
                return c.compile_regex(spec.source)
            return c.compile_grammar(spec.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            what = {"json_object": "JSON object grammar", "json_schema": "JSON schema",
                    "regex": "regex", "ebnf": "EBNF grammar"}[spec.kind]
            raise RequestError(f"invalid {what}: {xgrammar_message(exc)}") from None

    def matcher(self, spec: GrammarSpec) -> "GrammarMatcher":
        """A fresh matcher for one request constrained by spec."""
        return GrammarMatcher(self, self.compile(spec))


# keywords xgrammar accepts but does not enforce (checked against xgrammar 0.2.8): an
# output could then fail validation, so a schema using them is refused with this advice
UNENFORCED_KEYWORDS = {
    "uniqueItems": "drop it, or validate uniqueness after generation",
    "not": "express the schema without 'not'",
    "if": "use anyOf with one branch per case instead of if/then/else",
    "dependentRequired": "list the dependent properties in 'required'",
    "dependentSchemas": "use anyOf with one branch per case",
}
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_VALUES = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties",
                  "unevaluatedProperties", "unevaluatedItems", "additionalItems", "contains",
                  "propertyNames", "not", "if", "then", "else")


def _check_enforceable(source: str) -> None:
    """Refuse schema parts xgrammar would accept but silently not enforce, so an output could
    fail validation: the keywords in UNENFORCED_KEYWORDS, and a string `pattern` together
    with min/maxLength (xgrammar drops the lengths). Text that is not JSON is left for
    xgrammar to report."""
    try:
        schema = json.loads(source)
    except ValueError:
        return

    def check(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                check(item, f"{path}/{i}")
            return
        if not isinstance(node, dict):
            return
        where = path or "/"
        for key, advice in UNENFORCED_KEYWORDS.items():
            if key in node and not (key == "uniqueItems" and node[key] is False):
                raise RequestError(f"invalid JSON schema: at {where}, '{key}' cannot be "
                                   f"enforced during generation; {advice}")
        lengths = [k for k in ("minLength", "maxLength") if isinstance(node.get(k), int)]
        if isinstance(node.get("pattern"), str) and lengths:
            raise RequestError(
                f"invalid JSON schema: at {where}, 'pattern' together with "
                f"{' and '.join(repr(k) for k in lengths)} cannot be enforced (xgrammar "
                f"ignores the lengths); put the length into the pattern instead, e.g. "
                f"'^[0-9]{{1,5}}$'")
        for key in _SCHEMA_MAPS:
            if isinstance(node.get(key), dict):
                for name, sub in node[key].items():
                    check(sub, f"{path}/{key}/{name}")
        for key in _SCHEMA_VALUES:
            if key in node:
                check(node[key], f"{path}/{key}")
    check(schema, "")


_PREFIX = re.compile(r"^\[[0-9:.]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def xgrammar_message(exc: BaseException) -> str:
    """xgrammar's error text without the "[time] file.cc:line: Check failed" prefix."""
    text = str(exc).strip()
    return _PREFIX.sub("", text).strip() or type(exc).__name__


_COMPILERS: "weakref.WeakKeyDictionary[Any, dict[int, GrammarCompiler]]" = \
    weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def grammar_compiler(tokenizer, vocab_size: int) -> GrammarCompiler:
    """The GrammarCompiler of a TextTokenizer for a model of vocab_size logits (built once:
    reading a 150k-token vocabulary takes a fraction of a second)."""
    with _COMPILERS_LOCK:
        per_size = _COMPILERS.setdefault(tokenizer, {})
        if vocab_size not in per_size:
            per_size[vocab_size] = GrammarCompiler(tokenizer, vocab_size)
        return per_size[vocab_size]
