"""Float32 error bounds, derived once here so that a test's tolerance says where it comes from.

The model. Rounding to nearest in float32 has unit roundoff u = 2^-24. A dot product of
length K computed in float32, in any summation order, satisfies (Higham & Mary, "A new
approach to probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019, thm 2.4)

    |fl(x . w) - x . w|  <=  lambda * sqrt(K) * u * (|x| . |w|)

with probability at least 1 - 2 K exp(-lambda^2 (1 - u)^2 / 2) when rounding errors are
mean-independent (which holds in practice for data that is not specially structured). With
LAMBDA = 8 that is 1 - 2.5e-13 K per output: no test here computes enough outputs for a
false alarm to be plausible, and the bound is still a hundred times tighter than the
worst-case K u |x|.|w|. Two float32 evaluations of the same dot product in different
orders (BLAS kernels with other blockings, a batch of 2 against a batch of 1, our C kernels
against numpy) each obey it, so they differ by at most twice the bound.

A network composes such dot products. Each layer adds its own rounding error, relative to
the magnitudes it works on; the residual stream carries earlier errors forward. With
normalisation before every sub-layer (RMSNorm) an input perturbation is not amplified by
more than O(1) per sub-layer. The errors of the dot products along the longest path are
then a sum of independent rounding errors, like those inside one long dot product, so they
add in quadrature: the relative error at the logits is bounded as for a single dot product
whose length is the sum of the path's lengths. The logits' own scale is |h| . |w| of the
lm_head: `network_bound` takes that magnitude and the lengths of the dot products on the
path (`decoder_path` lists them for a decoder).

Elementwise functions (exp, silu, rsqrt) are accurate to a few u in numpy and in our C
code; their contribution is O(u), below the sqrt(K) u of the shortest dot product, and the
sum over the path covers it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

U32 = 2.0 ** -24    # float32 unit roundoff (round to nearest)
LAMBDA = 8.0        # the probabilistic bound's confidence parameter (see the module doc)
# A product by bf16x3 (kernels.bf16x3: x = xh + xl, w = wh + wl in bf16, xh wh + xh wl + xl wh
# summed in float32) misses xl wl and the roundings of xl and wl, each at most 2^-18 |x w|:
# the unit of its error per product, which then adds over a dot product like u's.
U_BF16X3 = 3 * 2.0 ** -18


def dot_bound(k: int, magnitude, evaluations: int = 2, unit: float = U32):
    """Largest difference between `evaluations` float32 computations of dot products of
    length k (2: two orders compared with each other; 1: one against the exact value),
    where magnitude = |x| . |w| (a scalar or an array of them); unit: the error per
    product (U_BF16X3 for bf16x3 products)."""
    return evaluations * LAMBDA * np.sqrt(k) * unit * np.asarray(magnitude, np.float64)


def matmul_magnitude(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|x| @ |w|^T in float64: the scale each output of x @ w^T is computed at."""
    return np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(w, np.float64)).T


def assert_matmul_close(got: np.ndarray, want: np.ndarray, x: np.ndarray, w: np.ndarray,
                        evaluations: int = 2) -> None:
    """got and want are two float32 computations of x @ w^T (w as float [N, K])."""
    bound = dot_bound(x.shape[-1], matmul_magnitude(x, w), evaluations)
    excess = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"|got - want| = {abs(float(got[worst]) - float(want[worst])):.3g} at {worst} exceeds "
        f"the float32 bound {float(bound[worst]):.3g} (K = {x.shape[-1]})")


def network_bound(magnitude, path: Iterable[int], evaluations: int = 2,
                  unit: float = U32) -> float:
    """Bound on |a - b| between float32 evaluations of a network whose output scale is
    `magnitude` (|h| . |w| at the last product, max over outputs) and whose longest path
    runs through dot products of the lengths in `path` (see the module doc); unit: the
    error per product of the less exact evaluation (U_BF16X3 when its matmuls are bf16x3)."""
    relative = float(dot_bound(sum(path), 1.0, evaluations, unit))
    return relative * float(np.max(magnitude))


def decoder_path(hidden: int, intermediate: int, head_dim: int, n_heads: int,
                 n_layers: int, positions: int) -> list[int]:
    """The dot-product lengths on a pre-norm decoder's longest path: per layer the q/k/v
    projections (hidden), the attention scores (head_dim) and their weighted sum over the
    positions attended, the output projection (n_heads * head_dim), the MLP's gate/up
    (hidden) and down (intermediate) projections; then the lm_head (hidden). A linear-
    attention layer's conv and delta rule have lengths no larger than these (kernel width,
    head dims, chunk length <= positions), so the same list bounds a hybrid model."""
    layer = [hidden, head_dim, max(positions, 1), n_heads * head_dim, hidden, intermediate]
    return layer * n_layers + [hidden]


def model_path(config, positions: int) -> list[int]:
    """`decoder_path` for a loaded model's config (llama family or Qwen3.5)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return decoder_path(config.hidden_size, config.intermediate_size, head_dim,
                        config.num_attention_heads, config.num_hidden_layers, positions)


def logits_bound(model, hidden: np.ndarray, positions: int, evaluations: int = 2) -> float:
    """Bound on the difference of two float32 evaluations of `model`'s logits, given the
    final hidden states `hidden` [..., H] one of them produced and the longest context
    attended (`positions`)."""
    w = model.lm_head.to_float()
    h = np.abs(np.asarray(hidden, np.float64)).reshape(-1, hidden.shape[-1])
    magnitude = (h @ np.abs(w.astype(np.float64)).T).max()
    return network_bound(magnitude, model_path(model.config, positions), evaluations)


U16 = 2.0 ** -11    # float16 unit roundoff: a KV cache stored as f16 (`[model] kv_cache`)


def kv_storage_bound(model, hidden: np.ndarray, positions: int, unit: float = U16) -> float:
    """Bound on |logits with keys and values stored at unit roundoff `unit` (f16: U16)
    - logits with float32 keys and values], given the final hidden states `hidden` one of
    them produced and the longest context attended. Storing a key or value rounds it once
    (relative error <= unit), so a score q.k moves like a length-head_dim dot product
    rounded at `unit`, and the weighted sum of values like a length-`positions` one: per
    layer those two lengths, carried to the logits as the module doc's path (in
    quadrature), at the lm_head's output scale (one side rounded: evaluations = 1). Add
    `logits_bound` for the float32 rounding of the rest."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = model.lm_head.to_float()
    h = np.abs(np.asarray(hidden, np.float64)).reshape(-1, hidden.shape[-1])
    magnitude = (h @ np.abs(w.astype(np.float64)).T).max()
    length = c.num_hidden_layers * (head_dim + max(positions, 1))
    return float(LAMBDA * np.sqrt(length) * unit * magnitude)


def attention_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
                    scale: float, evaluations: int = 2) -> np.ndarray:
    """Per-output bound [B, T, Hq, D] for two float32 evaluations of causal grouped-query
    attention (the shapes of `ops.attention`). A score q.k is a length-D product: its
    absolute error e (at |q|.|k| scale) becomes a relative error e of its softmax weight
    (exp turns absolute into relative error; exp's own few-u error is added as 16 u); the
    normaliser sums n weights (n keys attended). The output sum_j p_j v_j then carries
    that relative error at the scale sum_j p_j |v_j|, plus its own length-n sum's."""
    q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, hq, d = q.shape
    group = hq // k.shape[2]
    k64, v64 = np.repeat(k64, group, axis=2), np.repeat(v64, group, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q64, k64) * scale
    magnitude = np.einsum("bthd,bshd->bhts", np.abs(q64), np.abs(k64)) * abs(scale)
    keys = np.arange(k.shape[1])[None, :] <= start_pos + np.arange(t)[:, None]   # [T, S]
    scores = np.where(keys, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    n = keys.sum(-1)[None, None, :, None]                                            # keys attended
    score_error = np.where(keys, dot_bound(d, magnitude, evaluations), 0).max(-1, keepdims=True)
    relative = score_error + dot_bound(n, 1.0, evaluations) + evaluations * 16 * U32
    weighted = np.einsum("bhts,bshd->bhtd", p, np.abs(v64))
    bound = relative * weighted + dot_bound(n, weighted, evaluations)
    return bound.transpose(0, 2, 1, 3)


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    """sqrt(mean((a - b)^2) / mean(b^2)): the error measure of the round-trip tables."""
    b64 = np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b64) ** 2) / np.mean(b64 ** 2)))


__all__: Sequence[str] = ["U32", "U16", "LAMBDA", "kv_storage_bound", "dot_bound", "matmul_magnitude",
                          "assert_matmul_close", "network_bound", "decoder_path",
                          "model_path", "logits_bound", "attention_bound", "relative_rms"]
