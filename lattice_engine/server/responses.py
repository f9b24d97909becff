"""The pieces of an OpenAI response built from `RequestOutput`s: per-token log-probabilities
in the completions (legacy) and chat shapes, and each choice's accumulated state.

Log-probabilities are the engine's (`batching.logprobs_of`): the model's log-softmax
before any sampling transform unless the request set `logprobs_mode: "processed"`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..batching import RequestOutput
from ..sampling import SamplingParams


@dataclass
class Choice:
    """One choice of a response: `n` of them per prompt, prompts in request order."""

    index: int
    prompt_index: int
    ids: list[int]
    params: SamplingParams
    echo_text: Optional[str] = None          # completions `echo`: the prompt, sent first
    make_mask: Optional[Callable[[], Any]] = None  # a fresh output constraint per choice
    share_with: Optional[int] = None         # the choice whose prompt blocks this one reuses
    tools: Any = None                        # chat: a `tools.ToolRequest` to parse calls by
    images: Any = None                       # chat: the `multimodal.MultimodalPrompt` of ids


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (byte-level BPE vocabularies spell
    each byte as one printable character)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTES = _byte_decoder()


class TokenText:
    """Token id -> (text, UTF-8 bytes) for logprobs, cached. A token that is part of a
    multi-byte character has no text of its own: its text is the decoder's replacement
    character and `bytes` holds the real bytes (from the byte-level vocabulary)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token)
        if hit is not None:
            return hit
        if self.tokenizer is None:
            text, raw = f"token_id:{token}", None
        else:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            raw = None
            piece = self.tokenizer.token_text(token)
            if "\ufffd" in text and piece and all(ch in _BYTES for ch in piece):
                raw = bytes(_BYTES[ch] for ch in piece)
        value = (text, list(raw if raw is not None else text.encode("utf-8")))
        if len(self.cache) < 1 << 20:
            self.cache[token] = value
        return value

    def text(self, token: int) -> str:
        return self(token)[0]


def completion_logprobs(tokens: TokenText, ids, logprobs, tops, offset: int) -> dict:
    """The legacy shape for these tokens: tokens, token_logprobs, top_logprobs (a dict of
    token text -> logprob per token; None where a token has no logprob: the prompt's
    first), text_offset (from `offset`, in characters of the returned text)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for token, lp, top in zip(ids, logprobs, tops):
        text = tokens.text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else
                                   {tokens.text(t): v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokens: TokenText, ids, logprobs, tops) -> list[dict]:
    """The chat shape: per token {token, logprob, bytes, top_logprobs: [...]}."""
    out = []
    for token, lp, top in zip(ids, logprobs, tops):
        text, raw = tokens(token)
        alternatives = []
        for t, v in top or ():
            t_text, t_raw = tokens(t)
            alternatives.append({"token": t_text, "logprob": v, "bytes": t_raw})
        out.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": alternatives})
    return out


def prompt_entries(out: RequestOutput, prompt_ids: list[int]):
    """(ids, logprobs, tops) of the prompt from out.prompt_logprobs; the first token has
    neither logprob nor alternatives."""
    lps, tops = [], []
    for entry in out.prompt_logprobs:
        if entry is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(entry[0])
            tops.append(entry[1])
    return prompt_ids, lps, tops


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    choice: Choice
    parts: list[str] = field(default_factory=list)
    finish_reason: Optional[str] = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Optional[float]] = field(default_factory=list)
    tops: list = field(default_factory=list)
    offset: int = 0            # characters of text_offset so far (completions logprobs)
    echoed: bool = False       # the echo (prompt text and logprobs) was sent / recorded
    sent: int = 0              # streamed with tools: characters of content sent
    in_call: bool = False      # streamed with tools: a tool call has begun

    def add(self, out: RequestOutput) -> None:
        self.parts.append(out.text)
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        self.token_ids.extend(out.token_ids)
        self.logprobs.extend(out.logprobs)
        self.tops.extend(out.top_logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)
