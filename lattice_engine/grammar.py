"""Structured output: constrain each next token to a JSON schema, a regex or an EBNF grammar.

This module is the bridge to xgrammar (an optional extra: `pip install
"lattice-engine[grammar]"`). It owns
- `GrammarSpec`: what a request asks for, and `grammar_from_request`, the parser of the
  OpenAI-style request fields (`response_format`, `regex`, `grammar`) that the CLI, the
  Python API and the HTTP server share;
- `GrammarCompiler`: xgrammar's view of one model's tokenizer (vocabulary type, added and
  special tokens, the model's vocab size) plus a cache of compiled grammars;
- `GrammarMatcher`: the per-request state; it fills the allowed-token bitmask into a numpy
  int32 buffer, masks a logits row, accepts the sampled token, rolls back;
- batch helpers (`fill_batch_bitmask`, `apply_batch_bitmask`, `accept_batch`) for a
  scheduler that decodes several sequences at once, constrained or not.

No torch tensor is made at run time: xgrammar writes the bitmask into numpy arrays through
DLPack, and the mask is applied with numpy (bit j of int32 word w allows token 32*w + j).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError, RequestError

INSTALL_HINT = 'pip install "lattice-engine[grammar]"'
KINDS = ("json_object", "json_schema", "regex", "ebnf")
COMPILED_CACHE_SIZE = 64  # compiled grammars kept per model; schemas repeat across requests


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


# --- xgrammar's view of a tokenizer ---------------------------------------------------------

def _decoder_types(node: Any) -> list[str]:
    """Every decoder type in a tokenizer.json `decoder` entry, Sequences flattened."""
    if not isinstance(node, Mapping):
        return []
    if node.get("type") == "Sequence":
        return [t for child in node.get("decoders", []) for t in _decoder_types(child)]
    if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == "\u2581":
        return ["Metaspace"]  # the sentencepiece-style "▁" -> " " step
    return [node.get("type", "")]


def tokenizer_parts(backend) -> dict[str, Any]:
    """The decoder / normalizer / pre_tokenizer entries of a `tokenizers.Tokenizer`, as the
    dicts tokenizer.json holds (read one by one: the whole JSON of a 150k vocabulary with
    its merges takes a second to parse)."""
    parts = {}
    for name in ("decoder", "normalizer", "pre_tokenizer"):
        component = getattr(backend, name, None)
        parts[name] = json.loads(component.__getstate__()) if component is not None else None
    return parts


def detect_vocab_type(spec: Mapping[str, Any], vocab: Mapping[str, int]) -> tuple[str, bool]:
    """(xgrammar vocab type name, add_prefix_space) from a tokenizer.json dict (at least its
    decoder, normalizer and pre_tokenizer entries) and the vocabulary.

    The decoder says how token strings become bytes: ByteLevel -> BYTE_LEVEL (GPT-2 byte
    alphabet), ByteFallback or Metaspace -> BYTE_FALLBACK ("<0xNN>" pieces and "▁" for a
    space), neither -> RAW. Without a decoder the vocabulary itself decides.
    """
    types = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in types:
        vocab_type = "BYTE_LEVEL"
    elif "ByteFallback" in types or "Metaspace" in types:
        vocab_type = "BYTE_FALLBACK"
    elif spec.get("decoder") is None and sum(f"<0x{b:02X}>" in vocab for b in range(256)) >= 128:
        vocab_type = "BYTE_FALLBACK"
    elif spec.get("decoder") is None and _looks_byte_level(vocab):
        vocab_type = "BYTE_LEVEL"
    else:
        vocab_type = "RAW"
    return vocab_type, _adds_prefix_space(spec)


def _looks_byte_level(vocab: Mapping[str, int]) -> bool:
    from .io.gguf_tokenizer import byte_alphabet
    alphabet = set(byte_alphabet().values())
    return sum(ch in vocab for ch in alphabet) >= 200


def _adds_prefix_space(spec: Mapping[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (Prepend normalizer or Metaspace)."""
    def nodes(node, key):
        if not isinstance(node, Mapping):
            return []
        return [n for child in node.get(key, []) for n in nodes(child, key)] + [node]
    for node in nodes(spec.get("normalizer"), "normalizers"):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    for node in nodes(spec.get("pre_tokenizer"), "pretokenizers"):
        if node.get("type") == "Metaspace" and (node.get("prepend_scheme") in ("always", "first")
                                                 or node.get("add_prefix_space") is True):
            return True
    return False


def encoded_vocab(tokenizer, vocab_size: int, vocab_type: str,
                  vocab: Optional[Mapping[str, int]] = None) -> list[str]:
    """Token strings by id, as xgrammar reads them, for a model with vocab_size logits.

    - Special added tokens (control tokens such as <|im_start|>) become "", which xgrammar
      treats as never allowed: decoding skips them, so they cannot spell grammar text.
      The stop tokens among them are passed to xgrammar separately.
    - Other added tokens are matched by their literal content; in a byte-level vocabulary
      that content is re-spelled in the byte alphabet so xgrammar decodes it back exactly.
    - Ids the tokenizer lacks (a model vocab padded past the tokenizer's) stay "" as well;
      ids past the model's vocab (tokens the model cannot produce) are dropped.
    """
    from .io.gguf_tokenizer import byte_alphabet
    backend = tokenizer.tokenizer
    added = backend.get_added_tokens_decoder()
    vocab = vocab if vocab is not None else backend.get_vocab(with_added_tokens=True)
    table = byte_alphabet()
    tokens = [""] * vocab_size
    for text, i in vocab.items():
        if i >= vocab_size:
            continue
        entry = added.get(i)
        if entry is None:
            tokens[i] = text
        elif not entry.special:
            content = entry.content
            tokens[i] = ("".join(table[b] for b in content.encode("utf-8"))
                         if vocab_type == "BYTE_LEVEL" else content)
    return tokens


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


# --- one request's state ------------------------------------------------------------------

def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """An all-allowed int32 bitmask [batch, ceil(vocab_size / 32)]."""
    return np.full((batch, bitmask_words(vocab_size)), -1, dtype=np.int32)


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Set logits[..., t] = -inf where bit t of bitmask is 0, in place.

    logits is [vocab] or [rows, vocab]; bitmask is [words] or [rows, words] with
    words = ceil(vocab / 32). Bits past the vocab are ignored.
    """
    vocab = logits.shape[-1]
    # little-endian bytes of each int32 word, bits least significant first = token order
    bits = np.unpackbits(bitmask.astype("<i4", copy=False).view(np.uint8), axis=-1,
                         count=vocab, bitorder="little")
    np.copyto(logits, np.float32(-np.inf), where=bits == 0)


class GrammarMatcher:
    """The grammar state of one sequence: mask the next token, accept it, roll back.

    After the grammar is complete only the stop tokens (the tokenizer's EOS ids) are
    allowed; accepting one terminates the matcher. A tokenizer without EOS ids makes the
    matcher terminate as soon as the grammar is complete.
    """

    def __init__(self, compiler: GrammarCompiler, compiled):
        xgr = require_xgrammar()
        self.vocab_size = compiler.vocab_size
        self.stop_token_ids = tuple(compiler.stop_token_ids)
        self._matcher = xgr.GrammarMatcher(
            compiled, terminate_without_stop_token=not compiler.stop_token_ids)
        self.bitmask = allocate_bitmask(1, self.vocab_size)
        self.steps = 0  # tokens accepted, so rollback can be checked

    def fill_bitmask(self, bitmask: Optional[np.ndarray] = None, row: int = 0) -> bool:
        """Write the allowed next tokens into bitmask[row] (own buffer by default).

        Returns False when every token is allowed (the mask need not be applied).
        """
        target = self.bitmask if bitmask is None else bitmask
        return bool(self._matcher.fill_next_token_bitmask(target, row))

    def apply(self, logits: np.ndarray) -> None:
        """Mask one logits row [vocab] in place so only grammar tokens remain.

        Once the matcher has terminated (a stop token was accepted), only stop tokens stay
        allowed, so a caller that keeps decoding (e.g. ignoring EOS) emits stop tokens.
        """
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(f"logits have {logits.shape[-1]} entries but the grammar was "
                             f"compiled for a vocab of {self.vocab_size}")
        if self.is_terminated():
            self.mask_to_stop_tokens(logits)
        elif self.fill_bitmask():
            apply_bitmask(logits, self.bitmask[0])

    def mask_to_stop_tokens(self, logits: np.ndarray) -> None:
        """Leave only the stop tokens in a logits row (the grammar is complete)."""
        if not self.stop_token_ids:
            raise RequestError("the grammar is complete and this tokenizer has no end token: "
                               "the sequence must end here (is_terminated() is true)")
        keep = logits[list(self.stop_token_ids)].copy()
        logits.fill(-np.inf)
        logits[list(self.stop_token_ids)] = keep

    def accept(self, token: int) -> None:
        """Advance past token; a token the mask forbade is a RequestError. After the
        matcher terminated, further stop tokens are accepted as no-ops."""
        if self.is_terminated() and int(token) in self.stop_token_ids:
            return
        if not self._matcher.accept_token(int(token)):
            raise RequestError(
                f"token {token} does not continue the grammar; either a sampler ignored the "
                f"mask or the grammar needs text this model's vocabulary cannot spell")
        self.steps += 1

    def rollback(self, tokens: int = 1) -> None:
        """Undo the last `tokens` accepted tokens (for speculative decoding)."""
        if not 0 <= tokens <= self.steps:
            raise ValueError(f"cannot roll back {tokens} tokens: only {self.steps} accepted")
        if tokens:
            self._matcher.rollback(tokens)
            self.steps -= tokens

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """Whether the text so far is a complete match (a stop token may follow)."""
        return bool(self._matcher.is_completed())


# --- a batch of sequences, each with its own matcher or none -------------------------------

_BATCH = threading.local()


def _batch_matcher():
    if not hasattr(_BATCH, "matcher"):
        _BATCH.matcher = require_xgrammar().BatchGrammarMatcher(max_threads="auto")
    return _BATCH.matcher


def fill_batch_bitmask(matchers: Sequence[Optional[GrammarMatcher]], bitmask: np.ndarray
                       ) -> list[int]:
    """Fill bitmask[i] for every constrained row i in one xgrammar call; return those rows.

    matchers[i] is row i's matcher, or None for an unconstrained (or finished) sequence.
    Rows of terminated matchers are skipped too.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if rows:
        _batch_matcher().batch_fill_next_token_bitmask(
            [matchers[i]._matcher for i in rows], bitmask, rows)
    return rows


def apply_batch_bitmask(matchers: Sequence[Optional[GrammarMatcher]], logits: np.ndarray,
                        bitmask: Optional[np.ndarray] = None) -> list[int]:
    """Mask logits [batch, vocab] in place: each constrained row by its own grammar (a
    terminated matcher's row to its stop tokens), unconstrained rows (None) untouched.
    Returns the rows that were masked.

    bitmask is an optional reusable int32 buffer [>= batch, ceil(vocab / 32)].
    """
    if logits.ndim != 2 or logits.shape[0] != len(matchers):
        raise ValueError(f"logits must be [batch={len(matchers)}, vocab], got {logits.shape}")
    if bitmask is None:
        bitmask = allocate_bitmask(len(matchers), logits.shape[1])
    rows = fill_batch_bitmask(matchers, bitmask)
    if len(rows) == logits.shape[0]:
        apply_bitmask(logits, bitmask[: len(rows)])
    else:
        for i in rows:  # fancy indexing would copy; a row view masks in place
            apply_bitmask(logits[i], bitmask[i])
    ended = [i for i, m in enumerate(matchers) if m is not None and m.is_terminated()]
    for i in ended:
        matchers[i].mask_to_stop_tokens(logits[i])
    return sorted(rows + ended)


def accept_batch(matchers: Sequence[Optional[GrammarMatcher]], tokens: Sequence[int]) -> None:
    """Each constrained row accepts its sampled token (None rows are skipped)."""
    if len(tokens) != len(matchers):
        raise ValueError(f"{len(tokens)} tokens for {len(matchers)} sequences")
    for matcher, token in zip(matchers, tokens):
        if matcher is not None:
            matcher.accept(token)
