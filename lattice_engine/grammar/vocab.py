"""xgrammar's view of a tokenizer: the decoder / normalizer / pre-tokenizer entries, the
vocabulary type (byte-level, byte-fallback or raw) and the encoded vocabulary padded to
the model's logits width."""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

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
    from ..io.gguf_tokenizer import byte_alphabet
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
    from ..io.gguf_tokenizer import byte_alphabet
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
