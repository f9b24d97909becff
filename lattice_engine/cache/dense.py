"""`KVCache`: the keys and values of one batch of sequences in contiguous arrays, the
cache `generate` and perplexity use (the paged pool in `paged.py` serves many sequences).

Keys and values are stored as `KV_DTYPES` says (`[model] kv_cache`):
- "f32": as computed (the reference);
- "f16": rounded to float16 (half the bytes);
- "q8_0": each head vector in GGUF Q8_0 blocks of 32 (int8 and an f16 scale per block,
  34 bytes per 32 values: 0.27x of f32), the head dimension a multiple of 32.
Attention computes over exactly the stored values (the native kernels read f16 / q8_0
rows directly and widen them a tile at a time; the numpy reference `ops.attention` widens
them first), so the option's cost in accuracy is measured by perplexity with it (README).

q8_0 keys are stored through a per-layer transform (`KVLayout.k_shift` / `k_scale`, made by
`key_transform`): (k - shift) / scale is quantized, and attention reads the decoded values
times scale. Both are exact in real arithmetic: subtracting one vector from every key adds
the same q.shift to every score of a query, which softmax ignores, and the scale cancels.
They matter because Qwen2-style models carry key biases of 100-200 in the slow rotary
channels and a few activation outliers in the first layers: one such value in a block of
32 makes every other value's step ~1 (Qwen2.5-Coder-0.5B, 2,048 WikiText-2 tokens: plain
q8_0 keys +0.32 ppl, values +0.001; with the transform +0.025).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ConfigError
from ..io.hugepages import zeros

KV_DTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK, Q8_0_BYTES = 32, 34
# the C store transforms one head vector in a stack buffer of this many floats
MAX_Q8_0_HEAD_DIM = 1024
# the config's default: f32 for a float32 model (its logits stay the reference's), f16 for
# any other weight format, whose own rounding is far larger than f16's 2^-11 on keys and
# values (Qwen2.5-Coder-0.5B q8_0: -0.0014 perplexity) while a long-context decode step
# reads half the bytes (README, "The KV cache's dtype")
KV_AUTO = "auto"


def default_kv_dtype(quant_method: str) -> str:
    """What `kv_cache = "auto"` stores for a model loaded with `quant_method`."""
    return "f32" if quant_method == "f32" else "f16"


@dataclass(frozen=True)
class KVLayout:
    """How one layer's stored keys / values read back: `dtype` (KV_DTYPES), head_dim, and
    for q8_0 keys the transform they were stored through (k_shift, k_scale [H_kv, D]
    float32, or None): stored = (k - k_shift) / k_scale; read = decoded * k_scale."""

    dtype: str
    head_dim: int
    k_shift: Optional[np.ndarray] = None
    k_scale: Optional[np.ndarray] = None

    def keys(self, stored: np.ndarray) -> np.ndarray:
        """float32 [..., H, D] keys attention computes over (the numpy reference)."""
        k = kv_decode(self.dtype, stored, self.head_dim)
        return k if self.k_scale is None else k * self.k_scale

    def values(self, stored: np.ndarray) -> np.ndarray:
        return kv_decode(self.dtype, stored, self.head_dim)

    def encode_keys(self, k: np.ndarray) -> np.ndarray:
        if self.k_shift is not None:
            k = k - self.k_shift
        if self.k_scale is not None:
            k = k / self.k_scale
        return kv_encode(self.dtype, k)


def key_transform(k_bias: Optional[np.ndarray], channel_size: Optional[np.ndarray],
                  rope, num_kv_heads: int, head_dim: int, positions: int = 4096):
    """(k_shift, k_scale) [H_kv, D] float32 for a layer's q8_0 keys, from its weights.

    k_shift: the key bias as RoPE carries it, averaged over `positions` positions (`rope`
    maps [1, P, H, D] to its rotated form): the slow channels keep their bias, the fast
    ones average to ~0. k_scale: sqrt of the expected size of each channel
    (`channel_size` [H_kv * D], e.g. the norm of its k_proj row times the input norm's
    weight), made equal within each rotary pair (i, i + D/2) so it commutes with RoPE, and
    normalised to mean 1: a SmoothQuant-style balance between channels (exponent 0.5). Any
    values are exact (module doc); these only decide the rounding."""
    H, D = num_kv_heads, head_dim
    shift = None
    if k_bias is not None:
        b = np.broadcast_to(np.asarray(k_bias, np.float32).reshape(1, 1, H, D),
                            (1, positions, H, D)).copy()
        shift = np.ascontiguousarray(rope(b).mean(axis=1)[0], dtype=np.float32)
    scale = None
    if channel_size is not None and D % 2 == 0:
        e = np.asarray(channel_size, np.float64).reshape(H, D)
        half = D // 2
        pair = np.sqrt(e[:, :half] ** 2 + e[:, half:] ** 2)
        s = np.sqrt(np.concatenate([pair, pair], axis=1))
        s = s / np.maximum(s.mean(axis=1, keepdims=True), 1e-30)
        s = np.where(s > 1e-6, s, 1.0)
        scale = np.ascontiguousarray(s, dtype=np.float32)
    return shift, scale


def check_kv_dtype(dtype: str, head_dim: int | None = None) -> str:
    """`dtype` if it is one of KV_DTYPES (and fits head_dim), else a ConfigError naming it."""
    if dtype not in KV_DTYPES:
        raise ConfigError(f"model.kv_cache = {dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if dtype == "q8_0" and head_dim is not None and head_dim % Q8_0_BLOCK:
        raise ConfigError(f"model.kv_cache = 'q8_0' stores head vectors in blocks of "
                          f"{Q8_0_BLOCK}, but this model's head_dim is {head_dim}; use 'f16'")
    if dtype == "q8_0" and head_dim is not None and head_dim > MAX_Q8_0_HEAD_DIM:
        raise ConfigError(f"model.kv_cache = 'q8_0' takes head_dim <= {MAX_Q8_0_HEAD_DIM}, "
                          f"this model's is {head_dim}; use 'f16'")
    return dtype


def kv_storage(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed array holding float [..., D] vectors in `dtype`."""
    if dtype == "f32":
        return zeros(shape, np.float32)
    if dtype == "f16":
        return zeros(shape, np.float16)
    return zeros(shape[:-1] + (shape[-1] // Q8_0_BLOCK * Q8_0_BYTES,), np.uint8)


def kv_encode(dtype: str, x: np.ndarray) -> np.ndarray:
    """float32 [..., D] -> the stored form of `dtype`."""
    if dtype == "f32":
        return x
    if dtype == "f16":
        return x.astype(np.float16)
    from ..quant.core_formats import Q8_0
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    return Q8_0.quantize(flat).reshape(x.shape[:-1] + (-1,))


def kv_decode(dtype: str, stored: np.ndarray, head_dim: int) -> np.ndarray:
    """The stored form of `dtype` -> float32 [..., head_dim] (a view for f32)."""
    if dtype == "f32":
        return stored
    if dtype == "f16":
        return stored.astype(np.float32)
    from ..quant.core_formats import q8_0_to_float
    flat = np.ascontiguousarray(stored).reshape(-1, stored.shape[-1])
    return q8_0_to_float(flat, head_dim).reshape(stored.shape[:-1] + (head_dim,))


class KVCache:
    """Keys and values of every attention layer for a batch of sequences at one offset.

    Storage is [B, capacity, H_kv, D] per layer (in `dtype`, see the module doc) and grows
    by doubling; `offset` is how many positions are filled. `truncate(n)` rolls back
    (speculative decoding, retries).
    """

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int = 256, dtype: str = "f32", key_transforms=None):
        self.batch, self.heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype = check_kv_dtype(dtype, head_dim)
        # per layer (k_shift, k_scale) for q8_0 keys (`key_transform`), else none
        transforms = key_transforms if self.dtype == "q8_0" and key_transforms else \
            [(None, None)] * num_layers
        self.layouts = [KVLayout(self.dtype, head_dim, *t) for t in transforms]
        self.capacity = capacity
        shape = (batch, capacity, num_kv_heads, head_dim)
        self.keys = [kv_storage(self.dtype, shape) for _ in range(num_layers)]
        self.values = [kv_storage(self.dtype, shape) for _ in range(num_layers)]
        self.offset = 0

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions (reallocating the arrays if it grows)."""
        if needed > self.capacity:
            self._grow(needed)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = zeros((self.batch, new_cap) + old.shape[2:], old.dtype)
                grown[:, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    def store(self, layer: int, k: np.ndarray, v: np.ndarray):
        """Write k, v [B, T, H, D] at the current offset; return the stored keys and
        values so far (views of the storage, in its dtype) and the layer's `KVLayout`:
        what `ops.attention(..., kv=layout)` reads."""
        t = k.shape[1]
        end = self.offset + t
        if end > self.capacity:
            self._grow(end)
        layout = self.layouts[layer]
        self.keys[layer][:, self.offset:end] = layout.encode_keys(k)
        self.values[layer][:, self.offset:end] = kv_encode(self.dtype, v)
        return self.keys[layer][:, :end], self.values[layer][:, :end], layout

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`store`, returning all keys/values so far as float32 (views of the storage for
        f32, the stored values widened otherwise)."""
        keys, values, layout = self.store(layer, k, v)
        return layout.keys(keys), layout.values(values)

    def advance(self, t: int) -> None:
        self.offset += t

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot truncate a cache of {self.offset} positions to {length}")
        self.offset = length
