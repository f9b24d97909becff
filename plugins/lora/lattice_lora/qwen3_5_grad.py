"""The loss and adapter gradients of dense Qwen3.5 (`lattice_engine.models.qwen3_5.Model`)
for `adapt_step`: the forward of one example, then the exact backward through every layer.

Gated DeltaNet layers: the input projections (in_proj_qkv / in_proj_z / in_proj_b /
in_proj_a), the depthwise causal conv1d + SiLU (from a zero state: an example starts a
sequence), the L2-normed (and 1/sqrt(dk)-scaled) queries and keys repeated to the value
heads, the gated delta rule run token by token
    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S'^T k_t))^T;  o_t = S_t^T q_t
(beta = sigmoid(b), g = -exp(A_log) softplus(a + dt_bias)), the per-head gated RMSNorm
with SiLU(z), out_proj. The recurrence's backward walks time in reverse over the states
S_0 .. S_T, recomputed for one layer at a time (float32 storage [T+1, Hv, Dk, Dv], the
steps computed in float64; the forward keeps none, so memory stays one layer's states),
so its gradients are exact, not a truncated or approximate form.
Full-attention layers: q_proj's per-head query and output-gate halves, the (1 + w) q/k
RMSNorms, partial RoPE, GQA softmax attention, the sigmoid output gate, o_proj. Every
RMSNorm of the residual stream is (1 + w); the MLP is the SwiGLU one.
"""

from __future__ import annotations

import numpy as np

from lattice_engine.adapters import AdapterWeights

from .train import (F32, _back_group, _causal_attention, _causal_attention_back, _head_loss,
                    _Lin,
                    _mlp_back, _mlp_fwd, _rms, _rms_back, _rope, _tables)

LINEAR_PROJ = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")
L2_EPS = 1e-6  # transformers' and FLA's l2norm epsilon


def _sigmoid(x):
    return (1.0 / (1.0 + np.exp(-x))).astype(F32)


def _silu_grad(x, s):
    """d silu(x) / dx given s = sigmoid(x)."""
    return s * (1.0 + x * (1.0 - s))


def _l2(x):
    r = 1.0 / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + F32(L2_EPS))
    return (x * r).astype(F32), r


def _l2_back(dy, x, r):
    return (r * dy - x * r ** 3 * np.sum(dy * x, axis=-1, keepdims=True)).astype(F32)


def delta_rule(q, k, v, g, beta):
    """The gated delta rule from a zero state over q, k [T, H, Dk] (normed, scaled, one per
    value head), v [T, H, Dv], g, beta [T, H]: the output [T, H, Dv] (float32) and the
    states S_0 .. S_T [T+1, H, Dk, Dv] (float32; each step computed in float64)."""
    t, h, dk = k.shape
    dv = v.shape[-1]
    states = np.zeros((t + 1, h, dk, dv), F32)
    out = np.empty((t, h, dv), F32)
    s = np.zeros((h, dk, dv))
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    decay = np.exp(g.astype(np.float64))
    b64 = beta.astype(np.float64)
    for i in range(t):
        s = s * decay[i][:, None, None]
        mem = np.einsum("hkv,hk->hv", s, k64[i])
        delta = (v64[i] - mem) * b64[i][:, None]
        s = s + k64[i][:, :, None] * delta[:, None, :]
        out[i] = np.einsum("hkv,hk->hv", s, q64[i])
        states[i + 1] = s
    return out, states


def delta_rule_back(dout, q, k, v, g, beta, states):
    """Reverse-time backward of `delta_rule`: dq, dk [T, H, Dk], dv [T, H, Dv], dg, dbeta
    [T, H] (float32), from d output [T, H, Dv]."""
    t = q.shape[0]
    q64, k64, v64, do64 = (a.astype(np.float64) for a in (q, k, v, dout))
    decay = np.exp(g.astype(np.float64))
    b64 = beta.astype(np.float64)
    dq, dk = np.empty(q.shape, F32), np.empty(k.shape, F32)
    dv, dg, dbeta = np.empty(v.shape, F32), np.empty(g.shape, F32), np.empty(beta.shape, F32)
    ds = np.zeros(states.shape[1:])          # d loss / d S_i, carried backwards
    for i in reversed(range(t)):
        s = states[i + 1].astype(np.float64)
        sd = states[i].astype(np.float64) * decay[i][:, None, None]   # S' (decayed S_{i-1})
        ki = k64[i]
        resid = v64[i] - np.einsum("hkv,hk->hv", sd, ki)
        delta = resid * b64[i][:, None]
        # o = S^T q
        ds += q64[i][:, :, None] * do64[i][:, None, :]
        dq[i] = np.einsum("hkv,hv->hk", s, do64[i])
        # S = S' + k delta^T
        dki = np.einsum("hkv,hv->hk", ds, delta)
        ddelta = np.einsum("hkv,hk->hv", ds, ki)
        dv[i] = b64[i][:, None] * ddelta
        dbeta[i] = np.sum(ddelta * resid, axis=-1)
        dmem = -b64[i][:, None] * ddelta
        # mem = S'^T k
        dsd = ds + ki[:, :, None] * dmem[:, None, :]
        dk[i] = dki + np.einsum("hkv,hv->hk", sd, dmem)
        # S' = exp(g) S_{i-1}
        dg[i] = np.einsum("hkv,hkv->h", dsd, sd)
        ds = dsd * decay[i][:, None, None]
    return dq, dk, dv, dg, dbeta


def _conv_silu(x, wt):
    """Depthwise causal conv of x [T, C] from a zero state (weight_t [K, C], tap K-1 on
    the newest input), then SiLU; returns the output and the pre-activation."""
    kern = wt.shape[0]
    t = x.shape[0]
    ext = np.concatenate([np.zeros((kern - 1, x.shape[1]), F32), x], axis=0)
    acc = np.zeros_like(x)
    for j in range(kern):
        acc += ext[j:j + t] * wt[j]
    s = _sigmoid(acc)
    return (acc * s).astype(F32), (acc, s)


def _conv_silu_back(dy, wt, saved):
    acc, s = saved
    kern, t = wt.shape[0], dy.shape[0]
    dacc = dy * _silu_grad(acc, s)
    dext = np.zeros((kern - 1 + t, dy.shape[1]), F32)
    for j in range(kern):
        dext[j:j + t] += dacc * wt[j]
    return dext[kern - 1:]


def _deltanet_fwd(view, a, mods, h):
    t = h.shape[0]
    lins = {n: _Lin(view, getattr(a, n), mods.get(getattr(a, n).name)) for n in LINEAR_PROJ}
    tp = {"lins": lins}
    mixed, tp["in_proj_qkv"] = lins["in_proj_qkv"].fwd(h)
    z, tp["in_proj_z"] = lins["in_proj_z"].fwd(h)
    braw, tp["in_proj_b"] = lins["in_proj_b"].fwd(h)
    araw, tp["in_proj_a"] = lins["in_proj_a"].fwd(h)
    beta = _sigmoid(braw)
    sp_in = (araw + a.dt_bias).astype(F32)
    softplus = np.where(sp_in > 20, sp_in, np.log1p(np.exp(np.minimum(sp_in, 20))))
    g = (a.neg_a * softplus).astype(F32)
    conv, tp["conv"] = _conv_silu(mixed, a.conv_weight_t)
    q = conv[:, :a.key_dim].reshape(t, a.nk, a.dk)
    k = conv[:, a.key_dim:2 * a.key_dim].reshape(t, a.nk, a.dk)
    v = conv[:, 2 * a.key_dim:].reshape(t, a.nv, a.dv)
    qn, rq = _l2(q)
    kn, rk = _l2(k)
    scale = F32(a.dk ** -0.5)
    rep = a.nv // a.nk   # value head j reads query/key head j // rep
    qh, kh = np.repeat(qn * scale, rep, axis=1), np.repeat(kn, rep, axis=1)
    core, _ = delta_rule(qh, kh, v, g, beta)   # the states are recomputed in the backward
    normed, rg = _rms(core, a.norm, a.eps)
    z = z.reshape(t, a.nv, a.dv)
    sz = _sigmoid(z)
    o, tp["out_proj"] = lins["out_proj"].fwd((normed * z * sz).reshape(t, a.value_dim)
                                             .astype(F32))
    tp.update(beta=beta, sp_in=sp_in, g=g, q=q, k=k, v=v, rq=rq, rk=rk, scale=scale,
              rep=rep, qh=qh, kh=kh, core=core, normed=normed, rg=rg, z=z,
              sz=sz)
    return o, tp


def _deltanet_back(dy, a, tp, grads, need_dx=True):
    lins, t = tp["lins"], dy.shape[0]
    dnz = lins["out_proj"].back(dy, tp["out_proj"], grads, a.out_proj.name)
    dnz = dnz.reshape(t, a.nv, a.dv)
    z, sz, normed = tp["z"], tp["sz"], tp["normed"]
    dz = dnz * normed * _silu_grad(z, sz)
    dcore = _rms_back(dnz * z * sz, tp["core"], a.norm, tp["rg"])
    _, states = delta_rule(tp["qh"], tp["kh"], tp["v"], tp["g"], tp["beta"])
    dqh, dkh, dv, dg, dbeta = delta_rule_back(dcore, tp["qh"], tp["kh"], tp["v"], tp["g"],
                                              tp["beta"], states)
    rep = tp["rep"]
    dqn = dqh.reshape(t, a.nk, rep, a.dk).sum(2) * tp["scale"]
    dkn = dkh.reshape(t, a.nk, rep, a.dk).sum(2)
    dconv = np.concatenate([_l2_back(dqn, tp["q"], tp["rq"]).reshape(t, -1),
                            _l2_back(dkn, tp["k"], tp["rk"]).reshape(t, -1),
                            dv.reshape(t, -1)], axis=1)
    dmixed = _conv_silu_back(dconv, a.conv_weight_t, tp["conv"])
    beta = tp["beta"]
    dbraw = dbeta * beta * (1.0 - beta)
    dsp = dg * a.neg_a
    daraw = np.where(tp["sp_in"] > 20, dsp, dsp * _sigmoid(tp["sp_in"]))
    return _back_group([(lins[n], d, tp[n], getattr(a, n).name)
                        for n, d in (("in_proj_qkv", dmixed), ("in_proj_z", dz.reshape(t, -1)),
                                     ("in_proj_b", dbraw), ("in_proj_a", daraw))],
                       grads, need_dx)


def _attention_fwd(view, a, mods, h, cos, sin):
    t = h.shape[0]
    lins = {n: _Lin(view, getattr(a, f"{n}_proj"), mods.get(getattr(a, f"{n}_proj").name))
            for n in ("q", "k", "v", "o")}
    tp = {"lins": lins}
    qg, tp["q"] = lins["q"].fwd(h)
    qg = qg.reshape(t, a.nq, 2 * a.d)
    k, tp["k"] = lins["k"].fwd(h)
    v, tp["v"] = lins["v"].fwd(h)
    q_pre, gate = qg[..., :a.d], qg[..., a.d:]
    k_pre, v = k.reshape(t, a.nkv, a.d), v.reshape(t, a.nkv, a.d)
    q, rq = _rms(q_pre, F32(1.0) + a.q_norm, a.eps)
    k, rk = _rms(k_pre, F32(1.0) + a.k_norm, a.eps)
    out, tp["attn"] = _causal_attention(view, _rope(q, cos, sin), _rope(k, cos, sin), v,
                                        a.nq // a.nkv)
    sg = _sigmoid(gate)
    o, tp["o"] = lins["o"].fwd((out * sg).reshape(t, a.nq * a.d).astype(F32))
    tp.update(q_pre=q_pre, k_pre=k_pre, rq=rq, rk=rk, out=out, sg=sg)
    return o, tp


def _attention_back(dy, a, tp, grads, cos, sin, need_dx=True):
    lins, t = tp["lins"], dy.shape[0]
    dgated = lins["o"].back(dy, tp["o"], grads, a.o_proj.name).reshape(t, a.nq, a.d)
    sg, out = tp["sg"], tp["out"]
    dgate = dgated * out * sg * (1.0 - sg)
    dq, dk, dv = _causal_attention_back(lins["o"].view, dgated * sg, tp["attn"])
    dq, dk = _rope(dq, cos, sin, -1.0), _rope(dk, cos, sin, -1.0)
    dq = _rms_back(dq, tp["q_pre"], F32(1.0) + a.q_norm, tp["rq"])
    dk = _rms_back(dk, tp["k_pre"], F32(1.0) + a.k_norm, tp["rk"])
    dqg = np.concatenate([dq, dgate], axis=-1).reshape(t, -1).astype(F32)
    return _back_group([(lins[n], d, tp[n], getattr(a, f"{n}_proj").name)
                        for n, d in (("q", dqg), ("k", dk.reshape(t, -1)),
                                     ("v", dv.reshape(t, -1)))], grads, need_dx)


def loss_and_grads_qwen3_5(view, model, weights: AdapterWeights,
                           ids: np.ndarray) -> tuple[float, dict]:
    """`train.loss_and_grads` for dense Qwen3.5 (ids already checked)."""
    from lattice_engine.models.qwen3_5 import LINEAR
    cfg = model.config
    t, eps = ids.size, cfg.rms_norm_eps
    mods = weights.modules
    cos, sin = _tables(np.arange(t), model.inv_freq)
    x = np.ascontiguousarray(model.ops.embed(model.embed_tokens, ids[None])[0], F32)
    one = F32(1.0)
    tapes = []
    for block in model.layers:
        tp = {"x": x}
        h, tp["r1"] = _rms(x, one + block.input_layernorm, eps)
        if block.kind == LINEAR:
            o, tp["mixer"] = _deltanet_fwd(view, block.linear_attn, mods, h)
        else:
            o, tp["mixer"] = _attention_fwd(view, block.self_attn, mods, h, cos, sin)
        x = (x + o).astype(F32)
        tp["x2"] = x
        h2, tp["r2"] = _rms(x, one + block.post_attention_layernorm, eps)
        d, tp["mlp"] = _mlp_fwd(view, block.mlp, mods, h2)
        x = (x + d).astype(F32)
        tapes.append((block, tp))
    loss, dx = _head_loss(view, model, x, ids, eps, offset=1.0)
    grads: dict[str, np.ndarray] = {}
    for block, tp in reversed(tapes):
        dh2 = _mlp_back(dx, block.mlp, tp["mlp"], grads)
        dx = dx + _rms_back(dh2, tp["x2"], one + block.post_attention_layernorm, tp["r2"])
        need = block is not model.layers[0]   # the embeddings' gradient is not needed
        if block.kind == LINEAR:
            dh = _deltanet_back(dx, block.linear_attn, tp["mixer"], grads, need)
        else:
            dh = _attention_back(dx, block.self_attn, tp["mixer"], grads, cos, sin, need)
        if need:
            dx = dx + _rms_back(dh, tp["x"], one + block.input_layernorm, tp["r1"])
        tp.clear()   # this layer's tape (the delta rule's states) is no longer needed
    return loss, {k: np.asarray(v, F32) for k, v in grads.items()}
