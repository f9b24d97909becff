"""One request's grammar state and the bitmask arithmetic: `GrammarMatcher` fills the
allowed-token bitmask into a numpy int32 buffer, masks a logits row, accepts the sampled
token and rolls back; the batch helpers (`fill_batch_bitmask`, `apply_batch_bitmask`,
`accept_batch`) serve a scheduler that decodes several sequences at once, constrained or
not. Bit j of int32 word w allows token 32*w + j."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import RequestError
from .request import require_xgrammar

if TYPE_CHECKING:  # annotations only: the compiler module imports this one
    from .compiler import GrammarCompiler

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
