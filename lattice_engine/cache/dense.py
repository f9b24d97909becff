"""`KVCache`: the keys and values of one batch of sequences in contiguous arrays, the
cache `generate` and perplexity use (the paged pool in `paged.py` serves many sequences).

Keys and values are stored as `KV_DTYPES` says (`[model] kv_cache`):
- "f32": as computed (the reference);
- "f16": rounded to float16 (half the bytes);
- "q8_0": each head vector in GGUF Q8_0 blocks of 32 (int8 and an f16 scale per block,
  34 bytes per 32 values: 0.27x of f32), the head dimension a multiple of 32.
Attention reads them back as float32: what it computes over is exactly the stored values
(the same semantics as llama.cpp's f16 / q8_0 KV caches), so the option's cost in accuracy
is measured by perplexity with it (README).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError

KV_DTYPES = ("f32", "f16", "q8_0")
Q8_0_BLOCK, Q8_0_BYTES = 32, 34


def check_kv_dtype(dtype: str, head_dim: int | None = None) -> str:
    """`dtype` if it is one of KV_DTYPES (and fits head_dim), else a ConfigError naming it."""
    if dtype not in KV_DTYPES:
        raise ConfigError(f"model.kv_cache = {dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if dtype == "q8_0" and head_dim is not None and head_dim % Q8_0_BLOCK:
        raise ConfigError(f"model.kv_cache = 'q8_0' stores head vectors in blocks of "
                          f"{Q8_0_BLOCK}, but this model's head_dim is {head_dim}; use 'f16'")
    return dtype


def kv_storage(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed array holding float [..., D] vectors in `dtype`."""
    if dtype == "f32":
        return np.zeros(shape, np.float32)
    if dtype == "f16":
        return np.zeros(shape, np.float16)
    return np.zeros(shape[:-1] + (shape[-1] // Q8_0_BLOCK * Q8_0_BYTES,), np.uint8)


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
                 capacity: int = 256, dtype: str = "f32"):
        self.batch, self.heads, self.head_dim = batch, num_kv_heads, head_dim
        self.dtype = check_kv_dtype(dtype, head_dim)
        self.capacity = capacity
        shape = (batch, capacity, num_kv_heads, head_dim)
        self.keys = [kv_storage(self.dtype, shape) for _ in range(num_layers)]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.offset = 0

    def reserve(self, needed: int) -> None:
        """Make room for `needed` positions (reallocating the arrays if it grows)."""
        if needed > self.capacity:
            self._grow(needed)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                grown = np.zeros((self.batch, new_cap) + old.shape[2:], old.dtype)
                grown[:, : self.capacity] = old
                store[i] = grown
        self.capacity = new_cap

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v [B, T, H, D] at the current offset; return all keys/values so far as
        float32 (views of the storage for f32, the stored values widened otherwise)."""
        t = k.shape[1]
        end = self.offset + t
        if end > self.capacity:
            self._grow(end)
        self.keys[layer][:, self.offset:end] = kv_encode(self.dtype, k)
        self.values[layer][:, self.offset:end] = kv_encode(self.dtype, v)
        return (kv_decode(self.dtype, self.keys[layer][:, :end], self.head_dim),
                kv_decode(self.dtype, self.values[layer][:, :end], self.head_dim))

    def advance(self, t: int) -> None:
        self.offset += t

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.offset:
            raise ValueError(f"cannot truncate a cache of {self.offset} positions to {length}")
        self.offset = length
