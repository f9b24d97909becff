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
    g = w.format.row_group
    if g > 1:  # rows interleaved in groups: convert each id's group, take its row
        rows = np.stack([w.format.to_float(w.data[i - i % g:i - i % g + g], w.cols)[i % g]
                         for i in flat]) if flat.size else np.empty((0, w.cols), np.float32)
    else:
        rows = w.format.to_float(w.data[flat], w.cols)
    return rows.reshape(*np.shape(ids), w.cols)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, offset: float = 0.0) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * (offset + weight); offset=1 for norms stored as (w - 1)."""
    x = x.astype(np.float32, copy=False)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * inv) * (offset + weight)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last axis (BERT's
    LayerNorm; the variance is the biased one, as torch computes it)."""
    x = x.astype(np.float32, copy=False)
    centered = x - np.mean(x, axis=-1, keepdims=True)
    inv = 1.0 / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + np.float32(eps))
    return (centered * inv) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64: Abramowitz-Stegun 7.1.26 (absolute error <= 1.5e-7) for |x| >= 0.5,
    its Taylor series (exact to double) below. GELU multiplies it by x / 2, so the error
    stays within about one float32 ulp of the result."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                         + t * 1.061405429))))
    y = 1.0 - poly * np.exp(-z * z)
    small = z < 0.5
    if np.any(small):
        zs = z[small]
        z2 = zs * zs
        term, acc = zs, zs.copy()
        for n in range(1, 12):
            term = term * (-z2) / n
            acc = acc + term / (2 * n + 1)
        y[small] = acc * (2.0 / np.sqrt(np.pi))
    return np.sign(x) * y


def gelu(x: np.ndarray, tanh: bool = False) -> np.ndarray:
    """GELU: x * Phi(x) with the exact erf ("gelu"), or the tanh approximation
    ("gelu_new" / "gelu_pytorch_tanh") when `tanh`."""
    x = x.astype(np.float32, copy=False)
    if tanh:
        inner = np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))
    return (0.5 * x * (1.0 + _erf(x.astype(np.float64) / np.sqrt(2.0)))).astype(np.float32)


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
              scale: float, kv=None) -> np.ndarray:
    """Causal grouped-query attention.

    q: [B, T, Hq, D] for absolute positions start_pos .. start_pos+T-1;
    k, v: [B, S, Hkv, D] for positions 0 .. S-1 with S = start_pos + T; Hq % Hkv == 0.
    kv (a `cache.dense.KVLayout`, None: float32): k and v are a cache's stored rows in
    that dtype, widened here first (the reference of the native kernels, which read them
    as stored). Returns [B, T, Hq, D].
    """
    if kv is not None and (kv.dtype != "f32" or kv.k_scale is not None):
        k, v = kv.keys(k), kv.values(v)
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


def encoder_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, lengths: np.ndarray,
                      scale: float) -> np.ndarray:
    """Bidirectional attention of a right-padded batch (BERT): q, k, v [B, T, H, D];
    keys s < lengths[b] are real, padding is attended by nobody. Returns [B, T, H, D]."""
    b, t, h, d = q.shape
    qh = np.ascontiguousarray(q.transpose(0, 2, 1, 3))                 # B H T D
    kh = np.ascontiguousarray(k.transpose(0, 2, 3, 1))                 # B H D T
    vh = np.ascontiguousarray(v.transpose(0, 2, 1, 3))                 # B H T D
    scores = np.matmul(qh, kh) * np.float32(scale)
    pad = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]        # B T (keys)
    scores[np.broadcast_to(pad[:, None, None, :], scores.shape)] = -np.inf
    out = np.matmul(softmax(scores, axis=-1), vh)                      # B H T D
    return np.ascontiguousarray(out.transpose(0, 2, 1, 3))


def encoder_attention_packed(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                             offsets: np.ndarray, scale: float) -> np.ndarray:
    """Bidirectional attention over packed sequences: q, k, v [N, H, D], sequence b the
    rows offsets[b] .. offsets[b + 1], each row attending to its own sequence's rows.
    Returns [N, H, D]."""
    out = np.empty(q.shape, np.float32)
    for s0, s1 in zip(offsets[:-1], offsets[1:]):
        n = int(s1 - s0)
        out[s0:s1] = encoder_attention(q[None, s0:s1], k[None, s0:s1], v[None, s0:s1],
                                       np.array([n]), scale)[0]
    return out


# ---- Gated DeltaNet (Qwen3.5 linear attention) ----------------------------------------

def causal_conv1d(x: np.ndarray, weight_t: np.ndarray, state: np.ndarray,
                  silu_out: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Depthwise causal convolution over time with a rolling state, then SiLU.

    x [B, T, C] (may be a view); weight_t [K, C] (the checkpoint's [C, 1, K] transposed, tap
    K-1 multiplies the newest input); state [B, K-1, C], the last K-1 inputs before x, is
    updated in place to the last K-1 inputs including x. Returns float32 [B, T, C] (`out`
    if given; it may be x itself).
    """
    k = weight_t.shape[0]
    b, t, c = x.shape
    ext = np.concatenate([state, x.astype(np.float32, copy=False)], axis=1)  # B, K-1+T, C
    acc = np.zeros((b, t, c), np.float32)
    for j in range(k):
        acc += ext[:, j:j + t] * weight_t[j]
    state[...] = ext[:, t:]
    acc = silu(acc) if silu_out else acc
    if out is not None:
        out[...] = acc
        return out
    return acc


def l2_normalize(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(sum(x^2) + eps) over the last axis (FLA's and transformers' l2norm)."""
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + np.float32(eps))


def _delta_rule_inputs(q, k, v, nv):
    """L2-normalised, 1/sqrt(dk)-scaled queries and keys repeated up to the value heads."""
    dk = q.shape[-1]
    q = l2_normalize(q.astype(np.float32)) * np.float32(dk ** -0.5)
    k = l2_normalize(k.astype(np.float32))
    rep = nv // q.shape[2]
    if rep > 1:  # value head h reads query/key head h // rep
        q, k = np.repeat(q, rep, axis=2), np.repeat(k, rep, axis=2)
    return q, k, v.astype(np.float32)


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray,
                     beta: np.ndarray, state: np.ndarray, chunk: int = 0,
                     ahead: bool = False) -> np.ndarray:
    """The gated delta rule over a sequence, updating `state` in place (ahead: leaving it
    as it is, the outputs only; token by token, chunk = 0).

    q, k [B, T, Hk, Dk] (raw: L2-normalised and q scaled by 1/sqrt(Dk) here); v [B, T, Hv, Dv]
    with Hv a multiple of Hk; g (log decay, <= 0) and beta [B, T, Hv]; state float32
    [B, Hv, Dk, Dv]. Per token and value head:
        S = exp(g) S;  S += k (beta (v - S^T k))^T;  o = S^T q.
    chunk = 0 runs that recurrence token by token; chunk = C > 0 the equivalent chunked
    (UT-transform) form, C tokens at a time. Returns float32 [B, T, Hv, Dv].
    """
    if ahead and chunk:
        raise ValueError(f"gated_delta_rule: ahead needs chunk=0, got {chunk}")
    if ahead:
        state = state.copy()
    if chunk:
        return _gated_delta_rule_chunked(q, k, v, g, beta, state, chunk)
    b, t, nv, dv = v.shape
    q, k, v = _delta_rule_inputs(q, k, v, nv)
    out = np.empty((b, t, nv, dv), np.float32)
    decay = np.exp(g.astype(np.float32))
    for i in range(t):
        state *= decay[:, i, :, None, None]
        kv_mem = np.einsum("bhkv,bhk->bhv", state, k[:, i])
        delta = (v[:, i] - kv_mem) * beta[:, i, :, None]
        state += k[:, i, :, :, None] * delta[:, :, None, :]
        out[:, i] = np.einsum("bhkv,bhk->bhv", state, q[:, i])
    return out


def _gated_delta_rule_chunked(q, k, v, g, beta, state, chunk):
    b, t, nv, dv = v.shape
    q, k, v = _delta_rule_inputs(q, k, v, nv)
    # heads first: [B, H, T, D]
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    g = g.astype(np.float32).transpose(0, 2, 1)
    beta = beta.astype(np.float32).transpose(0, 2, 1)
    out = np.empty((b, nv, t, dv), np.float32)
    for s in range(0, t, chunk):
        e = min(s + chunk, t)
        n = e - s
        qc, kc, vc, bc = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], beta[:, :, s:e]
        gc = np.cumsum(g[:, :, s:e], axis=-1)                      # B H n
        # decay between positions j <= i of the chunk: exp(gc_i - gc_j)
        diff = gc[..., :, None] - gc[..., None, :]
        lower = np.tril(np.ones((n, n), bool))
        pair = np.exp(np.where(lower, diff, -np.inf))              # B H n n
        kk = kc @ kc.transpose(0, 1, 3, 2)                         # B H n n
        a = np.where(np.tril(np.ones((n, n), bool), -1), bc[..., :, None] * kk * pair, 0)
        # (I + A) U = beta v and (I + A) W = beta k exp(gc): forward substitution
        u = bc[..., None] * vc
        w = bc[..., None] * kc * np.exp(gc)[..., None]
        for i in range(1, n):
            u[:, :, i] -= np.einsum("bhj,bhjd->bhd", a[:, :, i, :i], u[:, :, :i])
            w[:, :, i] -= np.einsum("bhj,bhjd->bhd", a[:, :, i, :i], w[:, :, :i])
        v_new = u - w @ state                                      # B H n Dv
        attn = (qc @ kc.transpose(0, 1, 3, 2)) * pair              # B H n n (lower incl.)
        out[:, :, s:e] = (qc * np.exp(gc)[..., None]) @ state + attn @ v_new
        tail = np.exp(gc[..., -1:] - gc)[..., None]                # B H n 1
        state *= np.exp(gc[..., -1])[..., None, None]
        state += (kc * tail).transpose(0, 1, 3, 2) @ v_new
    return out.transpose(0, 2, 1, 3)


def gated_rms_norm(x: np.ndarray, gate: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rms_norm(x) * weight * silu(gate) over the last axis (Qwen3.5's per-head output norm)."""
    return rms_norm(x, weight, eps) * silu(gate.astype(np.float32))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32, copy=False)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x), and x itself above 20 like torch's softplus threshold."""
    x = x.astype(np.float32, copy=False)
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20)))).astype(np.float32)


def paged_attention(q: np.ndarray, k_pool: np.ndarray, v_pool: np.ndarray,
                    q_start: np.ndarray, pos_start: np.ndarray, block_tables: np.ndarray,
                    scale: float, kv=None) -> np.ndarray:
    """Causal GQA for a flat batch of sequences whose keys and values live in a block pool.

    q: [N, Hq, D], the query rows of all sequences back to back; sequence i owns rows
    q_start[i] .. q_start[i+1]-1 (q_start has S+1 entries), at absolute positions
    pos_start[i] + 0, 1, ...; k_pool, v_pool: [num_blocks, block_size, Hkv, D] with the
    sequence's keys for positions 0 .. pos_start[i] + rows - 1 already written;
    block_tables: int32 [S, max_blocks], row i the blocks of sequence i in order; kv: the
    pools' `KVLayout` as in `attention` (None: float32). Returns [N, Hq, D].
    """
    n, hq, d = q.shape
    bs = k_pool.shape[1]
    out = np.empty((n, hq, d), np.float32)
    for i in range(len(q_start) - 1):
        r0, r1 = int(q_start[i]), int(q_start[i + 1])
        if r1 == r0:
            continue
        length = int(pos_start[i]) + r1 - r0
        blocks = np.asarray(block_tables[i][: -(-length // bs)], dtype=np.int64)
        k = k_pool[blocks].reshape(-1, *k_pool.shape[2:])[:length]
        v = v_pool[blocks].reshape(-1, *v_pool.shape[2:])[:length]
        out[r0:r1] = attention(q[None, r0:r1], k[None], v[None], int(pos_start[i]), scale,
                               kv)[0]
    return out


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


def lora_apply(x: np.ndarray, y: np.ndarray, table, row_slots) -> np.ndarray:
    """Low-rank adapter updates in place: y[i] += s * (x[i] @ A.T) @ B.T for each row i,
    with (A [r, K], B [N, r], s) the factors of the row's slot in `table.factors`.

    x float32 [M, K], y float32 [M, N]; `row_slots` int32 [M] (-1: no update) or None, in
    which case every row uses `table.rows.uniform`. A slot without factors for this module
    adds nothing (see `lattice_engine.adapters`)."""
    factors = table.factors
    if row_slots is None:
        s = table.rows.uniform
        lr = factors[s] if 0 <= s < len(factors) else None
        if lr is not None:
            y += np.float32(lr.scale) * ((x @ lr.a.T) @ lr.b.T)
        return y
    for s in np.unique(row_slots):
        lr = factors[s] if 0 <= s < len(factors) else None
        if lr is None:
            continue
        rows = np.flatnonzero(row_slots == s)
        y[rows] += np.float32(lr.scale) * ((x[rows] @ lr.a.T) @ lr.b.T)
    return y
