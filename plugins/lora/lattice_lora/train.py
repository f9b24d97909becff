"""`adapt_step`: online training of a LoRA adapter on one example.

The loss is the mean next-token cross-entropy over the example's tokens (positions
0 .. T-2 predict tokens 1 .. T-1). The forward runs with the model's own ops and matrices
(the native kernels when the model runs on them) with the adapter applied unmerged; the
backward's products by W use a transposed copy of the weights kept per model (float32 for
a float32 base, float16 otherwise), stacked per group of linears sharing an input and
kept in column chunks (`_FloatView`); the backward goes through every layer (the final
norm, the SwiGLU MLP, attention with RoPE and GQA, the q/k norms of qwen3, the RMSNorms)
to the adapter's A and B of every targeted module; the base stays frozen. Every product
runs on the model's kernels and thread pool. The update is SGD (with momentum), Adam or
AdamW as torch.optim defines them, after clipping the gradient's global L2 norm like
`torch.nn.utils.clip_grad_norm_`.

Architectures: the llama-family decoder (llama, qwen2, qwen3) here, and dense Qwen3.5 (its
Gated DeltaNet and gated full-attention layers) in qwen3_5_grad.py. Sparse MoE layers
(qwen3_moe, qwen3_5_moe) and a model with online rotations (QuaRot) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from lattice_engine.adapters import AdapterWeights, LowRank
from lattice_engine.errors import RequestError

F32 = np.float32


@dataclass
class OptimizerSettings:
    """torch.optim's hyper-parameters: kind "sgd" (momentum, weight_decay), "adam" (L2
    weight_decay added to the gradient) or "adamw" (decoupled weight decay); clip: the
    gradient's largest global L2 norm (None: no clipping)."""

    kind: str = "adamw"
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum: float = 0.0
    clip: Optional[float] = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("sgd", "adam", "adamw"):
            raise RequestError(f"optimizer {self.kind!r} is not one of sgd, adam, adamw")
        checks = [("lr", self.lr, 0, 10), ("eps", self.eps, 0, 1),
                  ("weight_decay", self.weight_decay, 0, 10), ("momentum", self.momentum, 0, 1)]
        for name, v, lo, hi in checks:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi \
                    or not math.isfinite(v):
                raise RequestError(f"optimizer {name} = {v!r} must be a number in [{lo}, {hi}]")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                           for b in self.betas):
            raise RequestError(f"optimizer betas = {self.betas!r} must be two numbers in [0, 1)")
        if self.clip is not None and not (isinstance(self.clip, (int, float)) and
                                          self.clip > 0):
            raise RequestError(f"clip = {self.clip!r} must be a positive number or null")


@dataclass
class TrainState:
    """What an optimizer keeps between steps, per parameter ("<module>.lora_A" / "_B")."""

    step: int = 0
    m: dict = field(default_factory=dict)   # first moment / momentum buffer
    v: dict = field(default_factory=dict)   # second moment


@dataclass
class StepResult:
    weights: AdapterWeights   # the updated adapter (a new object; the input is unchanged)
    loss: float               # the loss before the update
    grad_norm: float          # the gradient's global L2 norm before clipping
    state: TrainState


# ---- the model's float view ---------------------------------------------------------------

class _FloatView:
    """What the backward multiplies by: the weight matrices transposed, W^T [in, out],
    kept as matrices the model's ops multiply with (float32 for a float32 base, float16 for
    any other format: the base is rounded already), built once per model on first use
    (`wt`); the products of the attention and the adapters' factors (`mm`). The forward
    uses the model's own matrices and kernels."""

    def __init__(self, model):
        check_trainable(model)
        from lattice_engine.plugins import get_plugin_manager
        formats = get_plugin_manager().registry.items["weight_formats"]
        self.f32, self.f16 = formats["f32"], formats["f16"]
        self.model = model
        self.ops = model.ops
        self.native = getattr(model.ops, "name", "") == "native"
        self.cache: dict[int, object] = {}

    def mm(self, a, b):
        """a [M, K] @ b [K, N] in float32: the native kernel (the engine's thread pool)
        when the model runs on it, numpy otherwise. The native kernel multiplies by a
        matrix's transpose: b given as a transposed view of a C-contiguous array (a LoRA
        factor's .T) is passed as that array, without a copy."""
        if not self.native:
            return np.matmul(a, b, dtype=F32)
        from lattice_engine.quant.formats import PackedMatrix
        bt = b.T if b.T.flags.c_contiguous and b.dtype == F32 else \
            np.ascontiguousarray(b.T, F32)
        return self.ops.matmul(np.ascontiguousarray(a, F32),
                               PackedMatrix(self.f32, bt.shape[0], bt.shape[1],
                                            bt.view(np.uint8)))

    # the native kernels stream the reduction axis once per tile of outputs: a long
    # reduction (the lm_head's backward, 151936 for Qwen2.5; the MLP's gate / up, 4864)
    # runs at about half their speed (a quarter on the vocabulary) once the activation
    # rows leave the L2 cache, so W^T is kept in column chunks of about this many and the
    # partial products summed (the same memory; measured single-threaded on the lm_head:
    # 33 -> 75 GFLOP/s, on gate / up 60 -> 75-90)
    chunk = 1536

    def wt(self, *packed):
        """W^T of weight matrices sharing an input (stacked: [in, sum of outs]) as a list
        of (start, end, matrix) column chunks of equal width near `chunk` (multiples of
        32; one chunk up to 4/3 `chunk` columns), built once per model."""
        from lattice_engine.quant.formats import PackedMatrix
        key = tuple(id(p) for p in packed)
        if key not in self.cache:
            fmt = self.f32 if all(p.format.name == "f32" for p in packed) else self.f16
            dtype = np.float32 if fmt is self.f32 else np.float16
            t = np.concatenate([p.to_float().T for p in packed], axis=1)    # [in, out]
            n = t.shape[1]
            pieces = max(1, round(n / self.chunk))
            width = -(-n // pieces)                   # ceil(n / pieces) ...
            width = -(-width // 32) * 32 if pieces > 1 else n   # ... to a multiple of 32
            parts = []
            for s in range(0, n, width):
                c = np.ascontiguousarray(t[:, s:s + width], dtype)
                parts.append((s, min(s + width, n),
                              PackedMatrix(fmt, c.shape[0], c.shape[1], c.view(np.uint8))))
            self.cache[key] = parts
        return self.cache[key]

    def back(self, dy, *packed):
        """dy [T, sum of outs] @ the stacked W [sum of outs, in] (float32) by the model's
        kernels over the cached W^T: the input gradient of linears sharing an input, their
        sum formed inside the products."""
        parts = self.wt(*packed)
        if len(parts) == 1:
            return self.ops.matmul(np.ascontiguousarray(dy, F32), parts[0][2])
        out = None
        for s, e, m in parts:
            part = self.ops.matmul(np.ascontiguousarray(dy[:, s:e], F32), m)
            out = part if out is None else np.add(out, part, out=out)
        return out


def check_trainable(model) -> None:
    """Refuse what the backward does not cover: architectures other than the llama-family
    decoder and dense Qwen3.5, and online rotations (QuaRot)."""
    from lattice_engine.models.qwen3_5 import Model as Qwen35
    from lattice_engine.models.transformer import MLP, DecoderModel
    if isinstance(model, Qwen35):
        if any(type(b.mlp) is not MLP for b in model.layers):
            raise RequestError(f"adapt_step supports the llama-family decoder (llama, qwen2, "
                               f"qwen3) and dense Qwen3.5; {type(model).__module__} has "
                               f"sparse MoE layers, which have no backward here yet")
    elif not isinstance(model, DecoderModel):
        raise RequestError(f"adapt_step supports the llama-family decoder (llama, qwen2, "
                           f"qwen3) and dense Qwen3.5; {type(model).__module__}."
                           f"{type(model).__name__} has no backward here yet")
    if model.config.lattice_online_rotation or any(getattr(b, "input_rotations", False)
                                                   for b in model.layers):
        raise RequestError("adapt_step does not train on a model with online rotations "
                           "(QuaRot): its linears see rotated inputs")


def _view(model) -> _FloatView:
    view = getattr(model, "_lora_float_view", None)
    if view is None:
        view = model._lora_float_view = _FloatView(model)
    return view


# ---- pieces with their backward -------------------------------------------------------

def _rms(x, w, eps):
    """RMSNorm by the effective weight w (Qwen3.5's (1 + w) norms pass 1 + w); returns the
    output and the reciprocal RMS the backward needs."""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * r * w).astype(F32, copy=False), r


def _rms_back(dy, x, w, r):
    g = dy * w
    n = x.shape[-1]
    out = r * g - x * (r ** 3) * np.sum(g * x, axis=-1, keepdims=True) / n
    return out.astype(F32, copy=False)


def _rope(x, cos, sin, sign=1.0):
    """x [T, H, D] rotated by the angle (sign -1: by its negative, the transpose)."""
    half = cos.shape[-1]
    c, s = cos[:, None, :], sign * sin[:, None, :]
    a, b = x[..., :half], x[..., half:2 * half]
    out = np.concatenate([a * c - b * s, b * c + a * s], axis=-1)
    return np.concatenate([out, x[..., 2 * half:]], axis=-1) if x.shape[-1] > 2 * half else out


class _Lin:
    """A linear with its adapter factors (or none); forward keeps what backward needs."""

    def __init__(self, view, lin, lr: Optional[LowRank]):
        self.view, self.lin, self.lr = view, lin, lr

    def fwd(self, x):
        y = self.view.ops.matmul(x, self.lin.weight)
        if self.lin.bias is not None:
            y += self.lin.bias
        u = None
        if self.lr is not None:
            mm = self.view.mm
            u = mm(x, self.lr.a.T)
            y += F32(self.lr.scale) * mm(u, self.lr.b.T)
        return y, (x, u)

    def back(self, dy, saved, grads, name, need_dx=True):
        """d input from d output; adds the factors' gradients to `grads`."""
        return _back_group([(self, dy, saved, name)], grads, need_dx)

    def back_adapter(self, dy, saved, grads, name, dx):
        """The adapter's part of the backward: its factors' gradients, and its term of the
        input gradient added to dx (unless dx is None)."""
        x, u = saved
        if self.lr is None:
            return
        s, mm = F32(self.lr.scale), self.view.mm
        db = mm(dy, self.lr.b)                        # [T, r]
        gb, ga = s * mm(dy.T, u), s * mm(db.T, x)
        for key, g in ((f"{name}.lora_B", gb), (f"{name}.lora_A", ga)):
            if key in grads:
                grads[key] += g
            else:
                grads[key] = g
        if dx is not None:
            dx += s * mm(db, self.lr.a)


def _back_group(items, grads, need_dx=True):
    """The backward of linears sharing one input, items (lin, dy, saved, module name):
    the input gradient (None when need_dx is false: the first layer's input projections,
    whose input gradient nothing uses) as one product by their stacked W^T, plus each
    adapter's part."""
    dys = [np.ascontiguousarray(dy, F32) for _, dy, _, _ in items]
    dx = None
    if need_dx:
        view = items[0][0].view
        dx = view.back(dys[0] if len(dys) == 1 else np.concatenate(dys, axis=1),
                       *[lin.lin.weight for lin, _, _, _ in items])
    for (lin, _, saved, name), dy in zip(items, dys):
        lin.back_adapter(dy, saved, grads, name, dx)
    return dx


def _check_ids(model, tokens) -> np.ndarray:
    cfg = model.config
    ids = np.asarray(tokens, np.int64).reshape(-1)
    if ids.size < 2:
        raise RequestError(f"adapt_step needs at least 2 tokens (one to predict); got {ids.size}")
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        raise RequestError(f"a token id is outside the vocabulary [0, {cfg.vocab_size})")
    if ids.size > cfg.max_position_embeddings:
        raise RequestError(f"the example has {ids.size} tokens; the model's context is "
                           f"{cfg.max_position_embeddings}")
    return ids


def _causal_attention(view, q, k, v, group):
    """Causal softmax attention of q [T, Hq, D] over k, v [T, Hkv, D] (query head h reads
    kv head h // group); returns the output [T, Hq, D] and what `_causal_attention_back`
    needs. The products run per kv head with its `group` query heads stacked as one
    [group * T, D] matrix, by `view.mm` (the model's kernels and thread pool: numpy's
    BLAS threads beside the pool's would fight over the cores)."""
    t, hq, d = q.shape
    hkv = hq // group
    qg = np.ascontiguousarray(q.transpose(1, 0, 2), F32).reshape(hkv, group * t, d)
    kh = np.ascontiguousarray(k.transpose(1, 0, 2), F32)            # [Hkv, T, D]
    vh = np.ascontiguousarray(v.transpose(1, 0, 2), F32)
    scale = F32(1.0 / np.sqrt(d))
    future = np.triu(np.ones((t, t), bool), 1)
    p = np.empty((hkv, group, t, t), F32)
    out = np.empty((hkv, group * t, d), F32)
    for j in range(hkv):
        s = view.mm(qg[j], kh[j].T).reshape(group, t, t)
        s *= scale
        s[:, future] = -np.inf
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(-1, keepdims=True)
        p[j] = s
        out[j] = view.mm(s.reshape(group * t, t), vh[j])
    out = out.reshape(hq, t, d).transpose(1, 0, 2)
    return out, dict(q=qg, k=kh, v=vh, p=p, scale=scale, group=group)


def _causal_attention_back(view, dout, tp):
    """dq [T, Hq, D], dk, dv [T, Hkv, D] from d output [T, Hq, D]."""
    p, scale, group = tp["p"], tp["scale"], tp["group"]
    t, hq, d = dout.shape
    hkv = hq // group
    dog = np.ascontiguousarray(dout.transpose(1, 0, 2), F32).reshape(hkv, group * t, d)
    dq = np.empty((hkv, group * t, d), F32)
    dk, dv = np.empty((hkv, t, d), F32), np.empty((hkv, t, d), F32)
    for j in range(hkv):
        pj = p[j].reshape(group * t, t)
        dv[j] = view.mm(pj.T, dog[j])                   # summed over the group's heads
        ds = view.mm(dog[j], tp["v"][j].T)              # d probabilities [group * T, T]
        ds -= np.sum(ds * pj, -1, keepdims=True)
        ds *= pj
        ds *= scale                                     # d scores
        dq[j] = view.mm(ds, tp["k"][j])
        dk[j] = view.mm(ds.T, tp["q"][j])
    dq = dq.reshape(hq, t, d).transpose(1, 0, 2)
    return dq, dk.transpose(1, 0, 2), dv.transpose(1, 0, 2)


def _mlp_fwd(view, m, mods, h):
    """The SwiGLU MLP on h [T, hidden] with its adapters; returns the output and its tape."""
    lins = {n: _Lin(view, getattr(m, f"{n}_proj"), mods.get(getattr(m, f"{n}_proj").name))
            for n in ("gate", "up", "down")}
    g, sg_ = lins["gate"].fwd(h)
    u, su = lins["up"].fwd(h)
    sg = np.exp(-g)
    sg += F32(1.0)
    np.reciprocal(sg, out=sg)
    act = g * sg
    act *= u
    d, sd = lins["down"].fwd(act)
    return d, dict(lins=lins, gate=sg_, up=su, down=sd, g=g, sg=sg, u=u)


def _mlp_back(dy, m, tp, grads):
    """d MLP input from d output; adds the adapters' gradients to `grads`."""
    lins = tp["lins"]
    dact = lins["down"].back(dy, tp["down"], grads, m.down_proj.name)
    g, sg, u = tp["g"], tp["sg"], tp["u"]
    du = dact * g
    du *= sg
    dg = F32(1.0) - sg          # silu'(g) = sg (1 + g (1 - sg))
    dg *= g
    dg += F32(1.0)
    dg *= sg
    dg *= u
    dg *= dact
    return _back_group([(lins["gate"], dg, tp["gate"], m.gate_proj.name),
                        (lins["up"], du, tp["up"], m.up_proj.name)], grads)


def _head_loss(view, model, x, ids, eps, offset=0.0):
    """The final norm, lm_head and mean next-token cross-entropy of the last hidden states
    x [T, hidden]; returns the loss and d loss / d x."""
    ops, t = model.ops, ids.size
    fw = model.norm + F32(offset) if offset else model.norm
    final, rf = _rms(x, fw, eps)
    logits = ops.matmul(np.ascontiguousarray(final[:-1]), model.lm_head)   # [T-1, V]
    targets, rows = ids[1:], np.arange(t - 1)
    logits -= logits.max(-1, keepdims=True)
    picked = logits[rows, targets].astype(np.float64)
    probs = np.exp(logits, out=logits)          # <= 1: float32 is exact enough
    total = probs.sum(-1, dtype=np.float64)
    loss = float(np.mean(np.log(total) - picked))
    probs *= (1.0 / total).astype(F32)[:, None]
    probs[rows, targets] -= F32(1.0)
    probs *= F32(1.0 / (t - 1))                 # d loss / d logits
    dfinal = np.zeros_like(final)
    dfinal[:-1] = view.back(probs, model.lm_head)
    return loss, _rms_back(dfinal, x, fw, rf)


def loss_and_grads(model, weights: AdapterWeights, tokens) -> tuple[float, dict]:
    """Mean next-token cross-entropy of `tokens` with the adapter, and its gradient with
    respect to every factor, keyed "<module>.lora_A" / "<module>.lora_B" ([r, in] and
    [out, r], PEFT's shapes)."""
    view = _view(model)
    ids = _check_ids(model, tokens)
    from lattice_engine.models.qwen3_5 import Model as Qwen35
    if isinstance(model, Qwen35):
        from .qwen3_5_grad import loss_and_grads_qwen3_5
        return loss_and_grads_qwen3_5(view, model, weights, ids)
    cfg = model.config
    t, eps = ids.size, cfg.rms_norm_eps
    mods = weights.modules
    cos, sin = _tables(np.arange(t), model.inv_freq)
    x = np.ascontiguousarray(model.ops.embed(model.embed_tokens, ids[None])[0], F32)
    tapes = []
    for block in model.layers:
        a = block.self_attn
        lins = {n: _Lin(view, getattr(a, f"{n}_proj"), mods.get(getattr(a, f"{n}_proj").name))
                for n in ("q", "k", "v", "o")}
        tp = {"lins": lins, "x": x}
        h, tp["r1"] = _rms(x, block.input_layernorm, eps)
        q, tp["q"] = lins["q"].fwd(h)
        k, tp["k"] = lins["k"].fwd(h)
        v, tp["v"] = lins["v"].fwd(h)
        q, k, v = (z.reshape(t, -1, a.d) for z in (q, k, v))
        if a.q_norm is not None:
            tp["q_pre"], tp["k_pre"] = q, k
            q, tp["rq"] = _rms(q, a.q_norm, a.eps)
            k, tp["rk"] = _rms(k, a.k_norm, a.eps)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        out, tp["attn"] = _causal_attention(view, q, k, v, a.nq // a.nkv)
        o, tp["o"] = lins["o"].fwd(out.reshape(t, a.nq * a.d))
        x = (x + o).astype(F32)
        tp["x2"] = x
        h2, tp["r2"] = _rms(x, block.post_attention_layernorm, eps)
        d, tp["mlp"] = _mlp_fwd(view, block.mlp, mods, h2)
        x = (x + d).astype(F32)
        tapes.append((block, tp))
    loss, dx = _head_loss(view, model, x, ids, eps)
    grads: dict[str, np.ndarray] = {}
    for block, tp in reversed(tapes):
        a, lins = block.self_attn, tp["lins"]
        dh2 = _mlp_back(dx, block.mlp, tp["mlp"], grads)
        dx = dx + _rms_back(dh2, tp["x2"], block.post_attention_layernorm, tp["r2"])
        dout = lins["o"].back(dx, tp["o"], grads, a.o_proj.name).reshape(t, a.nq, a.d)
        dq, dk, dv = _causal_attention_back(view, dout, tp["attn"])
        dq, dk = _rope(dq, cos, sin, -1.0), _rope(dk, cos, sin, -1.0)
        if a.q_norm is not None:
            dq = _rms_back(dq, tp["q_pre"], a.q_norm, tp["rq"])
            dk = _rms_back(dk, tp["k_pre"], a.k_norm, tp["rk"])
        # the first layer's input gradient (the embeddings') is not needed
        need = block is not model.layers[0]
        dh = _back_group([(lins[n], d.reshape(t, -1), tp[n], getattr(a, f"{n}_proj").name)
                          for n, d in (("q", dq), ("k", dk), ("v", dv))], grads, need)
        if need:
            dx = dx + _rms_back(dh, tp["x"], block.input_layernorm, tp["r1"])
    return loss, {k: np.asarray(v, F32) for k, v in grads.items()}


def _tables(positions, inv_freq):
    angles = positions.astype(F32)[:, None] * inv_freq.astype(F32)[None, :]
    return np.cos(angles), np.sin(angles)


# ---- the optimizer ------------------------------------------------------------------------

def _params(weights: AdapterWeights) -> dict[str, np.ndarray]:
    out = {}
    for name, lr in weights.modules.items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = lr.a, lr.b
    return out


def apply_update(weights: AdapterWeights, grads: dict, settings: OptimizerSettings,
                 state: Optional[TrainState] = None) -> tuple[AdapterWeights, float, TrainState]:
    """One optimizer step on copies of the factors (torch.optim's update rules); returns
    the new adapter, the gradient norm before clipping and the optimizer state."""
    state = state or TrainState()
    params = _params(weights)
    norm = math.sqrt(sum(float(np.sum(grads[k].astype(np.float64) ** 2))
                         for k in params if k in grads))
    coef = 1.0
    if settings.clip is not None:
        coef = min(1.0, settings.clip / (norm + 1e-6))   # clip_grad_norm_'s rule
    state.step += 1
    b1, b2 = settings.betas
    lr, wd = settings.lr, settings.weight_decay
    new = {}
    for key, p in params.items():
        g = grads.get(key)
        if g is None:
            new[key] = p.copy()
            continue
        g = (g * F32(coef)).astype(F32)
        p = p.astype(F32).copy()
        if settings.kind == "sgd":
            if wd:
                g = g + F32(wd) * p
            if settings.momentum:
                buf = state.m.get(key)
                buf = g.copy() if buf is None else F32(settings.momentum) * buf + g
                state.m[key] = buf
                g = buf
            p -= F32(lr) * g
        else:
            if settings.kind == "adamw":
                p *= F32(1.0 - lr * wd)
            elif wd:
                g = g + F32(wd) * p
            m = state.m.get(key, np.zeros_like(p))
            v = state.v.get(key, np.zeros_like(p))
            m = F32(b1) * m + F32(1.0 - b1) * g
            v = F32(b2) * v + F32(1.0 - b2) * g * g
            state.m[key], state.v[key] = m, v
            bc1 = 1.0 - b1 ** state.step
            bc2 = 1.0 - b2 ** state.step
            denom = np.sqrt(v) / F32(math.sqrt(bc2)) + F32(settings.eps)
            p -= F32(lr / bc1) * (m / denom)
        new[key] = p
    modules = {name: LowRank(new[f"{name}.lora_A"], new[f"{name}.lora_B"], lr_.scale)
               for name, lr_ in weights.modules.items()}
    return AdapterWeights(weights.name, modules, weights.kind, dict(weights.meta)), norm, state


def adapt_step(model, weights: AdapterWeights, tokens,
               settings: OptimizerSettings = OptimizerSettings(),
               state: Optional[TrainState] = None) -> StepResult:
    """One training step of `weights` on the example `tokens` (token ids): the loss and
    gradient with the current factors, then the optimizer's update. `weights` is left as it
    is; the result carries the new version (load it with `AdapterManager.put`)."""
    loss, grads = loss_and_grads(model, weights, tokens)
    new, norm, state = apply_update(weights, grads, settings, state)
    return StepResult(new, loss, norm, state)
