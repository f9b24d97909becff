"""Numpy reference ops: the numerical definition every native kernel is tested against.

Shapes: activations are float32 [B, T, D] (batch, tokens, features); attention heads are
[B, T, H, Dh]. `lattice_engine.kernels` provides the same functions backed by C; a model
picks one set through `get_ops`.
"""

from __future__ import annotations

import numpy as np

from .quant.formats import PackedMatrix


def matmul(x: np.ndarray, w: PackedMatrix) -> np.ndarray:
    """x [..., K] @ W.T -> [..., N] for W stored as [N, K] in any weight format."""
    lead = x.shape[:-1]
    out = x.reshape(-1, x.shape[-1]) @ w.to_float().T
    return out.reshape(*lead, w.rows)


def embed(w: PackedMatrix, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (any int shape) of W [vocab, D] as float32 [..., D]."""
    flat = np.asarray(ids, dtype=np.int64).reshape(-1)
    rows = w.format.to_float(w.data[flat], w.cols)
    return rows.reshape(*np.shape(ids), w.cols)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, offset: float = 0.0) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (offset + weight); offset=1 for norms stored as (w - 1)."""
    x = x.astype(np.float32, copy=False)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * inv) * (offset + weight)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape [len(positions), len(inv_freq)] for the given absolute positions.

    Computed in float32 like transformers does, so angles match the reference bit for bit
    as far as numpy allows.
    """
    angles = np.asarray(positions, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]
    return np.cos(angles), np.sin(angles)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False) -> np.ndarray:
    """Rotate the first 2*cos.shape[-1] features of each head of x [B, T, H, Dh].

    Stride-half pairing (i, half + i) is HF's rotate_half, used by llama/qwen checkpoints
    in HF layout; interleaved pairing (2i, 2i+1) is GPT-J's and GGUF's native llama layout.
    cos/sin are [T, half] and broadcast over batch and heads.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.empty_like(rot)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = b * c + a * s
    else:
        a, b = rot[..., :half], rot[..., half:]
        out = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return silu(gate) * up


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              scale: float) -> np.ndarray:
    """Causal grouped-query attention.

    q: [B, T, Hq, D] for absolute positions start_pos .. start_pos+T-1;
    k, v: [B, S, Hkv, D] for positions 0 .. S-1 with S = start_pos + T; Hq % Hkv == 0.
    Returns [B, T, Hq, D].
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    # Fold the query heads of a KV group and the time axis into one matrix dimension, so
    # each (batch, kv head) is a single plain 2-D matmul for BLAS.
    qh = q.reshape(b, t, hkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, group * t, d)
    kh = np.ascontiguousarray(k.transpose(0, 2, 3, 1))              # B Hkv D S
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))              # B Hkv S D
    scores = np.matmul(qh, kh) * np.float32(scale)                   # B Hkv G*T S
    q_pos = start_pos + np.tile(np.arange(t), group)[:, None]
    scores[..., np.arange(s)[None, :] > q_pos] = -np.inf
    out = np.matmul(softmax(scores, axis=-1), vh)                    # B Hkv G*T D
    return out.reshape(b, hkv, group, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform along the last axis (a power of two):
    x @ H with H the Sylvester Hadamard matrix (H[i, j] = (-1)^popcount(i & j))."""
    shape, n = x.shape, x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht: length {n} is not a power of two")
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)
        y = np.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], axis=2)
        h *= 2
    return y.reshape(shape)


def block_rotate(x: np.ndarray, mix: np.ndarray, block: int) -> np.ndarray:
    """x @ (mix kron H_block / sqrt(block)) along the last axis, of length m * block with
    mix [m, m]: the features are m groups of `block`; groups are mixed by `mix` (an
    orthogonal matrix), then each group is Hadamard-transformed. Orthogonal when mix is;
    the online rotation before a down projection (QuaRot) is this op."""
    m = mix.shape[0]
    if mix.shape != (m, m) or x.shape[-1] != m * block:
        raise ValueError(f"block_rotate: x has {x.shape[-1]} features, mix is {mix.shape}, "
                         f"block {block}: need features == rows(mix) * block")
    groups = x.reshape(*x.shape[:-1], m, block).astype(np.float32)
    if m > 1:  # x'[j, :] = sum_i mix[i, j] x[i, :]
        groups = np.einsum("...ir,ij->...jr", groups, mix.astype(np.float32))
    out = fwht(groups) * np.float32(1.0 / np.sqrt(block))
    return out.reshape(x.shape).astype(np.float32)
