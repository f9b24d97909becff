"""The Gated DeltaNet kernels of Qwen3.5's linear-attention layers: `causal_conv1d` (the
depthwise conv with its rolling state) and `gated_delta_rule` (the recurrent memory). Their
gates' `sigmoid` / `softplus` and the output's `gated_rms_norm` are in `elementwise`.
"""

from __future__ import annotations

import numpy as np

from .buffers import _F32, _in, _new_or_check, _strided
from .runtime import _FLOATS, _L, _fb

def causal_conv1d(x: np.ndarray, weight_t: np.ndarray, state: np.ndarray,
                  silu_out: bool = True, out: np.ndarray | None = None) -> np.ndarray:
    """Depthwise causal conv with a rolling state (see `ops.causal_conv1d`); `out` may be
    x itself (a C-contiguous float32 [B, T, C]) to convolve in place."""
    if x.ndim != 3:
        raise ValueError(f"causal_conv1d: x must be [B, T, C], got shape {x.shape}")
    B, T, C = x.shape
    K = weight_t.shape[0]
    if weight_t.shape != (K, C) or state.shape != (B, K - 1, C):
        raise ValueError(f"causal_conv1d: weight_t {weight_t.shape} must be [K, {C}] and state "
                         f"{state.shape} must be [{B}, K-1, {C}]")
    if state.dtype is not _F32 or not state.flags.c_contiguous:
        raise ValueError("causal_conv1d: state must be C-contiguous float32 (it is updated in place)")
    if out is not x:
        out = _new_or_check(out, x.shape)
        out[...] = x
    elif x.dtype is not _F32 or not x.flags.c_contiguous:
        raise ValueError("causal_conv1d: in-place needs a C-contiguous float32 x")
    wp, weight_t = _in(weight_t)
    if _L.lk_causal_conv1d(_fb(_FLOATS, out, True), B, T, C, T * C, C, wp, K,
                           _fb(_FLOATS, state, True), 1 if silu_out else 0):
        raise ValueError(f"causal_conv1d: kernel size {K} is not supported (1..8)")
    return out


def gated_delta_rule(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray,
                     beta: np.ndarray, state: np.ndarray, chunk: int = 0,
                     out: np.ndarray | None = None, ahead: bool = False) -> np.ndarray:
    """The gated delta rule (see `ops.gated_delta_rule`). q, k, v may be views of one fused
    qkv array [B, T, Hk*Dk*2 + Hv*Dv] (heads contiguous): they are not copied then.
    ahead: the outputs only, `state` left as it is (token-by-token form only, chunk = 0)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[2], v.shape[3]
    if k.shape != q.shape or v.shape[:2] != (B, T) or Hv % Hk:
        raise ValueError(f"gated_delta_rule: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         f"(k like q, Hv a multiple of Hk)")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"gated_delta_rule: g {g.shape} and beta {beta.shape} must be "
                         f"[{B}, {T}, {Hv}]")
    if state.shape != (B, Hv, Dk, Dv) or state.dtype is not _F32 or not state.flags.c_contiguous:
        raise ValueError(f"gated_delta_rule: state must be C-contiguous float32 "
                         f"[{B}, {Hv}, {Dk}, {Dv}], got {state.dtype} {state.shape}")
    views = [_strided(a) for a in (q, k, v)]
    # the stride of a length-1 axis is arbitrary in numpy and never used: zero it
    strides = [tuple(s if n > 1 else 0 for s, n in zip(st, a.shape[:3]))
               for (_, a, st) in views]
    if not (strides[0][:2] == strides[1][:2] == strides[2][:2]
            and strides[0][2] in (Dk, 0) and strides[1][2] in (Dk, 0)
            and strides[2][2] in (Dv, 0)):
        fused = np.concatenate([q.reshape(B, T, -1), k.reshape(B, T, -1),
                                v.reshape(B, T, -1)], axis=-1).astype(np.float32)
        n = Hk * Dk
        return gated_delta_rule(fused[..., :n].reshape(B, T, Hk, Dk),
                                fused[..., n:2 * n].reshape(B, T, Hk, Dk),
                                fused[..., 2 * n:].reshape(B, T, Hv, Dv), g, beta, state,
                                chunk, out, ahead)
    if ahead and chunk:
        raise ValueError(f"gated_delta_rule: ahead needs chunk=0, got {chunk}")
    gp, g = _in(g)
    bp, beta = _in(beta)
    out = _new_or_check(out, (B, T, Hv, Dv))
    sb, st = strides[0][0], strides[0][1]
    if ahead:
        if _L.lk_gated_delta_rule_ahead(views[0][0], views[1][0], views[2][0], B, T, Hk, Hv,
                                        Dk, Dv, sb, st, gp, bp, _fb(_FLOATS, state),
                                        _fb(_FLOATS, out, True)):
            raise ValueError("gated_delta_rule: inconsistent shapes")
        return out
    if _L.lk_gated_delta_rule(views[0][0], views[1][0], views[2][0], B, T, Hk, Hv, Dk, Dv,
                              sb, st, gp, bp, _fb(_FLOATS, state, True), int(chunk),
                              _fb(_FLOATS, out, True)):
        raise ValueError("gated_delta_rule: inconsistent shapes")
    return out
