"""Rebuilding a `tokenizers.Tokenizer` from a GGUF file's `tokenizer.*` metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of one: the token strings,
the BPE merges, a type per token (normal / control / user-defined / unused / byte), the
special token ids, and a *name* for the pre-tokenizer (`tokenizer.ggml.pre`). This module
owns turning that description into a byte-level BPE `tokenizers.Tokenizer` that produces
the ids llama.cpp produces (llama.cpp with `parse_special=true`), plus the
`tokenizer_config` and `generation_config` dicts a HF folder would carry.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are supported; the
pre-tokenizer names supported are the keys of `PRE_TOKENIZERS`.

Conventions (llama.cpp's, which the HF tokenizer.json of these models also follows):
- control tokens (type 3) become special added tokens: matched whole in the text, skipped
  by `decode(..., skip_special_tokens=True)`;
- user-defined tokens (type 4, e.g. Qwen's `<tool_call>`) become non-special added tokens,
  always matched whole;
- no Unicode normalization (llama.cpp applies none; Qwen2's own tokenizer.json applies NFC,
  which only differs on text that is not already NFC);
- BOS is prepended by the post-processor only when `tokenizer.ggml.add_bos_token` is true.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import repeat
from typing import Any, Mapping

from ..errors import CheckpointError

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = (
    1, 2, 3, 4, 5, 6)

# GPT-2's split: contractions, letter runs, digit runs, other-symbol runs, whitespace.
_GPT2 = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
# Qwen2's split: case-insensitive contractions, a letter run may take one leading
# non-letter/non-digit, single digits, punctuation runs keep trailing newlines.
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's split: like Qwen2's, but digits in runs of up to three.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGIT = r"\p{N}"

# tokenizer.ggml.pre -> (regexes applied one after the other, each isolating its matches;
# ignore_merges: a pre-token that is itself in the vocabulary is emitted whole).
# The grouping follows which names llama.cpp treats alike.
PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2": ((_GPT2,), False),
    "gpt-2": ((_GPT2,), False),
    "mpt": ((_GPT2,), False),
    "olmo": ((_GPT2,), False),
    "smollm": ((_DIGIT, _GPT2), False),
    "starcoder": ((_DIGIT, _GPT2), False),
    "refact": ((_DIGIT, _GPT2), False),
    "qwen2": ((_QWEN2,), False),
    "stablelm2": ((_QWEN2,), False),
    "deepseek-r1-qwen": ((_QWEN2,), False),
    "llama3": ((_LLAMA3,), True),
    "llama-v3": ((_LLAMA3,), True),
    "llama-bpe": ((_LLAMA3,), True),
    "falcon3": ((_LLAMA3,), True),
    "smaug-bpe": ((_LLAMA3,), True),
}

# Token texts llama.cpp treats as end-of-generation when they are control tokens.
_EOG_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>",
              "<end_of_turn>", "<|end_of_text|>", "<EOT>", "<|return|>")


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """The byte-level BPE spelling of each byte value 0..255 (GPT-2's printable mapping).

    Bytes that are printable and not a space keep their own character (Latin-1); the rest
    are shifted to code points 256, 257, ... in byte order so every byte is one visible char.
    """
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
            + list(range(0xAE, 0xFF + 1)))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _spell(token: str, alphabet: frozenset[str]) -> str:
    """A normal token in byte-level spelling; one written as raw text is re-spelled."""
    if set(token) <= alphabet:
        return token
    table = byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


def _require(meta: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in meta:
        raise CheckpointError(
            f"{source}: GGUF metadata key {key!r} is missing, so no tokenizer can be built; "
            f"re-convert the model with a current llama.cpp convert_hf_to_gguf.py")
    return meta[key]


def build_tokenizer(meta: Mapping[str, Any], source: str = "GGUF file"):
    """A byte-level BPE `tokenizers.Tokenizer` from GGUF metadata (key -> plain value)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') "
            f"vocabularies are supported; use the model's HF folder with its tokenizer.json")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer lattice does not know; "
            f"supported: {', '.join(sorted(PRE_TOKENIZERS))}. Use the model's HF folder "
            f"with its tokenizer.json instead")
    regexes, ignore_merges = PRE_TOKENIZERS[pre]

    tokens = list(_require(meta, "tokenizer.ggml.tokens", source))
    types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise CheckpointError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries but "
            f"tokenizer.ggml.tokens has {len(tokens)}; the file is corrupt, re-convert it")
    # whole-list operations where a loop per entry would run ~150k times (a 150k-token
    # vocabulary built in 0.9 s, 0.5 s of it these loops)
    raw_merges = list(_require(meta, "tokenizer.ggml.merges", source))
    spaces = list(map(str.count, raw_merges, repeat(" ")))
    if any(n != 1 for n in spaces):
        i = next(i for i, n in enumerate(spaces) if n != 1)
        raise CheckpointError(
            f"{source}: BPE merge #{i} {raw_merges[i]!r} is not two tokens separated by one "
            f"space; the file is corrupt, re-convert it")
    joined = "\n".join(raw_merges)
    if joined.count("\n") == max(len(raw_merges) - 1, 0):  # one split for all of them
        parts = joined.replace(" ", "\n").split("\n") if raw_merges else []
        merges = list(zip(parts[0::2], parts[1::2]))
    else:  # a token holding a newline
        merges = [tuple(m.split(" ")) for m in raw_merges]

    special = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL]  # matched as-is
    user = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    alphabet = frozenset(byte_alphabet().values())
    spelled = list(tokens)
    normal = [i for i, k in enumerate(types) if k not in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    if not set("".join(spelled[i] for i in normal)) <= alphabet:  # some written as raw text
        for i in normal:
            spelled[i] = _spell(spelled[i], alphabet)
    vocab = dict(zip(spelled, range(len(spelled))))
    if len(vocab) != len(spelled):  # a repeated string keeps its first id
        vocab = {text: i for i, text in reversed(list(enumerate(spelled)))}

    try:
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges,
                           fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # tokenizers raises a bare Exception for unknown merge parts
        raise CheckpointError(f"{source}: the BPE vocabulary/merges are inconsistent ({exc}); "
                              f"the file is corrupt, re-convert it") from exc
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tok


def _token(tokens: list[str], key: str, meta: Mapping[str, Any], source: str) -> str | None:
    token_id = meta.get(key)
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise CheckpointError(
            f"{source}: {key} is {token_id}, outside the vocabulary of {len(tokens)} tokens; "
            f"the file is corrupt, re-convert it")
    return tokens[token_id]


def tokenizer_configs(meta: Mapping[str, Any], source: str = "GGUF file"
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer_config, generation_config) dicts from GGUF metadata.

    generation_config's eos_token_id is llama.cpp's end-of-generation set: the file's EOS,
    its EOT/EOM if given, and control tokens spelled like a known end marker
    (`<|im_end|>`, `<|endoftext|>`, ...); a single id stays an int.
    """
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    tcfg: dict[str, Any] = {}
    for name, key in (("bos_token", "tokenizer.ggml.bos_token_id"),
                      ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("unk_token", "tokenizer.ggml.unknown_token_id"),
                      ("pad_token", "tokenizer.ggml.padding_token_id")):
        text = _token(tokens, key, meta, source)
        if text is not None:
            tcfg[name] = text
    tcfg["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tcfg["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        tcfg["chat_template"] = template

    gcfg: dict[str, Any] = {}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        gcfg["bos_token_id"] = int(bos)
    eog = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                 "tokenizer.ggml.eom_token_id")]
    eog += [i for i, (t, k) in enumerate(zip(tokens, types))
            if k == TOKEN_CONTROL and t in _EOG_TEXTS]
    eog = list(dict.fromkeys(int(i) for i in eog if i is not None))
    if eog:
        gcfg["eos_token_id"] = eog[0] if len(eog) == 1 else eog
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        gcfg["pad_token_id"] = int(pad)
    return tcfg, gcfg
