"""One sequence's output text, token by token: incremental detokenization, stop tokens and
stop strings. Both generation paths use it (`generate.stream_generate` for one sequence,
`batching.BatchRunner` for many), so a request's text and finish reason do not depend on
which path ran it.

- Detokenization decodes a short window per new token (the text of the last few tokens
  minus that of the ones before them), so a long output costs O(n) decode work, and stays
  exact for tokenizers whose decode of a slice differs at its start (a leading space
  dropped, a merge that changes earlier text: then the whole text is decoded again).
- An incomplete UTF-8 sequence at the end emits nothing until its last byte arrives.
- Text that might be the start of a stop string is held back until it is decided; a stop
  string found ends the sequence and what follows it is dropped.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence


class StopMatcher:
    """Holds back text that might be the start of a stop string until it is decided."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def split(self, text: str, final: bool) -> tuple[str, Optional[str], bool]:
        """(text safe to emit, text still held, whether a stop string was found)."""
        hits = [text.find(s) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            return text[: min(hits)], None, True
        if final or self.hold == 0:
            return text, "", False
        cut = max(len(text) - self.hold, 0)
        return text[:cut], text[cut:], False


class TextStream:
    """The text of one sequence's generated tokens, released as it becomes final.

    `tokenizer` may be None (a model run on token ids): then no text is produced and stop
    strings are not allowed (the caller refuses them up front).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_token_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(int(t) for t in stop_token_ids)
        self.matcher = StopMatcher(stop)
        self.generated: list[int] = []
        self.emitted = ""            # text already released
        self.decoded = ""            # text of generated[:read_offset]
        self.prefix_offset = 0       # decoding restarts here (a few tokens back, for context)
        self.read_offset = 0         # tokens already turned into `decoded`
        self.stopped_by_string = False

    def is_stop_token(self, token: int) -> bool:
        return token in self.stop_ids

    def push(self, token: int) -> tuple[str, bool]:
        """Add a generated token (not a stop token). Returns (text to release now, whether a
        stop string ended the sequence)."""
        self.generated.append(token)
        if self.tokenizer is None:
            return "", False
        full = self._detokenize()
        if full is None:  # an incomplete UTF-8 sequence: wait for more bytes
            return "", False
        text, _, stopped = self.matcher.split(full[len(self.emitted):], final=False)
        self.emitted += text
        self.stopped_by_string = stopped
        return text, stopped

    def finish(self) -> tuple[str, bool]:
        """The text still held back (up to a stop string in it), released at the end, and
        whether a stop string was found in it. Nothing after a stop string that already
        ended the sequence."""
        if self.tokenizer is None or self.stopped_by_string:
            return "", self.stopped_by_string
        full = self.decoded if self.read_offset == len(self.generated) else \
            self.tokenizer.decode(self.generated)
        rest, _, stopped = self.matcher.split(full[len(self.emitted):], final=True)
        self.emitted += rest
        return rest, stopped

    def _detokenize(self) -> Optional[str]:
        """All text of `generated`, decoding only a short window per new token (the text of
        generated[prefix_offset:] minus that of generated[prefix_offset:read_offset]); None
        while the newest bytes are an incomplete UTF-8 sequence."""
        decode = self.tokenizer.decode
        window = decode(self.generated[self.prefix_offset:])
        if window.endswith("\ufffd"):
            return None
        before = decode(self.generated[self.prefix_offset:self.read_offset]) \
            if self.read_offset > self.prefix_offset else ""
        if not window.startswith(before):  # a merge changed earlier text: decode it all
            self.decoded = decode(self.generated)
        else:
            self.decoded += window[len(before):]
        n = len(self.generated)
        self.prefix_offset = max(self.read_offset - 4, 0) if n > 8 else 0
        self.read_offset = n
        return self.decoded
