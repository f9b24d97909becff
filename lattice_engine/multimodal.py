"""Prompts with non-text inputs: placeholder tokens whose embeddings an encoder supplies.

An encoder plugin (`register_encoders`) turns one input (an image) into an `EncodedInput`:
n embedding rows that replace n placeholder tokens of the prompt, the 3-D rotary position
offsets (time, height, width) of those rows, and how far the input advances the text's
position counter. `MultimodalPrompt` lays a prompt's token ids and its encoded inputs side
by side and hands each forward call the slice it needs (`ForwardInputs`): multimodal rotary
positions (M-RoPE), the rows to replace and, for Qwen3-VL, the deepstack features added to
the outputs of the first decoder layers.

M-RoPE: every text token has the same position on all three axes, so `mrope_tables` of a
text-only prompt equals `ops.rope_tables` bit for bit; an image's rows take positions
(start + t, start + h, start + w), and the text after it continues from start + extent,
so it runs at position index + `rope_delta`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .errors import RequestError


@dataclass(frozen=True)
class InputLimits:
    """Bounds on the images of one request (`[inputs]` in the config file).

    max_images: images per request; max_bytes: encoded bytes of one image (after base64
    decoding); max_pixels: width * height of one image as decoded, before any resize;
    local_folder: a folder whose files a request may name as `file:` URLs (None: none).
    """

    max_images: int = 4
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    local_folder: Optional[str] = None


@dataclass(frozen=True)
class PreparedInput:
    """An input decoded and preprocessed, not yet encoded: `key` is the hash of its content
    (and of the preprocessing settings); `grid` int64 [3, n] and `extent` are what its
    `EncodedInput` will have (so positions are known before encoding, and an input whose
    tokens the prefix cache holds is never encoded); `payload` whatever the encoder needs
    (pixel patches and their grid)."""

    key: str
    grid: np.ndarray
    extent: int
    payload: Any = None

    @property
    def num_tokens(self) -> int:
        return int(self.grid.shape[1])


@dataclass(frozen=True)
class EncodedInput:
    """An encoder's output for one input.

    embeds: float32 [n, H], the rows that replace the input's n placeholder tokens.
    grid: int64 [3, n], each row's (t, h, w) rotary offsets from the position the input
        starts at.
    extent: how many positions the input takes: the text after it starts at start + extent.
    deepstack: float32 [n, H] arrays; the i-th is added to the input's rows after decoder
        layer i (Qwen3-VL), empty otherwise.
    key: the content hash of the input (prefix-cache identity of its placeholder tokens).
    """

    embeds: np.ndarray
    grid: np.ndarray
    extent: int
    deepstack: tuple = ()
    key: str = ""

    def __post_init__(self) -> None:
        n = self.embeds.shape[0]
        if self.embeds.ndim != 2 or self.grid.shape != (3, n):
            raise ValueError(f"an EncodedInput needs embeds [n, H] and grid [3, n]; got "
                             f"{self.embeds.shape} and {self.grid.shape}")
        for d in self.deepstack:
            if d.shape != self.embeds.shape:
                raise ValueError(f"deepstack features {d.shape} must match embeds "
                                 f"{self.embeds.shape}")

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])


@dataclass(frozen=True)
class ForwardInputs:
    """What one forward call over T new tokens of a sequence takes beside the token ids.

    positions: int64 [3, T] rotary positions (M-RoPE), or None for index positions.
    rows: int64 [k] indices (within the T tokens) whose embeddings are replaced by `embeds`
        float32 [k, H]; `deepstack[i]` [k, H] is added to those rows after layer i.
    """

    positions: Optional[np.ndarray] = None
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    embeds: Optional[np.ndarray] = None
    deepstack: tuple = ()

    @classmethod
    def shifted(cls, start: int, count: int, delta: int) -> "ForwardInputs":
        """Text tokens start..start+count-1 of a sequence whose positions run `delta`
        ahead of their indices (the text after an image)."""
        return cls(positions=np.broadcast_to(np.arange(start, start + count, dtype=np.int64)
                                             + delta, (3, count)))

    @property
    def replaces(self) -> bool:
        return len(self.rows) > 0


class MultimodalPrompt:
    """Token ids with placeholder runs and the input behind each run.

    `starts[i]` is the index of the first placeholder token of `inputs[i]`, a
    `PreparedInput` (not yet encoded: positions are known, embeddings are not) or an
    `EncodedInput`; `encode(i, encoded)` fills in the embeddings of a prepared one.
    """

    def __init__(self, tokens: list[int], inputs: list, starts: list[int]):
        self.tokens, self.inputs, self.starts = tokens, list(inputs), list(starts)
        end = 0
        for start, inp in zip(self.starts, self.inputs):
            if start < end or start + inp.num_tokens > len(self.tokens):
                raise ValueError(f"input at token {start} ({inp.num_tokens} tokens) "
                                 f"overlaps another or runs past the prompt "
                                 f"({len(self.tokens)} tokens)")
            end = start + inp.num_tokens
        self._positions = self._rope_positions()

    def _rope_positions(self) -> np.ndarray:
        out = np.empty((3, len(self.tokens)), np.int64)
        index = position = 0
        for start, inp in zip(self.starts, self.inputs):
            n_text = start - index
            out[:, index:start] = np.arange(position, position + n_text)
            position += n_text
            out[:, start:start + inp.num_tokens] = position + inp.grid
            position += inp.extent
            index = start + inp.num_tokens
        out[:, index:] = np.arange(position, position + len(self.tokens) - index)
        return out

    @property
    def positions(self) -> np.ndarray:
        """int64 [3, T]: the rotary position of every prompt token on each axis."""
        return self._positions

    @property
    def rope_delta(self) -> int:
        """Position minus index of every token after the prompt."""
        if not self.tokens:
            return 0
        return int(self._positions[:, -1].max()) + 1 - len(self.tokens)

    def encode(self, index: int, encoded: EncodedInput) -> None:
        have = self.inputs[index]
        if encoded.num_tokens != have.num_tokens or encoded.extent != have.extent:
            raise ValueError(f"input {index} was prepared for {have.num_tokens} tokens, "
                             f"encoded to {encoded.num_tokens}")
        self.inputs[index] = encoded

    def unencoded(self, start: int = 0, end: Optional[int] = None) -> list[int]:
        """Indices of the inputs overlapping tokens start..end-1 that have no embeddings."""
        end = len(self.tokens) if end is None else end
        return [i for i, (s, inp) in enumerate(zip(self.starts, self.inputs))
                if not isinstance(inp, EncodedInput) and s < end and s + inp.num_tokens > start]

    def last_input_end(self) -> int:
        """The index after the last placeholder token (0 without inputs)."""
        return max((s + inp.num_tokens for s, inp in zip(self.starts, self.inputs)), default=0)

    def key_ids(self) -> list[int]:
        """The prompt as the prefix cache hashes it: each placeholder token replaced by a
        negative id drawn from its input's content hash (and its place in the input), so
        KV blocks of two different images never match, and the same image does."""
        out = list(self.tokens)
        for start, inp in zip(self.starts, self.inputs):
            seed = int.from_bytes(hashlib.blake2b(inp.key.encode(), digest_size=7).digest(),
                                  "little")
            out[start:start + inp.num_tokens] = [-1 - ((seed + i) % (1 << 62))
                                                 for i in range(inp.num_tokens)]
        return out

    def inputs_for(self, start: int, end: int) -> ForwardInputs:
        """The inputs of a forward over tokens start..end-1 of the sequence (the prompt,
        then generated tokens at index + rope_delta)."""
        prompt_end = len(self.tokens)
        if start >= prompt_end:
            return ForwardInputs.shifted(start, end - start, self.rope_delta)
        win = self.window(start, min(end, prompt_end))
        if end <= prompt_end:
            return win
        tail = np.arange(prompt_end, end, dtype=np.int64) + self.rope_delta
        positions = np.concatenate([win.positions, np.broadcast_to(tail, (3, len(tail)))], 1)
        return ForwardInputs(positions, win.rows, win.embeds, win.deepstack)

    def window(self, start: int, end: int) -> ForwardInputs:
        """The inputs of a forward over prompt tokens start..end-1 (their inputs must be
        encoded)."""
        missing = self.unencoded(start, end)
        if missing:
            raise ValueError(f"inputs {missing} overlap tokens {start}..{end - 1} but are "
                             f"not encoded yet")
        rows, embeds, deepstack = [], [], []
        for s, enc in zip(self.starts, self.inputs):
            lo, hi = max(s, start), min(s + enc.num_tokens, end)
            if lo >= hi:
                continue
            rows.append(np.arange(lo - start, hi - start, dtype=np.int64))
            embeds.append(enc.embeds[lo - s:hi - s])
            deepstack.append([d[lo - s:hi - s] for d in enc.deepstack])
        if not rows:
            return ForwardInputs(positions=self._positions[:, start:end])
        depth = {len(d) for d in deepstack}
        if len(depth) != 1:
            raise ValueError("the encoded inputs of one prompt disagree on deepstack depth")
        return ForwardInputs(
            positions=self._positions[:, start:end], rows=np.concatenate(rows),
            embeds=np.concatenate(embeds).astype(np.float32, copy=False),
            deepstack=tuple(np.concatenate([d[i] for d in deepstack])
                            for i in range(depth.pop())))


def expand_placeholders(tokens: Sequence[int], placeholder: int,
                        inputs: Sequence) -> MultimodalPrompt:
    """Replace the i-th single `placeholder` token of `tokens` (as a chat template writes
    one per image) by inputs[i].num_tokens copies of it. The number of placeholders must
    equal the number of inputs."""
    found = [i for i, t in enumerate(tokens) if t == placeholder]
    if len(found) != len(inputs):
        raise RequestError(f"the prompt has {len(found)} image placeholder token(s) "
                           f"(id {placeholder}) but {len(inputs)} image(s) were given; "
                           f"put one image part per image in the messages")
    out: list[int] = []
    starts: list[int] = []
    prev = 0
    for at, enc in zip(found, inputs):
        out.extend(tokens[prev:at])
        starts.append(len(out))
        out.extend([placeholder] * enc.num_tokens)
        prev = at + 1
    out.extend(tokens[prev:])
    return MultimodalPrompt([int(t) for t in out], list(inputs), starts)


def mrope_axes(half: int, section: Sequence[int], interleaved: bool) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each of `half` rotary frequencies.

    Interleaved (Qwen3-VL, Qwen3.5): frequencies cycle t, h, w, with h taking indices
    1, 4, ... below 3 * section[1] and w taking 2, 5, ... below 3 * section[2]; the rest
    are t. Contiguous (Qwen2-VL): the first section[0] are t, the next section[1] h, the
    last section[2] w.
    """
    if len(section) != 3 or sum(section) != half:
        raise ValueError(f"mrope_section {list(section)} must have three entries summing to "
                         f"{half} (half the rotary dimension)")
    axes = np.zeros(half, np.int64)
    j = np.arange(half)
    if interleaved:
        axes[(j % 3 == 1) & (j < 3 * section[1])] = 1
        axes[(j % 3 == 2) & (j < 3 * section[2])] = 2
    else:
        axes[section[0]:section[0] + section[1]] = 1
        axes[section[0] + section[1]:] = 2
    return axes


def mrope_tables(positions: np.ndarray, inv_freq: np.ndarray,
                 axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [T, half] for 3-D positions [3, T]: frequency j turns with the position on
    axis axes[j]. Each angle is the float32 product `ops.rope_tables` computes, so equal
    axes give the same bits as 1-D rope."""
    positions = np.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must be [3, T]; got {positions.shape}")
    per_freq = positions.astype(np.float32)[axes].T            # [T, half]
    angles = per_freq * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


def check_forward_inputs(inputs: ForwardInputs, token_shape: tuple, hidden: int) -> None:
    """Refuse inputs that do not fit a forward over tokens of `token_shape` [B, T]."""
    b, t = token_shape
    if inputs.positions is not None and np.shape(inputs.positions) != (3, t):
        raise ValueError(f"positions {np.shape(inputs.positions)} must be [3, {t}]")
    if inputs.replaces:
        if b != 1:
            raise ValueError(f"embedding rows can replace tokens of one sequence, not {b}")
        k = len(inputs.rows)
        if inputs.embeds is None or inputs.embeds.shape != (k, hidden):
            raise ValueError(f"replacing {k} rows needs embeds [{k}, {hidden}]; got "
                             f"{None if inputs.embeds is None else inputs.embeds.shape}")
        if int(np.min(inputs.rows)) < 0 or int(np.max(inputs.rows)) >= t:
            raise ValueError(f"replaced rows must lie in 0..{t - 1}")


class EncodeJob:
    """One input being encoded in units (an encoder's `encode_steps`, one vision block per
    unit; a whole `encode` for an encoder without it), so a batch step that has streams
    decoding pays for one unit only, like a prefill chunk."""

    def __init__(self, encoder, prepared: PreparedInput):
        self.prepared = prepared
        steps = getattr(encoder, "encode_steps", None)
        self._steps = steps(prepared) if callable(steps) else None
        self._encoder = encoder
        self.result: Optional[EncodedInput] = None

    def advance(self) -> Optional[EncodedInput]:
        """Run one unit; the EncodedInput once the last unit ran, else None."""
        if self.result is not None:
            return self.result
        if self._steps is None:
            self.result = self._encoder.encode(self.prepared)
            return self.result
        try:
            next(self._steps)
        except StopIteration as done:
            self.result = done.value
        return self.result

    def run(self) -> EncodedInput:
        while self.advance() is None:
            pass
        return self.result


class EncodedCache:
    """The last `capacity` encoded inputs by content key, so the same image in a later
    request (a second turn) is not encoded again. `encodes` counts inputs encoded,
    `skipped` inputs served from here or not needed (their tokens' KV was cached)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._items: "OrderedDict[str, EncodedInput]" = OrderedDict()
        self.encodes = 0
        self.skipped = 0

    def get(self, key: str) -> Optional[EncodedInput]:
        enc = self._items.get(key)
        if enc is not None:
            self._items.move_to_end(key)
        return enc

    def put(self, enc: EncodedInput) -> None:
        if self.capacity <= 0 or not enc.key:
            return
        self._items[enc.key] = enc
        self._items.move_to_end(enc.key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def encode(self, encoder, prepared: PreparedInput) -> EncodedInput:
        """The cached encoding of `prepared`, or a fresh one (cached)."""
        enc = self.get(prepared.key)
        if enc is not None:
            self.skipped += 1
            return enc
        enc = EncodeJob(encoder, prepared).run()
        self.encodes += 1
        self.put(enc)
        return enc
