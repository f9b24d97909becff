"""QuaRot as a checkpoint rewrite for the llama-family decoders (llama, qwen2, qwen3) and
Qwen3.5's hybrid model (Gated DeltaNet in_proj_* read the stream, out_proj writes it; its
norms scale by (1 + w), so a folded norm becomes w = 0).

With x' = x R for the residual stream (R orthogonal, see `rotation`), every RMSNorm output
is rotated too (the norm is invariant under R once its weight g is folded into the
linears that read it), so the model computes the same function when

    readers   (q/k/v, gate/up, lm_head)  W' = (W diag(g)) R
    writers   (o_proj, down_proj)        W' = R^T W,  b' = b R
    embedding                            E' = E R
    norms                                g' = 1

and a tied lm_head becomes its own rotated copy (the embedding and the head now differ).
With `online_down_proj`, the MLP activations are rotated by F at run time before down_proj
(`lattice_online_rotation` in the config; the core applies it) and down_proj' = R^T W F;
F's random signs are folded into up_proj's rows, so the run-time part is sign-free.

basis = "inputs" (llama family) leaves the residual stream, the norms' weights and the
embeddings alone and rotates each linear's input instead: the normed stream before q/k/v
and before gate/up, the attention output before o_proj and the MLP activations before
down_proj, all at run time (block rotations, a few microseconds per token), with W' = W M
for every linear reading a rotated input. Each layer's random signs are folded into the
norm weight (x g s), into v_proj's rows (GQA-consistent: a q head's output channel has its
kv head's sign) and into up_proj's rows, so the run-time part is the sign-free mix and
Hadamard. Why it exists: with the residual basis the norm weights g are folded into the
readers, so 4-bit rounding error is spread evenly over input directions that the normed
activations fill but g scales down; on Qwen2.5-Coder-0.5B that raised q_proj's output
error from 7.3% to 9.9% (q4_sym g32) although the weights' own error fell. Rotating the
inputs keeps g on the activation side and lowers it to 5.9%.

All folding is done in float64 and lazily per tensor, when the model asks for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from lattice_engine.errors import CheckpointError
from lattice_engine.io.checkpoint import Checkpoint, PackedTensor
from lattice_engine.io.stored import StoredTensor

from .rotation import Rotation, random_rotation

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_text")
BASES = ("auto", "residual", "inputs")
INPUTS_BASIS_MODELS = ("llama", "qwen2", "qwen3")
_ROWS_PER_PIECE = 8192  # embedding-sized matrices are rotated in pieces to bound memory


@dataclass(frozen=True)
class QuarotSettings:
    """`[quarot]` in the config file."""

    enabled: bool = False
    seed: int = 0
    online_down_proj: bool = True
    # "inputs" (rotate every linear's input, see the module doc) where the model supports it,
    # "residual" (QuaRot's) elsewhere; or either by name. The inputs basis measured better
    # at 4 bits on Qwen2.5-Coder-0.5B (README).
    basis: str = "auto"


def _float_file(loader) -> bool:
    """A 2-D float tensor (f32 / f16 / bf16) whose rows can be read from its file exactly
    (packed blocks keep the formats' own dequantizers)."""
    return isinstance(loader, StoredTensor) and loader.stored in ("f32", "f16", "bf16")


class _Reader:
    """Float64 views of checkpoint tensors, dequantizing packed ones."""

    def __init__(self, checkpoint: Checkpoint, formats: Mapping[str, Any]):
        self.checkpoint, self.formats = checkpoint, formats

    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def _loader(self, name: str):
        if name not in self.checkpoint.tensors:
            raise CheckpointError(f"QuaRot: checkpoint {self.checkpoint.source} has no tensor "
                                  f"{name!r}, which the rotation has to fold")
        return self.checkpoint.tensors[name]

    def _unpack(self, name: str, raw: PackedTensor, rows: int, cols: int,
                start: int = 0, stop: int | None = None) -> np.ndarray:
        fmt = self.formats.get(raw.format)
        if fmt is None:
            raise CheckpointError(f"QuaRot: tensor {name!r} is stored as {raw.format!r}, "
                                  f"which no installed plugin can read")
        return fmt.to_float(raw.data.reshape(rows, -1)[start:stop], cols)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a 2-D tensor as float64, without widening the rest (an
        embedding-sized table in float64 is 1 GB at Qwen2.5-0.5B's shape)."""
        loader = self._loader(name)
        rows, cols = self.checkpoint.shapes[name]
        if _float_file(loader):
            # read from the file: touching the checkpoint's memory map would keep its pages
            # resident (QuaRot reads every tensor: ~1.4 GB more RSS after loading
            # Qwen2.5-Coder-0.5B from float32)
            return np.asarray(loader.rows()[start:stop], dtype=np.float64)
        raw = loader()
        piece = self._unpack(name, raw, rows, cols, start, stop) if isinstance(raw, PackedTensor) \
            else np.asarray(raw).reshape(rows, cols)[start:stop]
        return np.asarray(piece, dtype=np.float64).reshape(-1, cols)

    def __call__(self, name: str) -> np.ndarray:
        loader = self._loader(name)
        shape = tuple(self.checkpoint.shapes[name])
        if _float_file(loader):
            return self.rows(name, 0, shape[0])
        raw = loader()
        if isinstance(raw, PackedTensor):
            raw = self._unpack(name, raw, shape[0] if len(shape) > 1 else 1, shape[-1])
        return np.asarray(raw, dtype=np.float64).reshape(shape)


def _rows(rotation: Rotation, w: np.ndarray) -> np.ndarray:
    """w @ M row by row, in pieces, as float32."""
    out = np.empty(w.shape, np.float32)
    for start in range(0, w.shape[0], _ROWS_PER_PIECE):
        out[start:start + _ROWS_PER_PIECE] = rotation.apply(w[start:start + _ROWS_PER_PIECE])
    return out


def _table_rows(rotation: Rotation, read: _Reader, name: str,
                col_scale: np.ndarray | None = None) -> np.ndarray:
    """(table diag(col_scale)) @ M for an embedding-sized table, read and widened a piece
    at a time (peak memory: the float32 result and one float64 piece)."""
    rows, cols = read.checkpoint.shapes[name]
    out = np.empty((rows, cols), np.float32)
    for start in range(0, rows, _ROWS_PER_PIECE):
        piece = read.rows(name, start, start + _ROWS_PER_PIECE)
        if col_scale is not None:
            piece *= col_scale[None, :]
        out[start:start + piece.shape[0]] = rotation.apply(piece)
    return out


def _cols(rotation: Rotation, w: np.ndarray) -> np.ndarray:
    """M^T @ w (a writer's output rotation), as float32."""
    return _rows(rotation, np.ascontiguousarray(w.T)).T.copy()


@dataclass
class _Plan:
    """Where a model type keeps what QuaRot rotates."""

    prefix: str                    # "model" or "model.language_model"
    text_config: dict              # the dict holding hidden_size etc. (rewritten in place)
    norm_offset: float             # norms scale by (offset + w): 0 llama family, 1 Qwen3.5
    norm_readers: list             # (norm tensor, [linears reading its output])
    writers: list                  # linears adding into the residual stream
    mlps: list                     # (gate, up, down) per layer
    tie_key: dict                  # the config dict whose tie_word_embeddings governs the head


def _plan(cfg: dict, source: str) -> _Plan:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"QuaRot supports model types {', '.join(SUPPORTED)}; "
                              f"{source} is {model_type!r}. Disable [quarot] for it")
    qwen35 = model_type.startswith("qwen3_5")
    text = cfg
    if model_type == "qwen3_5":  # Qwen3_5ForConditionalGeneration: text model nested
        text = dict(cfg.get("text_config") or {})
        cfg["text_config"] = text
    try:
        layers = int(text["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"QuaRot: config of {source} lacks {exc}") from exc
    prefix = "model.language_model" if model_type == "qwen3_5" else "model"
    kinds = text.get("layer_types") or [
        "full_attention" if qwen35 and (i + 1) % int(text.get("full_attention_interval", 4)) == 0
        else ("linear_attention" if qwen35 else "full_attention") for i in range(layers)]
    plan = _Plan(prefix, text, 1.0 if qwen35 else 0.0, [], [], [], cfg)
    for i in range(layers):
        p = f"{prefix}.layers.{i}"
        if kinds[i] == "linear_attention":
            a = f"{p}.linear_attn"
            readers = [f"{a}.{n}.weight" for n in ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                                  "in_proj_a")]
            plan.writers.append(f"{a}.out_proj.weight")
        else:
            a = f"{p}.self_attn"
            readers = [f"{a}.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")]
            plan.writers.append(f"{a}.o_proj.weight")
        plan.norm_readers.append((f"{p}.input_layernorm.weight", readers))
        m = f"{p}.mlp"
        plan.norm_readers.append((f"{p}.post_attention_layernorm.weight",
                                  [f"{m}.gate_proj.weight", f"{m}.up_proj.weight"]))
        plan.mlps.append((f"{m}.gate_proj.weight", f"{m}.up_proj.weight",
                          f"{m}.down_proj.weight"))
    return plan


def quarot(checkpoint: Checkpoint, settings: QuarotSettings,
           formats: Mapping[str, Any]) -> Checkpoint:
    """The rotated checkpoint (same tokenizer; config untied and, with the online rotation,
    carrying `lattice_online_rotation`)."""
    cfg = dict(checkpoint.config)
    if settings.basis not in BASES:
        raise CheckpointError(f"quarot.basis = {settings.basis!r} is not one of "
                              f"{', '.join(BASES)}; fix the [quarot] section")
    plan = _plan(cfg, checkpoint.source)
    text = plan.text_config
    if settings.basis == "auto":
        settings = dataclasses.replace(settings, basis="inputs" if cfg.get("model_type") in
                                       INPUTS_BASIS_MODELS else "residual")
    if settings.basis == "inputs" and cfg.get("model_type") not in INPUTS_BASIS_MODELS:
        raise CheckpointError(f"quarot.basis = 'inputs' supports {', '.join(INPUTS_BASIS_MODELS)}"
                              f"; {checkpoint.source} is {cfg.get('model_type')!r}: use "
                              f"basis = 'residual' for it")
    if text.get("lattice_online_rotation") or cfg.get("quarot"):
        raise CheckpointError(f"{checkpoint.source} is already rotated (its config has a "
                              f"quarot entry); disable [quarot] for it")
    try:
        hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"QuaRot: config of {checkpoint.source} lacks {exc}") from exc
    rng = np.random.default_rng(settings.seed)
    if settings.basis == "inputs":
        return _rotate_inputs(checkpoint, settings, formats, cfg, plan, rng)
    R = random_rotation(hidden, rng)
    F = random_rotation(inter, rng) if settings.online_down_proj else None
    read = _Reader(checkpoint, formats)
    tensors: dict[str, Callable[[], Any]] = dict(checkpoint.tensors)
    shapes = dict(checkpoint.shapes)
    offset = plan.norm_offset

    def put(name: str, make: Callable[[], np.ndarray], shape=None) -> None:
        tensors[name] = make
        if shape is not None:
            shapes[name] = tuple(shape)

    def scale(norm: str) -> np.ndarray:
        return offset + read(norm)

    def identity_norm(name: str) -> None:  # (offset + w) == 1
        put(name, lambda: np.full(shapes[name], 1.0 - offset, np.float32))

    def reader(name: str, norm: str, signs=None) -> None:
        def make():
            out = _rows(R, read(name) * scale(norm)[None, :])
            return out if signs is None else out * signs[:, None].astype(np.float32)
        put(name, make)

    def writer(name: str, inner: Rotation | None = None) -> None:
        def make():
            w = read(name)
            if inner is not None:
                w = inner.apply(w)  # W F: the online rotation of its input
            return _cols(R, w)
        put(name, make)
        bias = name[: -len("weight")] + "bias"
        if read.has(bias):
            put(bias, lambda: R.apply(read(bias)).astype(np.float32))

    embed = f"{plan.prefix}.embed_tokens.weight"
    put(embed, lambda: _table_rows(R, read, embed))
    ups = {up for _, up, _ in plan.mlps}
    for norm, readers in plan.norm_readers:
        for name in readers:
            reader(name, norm, F.signs if F is not None and name in ups else None)
        identity_norm(norm)
    for name in plan.writers:
        writer(name)
    for _, up, down in plan.mlps:
        up_bias = up[: -len("weight")] + "bias"
        if F is not None and read.has(up_bias):
            put(up_bias, lambda b=up_bias: (read(b) * F.signs).astype(np.float32))
        writer(down, F)
    final = f"{plan.prefix}.norm.weight"
    tied = bool(plan.tie_key.get("tie_word_embeddings", False)) or not read.has("lm_head.weight")
    head = embed if tied else "lm_head.weight"
    vocab = checkpoint.shapes[head][0]
    put("lm_head.weight", lambda: _table_rows(R, read, head, scale(final)), (vocab, hidden))
    identity_norm(final)
    if read.has("mtp.fc.weight"):
        _mtp(read, put, identity_norm, scale, R, final, hidden, shapes)

    plan.tie_key["tie_word_embeddings"] = False
    if plan.tie_key is not text:
        text["tie_word_embeddings"] = False
    if tied:  # the head's own copy keeps a tied head's precision (f16 under q4 / q8_0)
        text["lattice_lm_head_role"] = "tied_embedding"
    # Provenance; also what a vision encoder or MTP head must apply to stay in this basis
    # (R can be rebuilt from the seed).
    cfg["quarot"] = {"seed": settings.seed, "online_down_proj": settings.online_down_proj,
                     "basis": settings.basis}
    if F is not None:
        text["lattice_online_rotation"] = {"down_proj": F.online_spec()}
    return Checkpoint(config=cfg, tensors=tensors, shapes=shapes, tokenizer=checkpoint.tokenizer,
                      tokenizer_config=checkpoint.tokenizer_config,
                      generation_config=checkpoint.generation_config,
                      source=f"{checkpoint.source} (QuaRot seed {settings.seed})")



def _mtp(read, put, identity_norm, scale, R: Rotation, final: str, hidden: int,
         shapes) -> None:
    """Qwen3.5's MTP head in the rotated model (residual basis). Its layer keeps its own,
    unrotated residual stream; what crosses into it is converted (M the rotation, g_f the
    target's final-norm scale, folded away from the model):
    - the embedding half of fc reads rmsnorm(E' x) = rmsnorm(E x) M: folded like any
      reader, fc_e' = fc_e diag(g_e) M, and pre_fc_norm_embedding becomes the identity;
    - the target's hidden state arrives as v M (v = rmsnorm(x), no g_f), while the head's
      pre_fc_norm_hidden needs v * g_f, whose RMS norm is not rotation-invariant: the head
      applies `mtp.lattice_hidden_in` (h' M^T diag(g_f)) first;
    - the shared lm_head now reads (u / g_f) M for the unrotated u = norm(y): the head
      applies `mtp.lattice_head_in` (u diag(1 / g_f) M) before it."""
    fc, emb_norm = "mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight"

    def fold_fc():
        w = read(fc)
        w[:, :hidden] = _rows(R, w[:, :hidden] * scale(emb_norm)[None, :])
        return w.astype(np.float32)

    def final_scale() -> np.ndarray:
        g = scale(final)
        if np.abs(g).min() < 1e-6:
            raise CheckpointError(f"QuaRot: the final norm's scale reaches {np.abs(g).min():.1e}"
                                  f": the MTP head cannot be moved into the rotated basis "
                                  f"(it divides by it); disable [quarot] or speculative mtp")
        return g

    put(fc, fold_fc)
    identity_norm(emb_norm)
    # Linear weights W (y = x W^T): hidden_in W = diag(g_f) M, head_in W = M^T diag(1/g_f)
    put("mtp.lattice_hidden_in.weight",
        lambda: (final_scale()[:, None] * R.matrix()).astype(np.float32), (hidden, hidden))
    put("mtp.lattice_head_in.weight",
        lambda: (R.matrix().T / final_scale()[None, :]).astype(np.float32), (hidden, hidden))


def _layer_signs(rotation: Rotation, rng: np.random.Generator) -> Rotation:
    """The same mix and Hadamard with fresh random signs (one per layer)."""
    return dataclasses.replace(rotation,
                               signs=rng.choice(np.array([-1.0, 1.0]), rotation.size))


def _rotate_inputs(checkpoint: Checkpoint, settings: QuarotSettings,
                   formats: Mapping[str, Any], cfg: dict, plan: _Plan,
                   rng: np.random.Generator) -> Checkpoint:
    """basis = "inputs": see the module docstring."""
    text = plan.text_config
    try:
        hidden, inter = int(text["hidden_size"]), int(text["intermediate_size"])
        n_heads = int(text["num_attention_heads"])
        n_kv = int(text.get("num_key_value_heads") or n_heads)
        head_dim = int(text.get("head_dim") or hidden // n_heads)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"QuaRot: config of {checkpoint.source} lacks {exc}") from exc
    read = _Reader(checkpoint, formats)
    tensors: dict[str, Callable[[], Any]] = dict(checkpoint.tensors)
    attn_in, mlp_in = random_rotation(hidden, rng), random_rotation(hidden, rng)
    o_in = random_rotation(n_heads * head_dim, rng)
    down_in = random_rotation(inter, rng) if settings.online_down_proj else None

    # a tensor may be both rotated and sign-scaled (v_proj, up_proj): steps compose in order
    steps: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {}

    def rotate_input(name: str, rotation: Rotation) -> None:  # W' = W M
        steps.setdefault(name, []).append(lambda w: _rows(rotation, w))

    def scale_rows(name: str, signs: np.ndarray) -> None:
        steps.setdefault(name, []).append(
            lambda w: w * signs.reshape(-1, *([1] * (w.ndim - 1))))

    group = n_heads // n_kv
    for i, ((attn_norm, readers), (mlp_norm, mlp_readers), (_, up, down)) in enumerate(zip(
            plan.norm_readers[0::2], plan.norm_readers[1::2], plan.mlps)):
        a = _layer_signs(attn_in, rng)
        scale_rows(attn_norm, a.signs)           # x g s: the norm's output carries the signs
        for name in readers:
            rotate_input(name, a)
        m = _layer_signs(mlp_in, rng)
        scale_rows(mlp_norm, m.signs)
        for name in mlp_readers:
            rotate_input(name, m)
        # o_proj: the attention output channel (q head h, j) is a mix of v channel
        # (h // group, j), so v_proj's rows carry the signs of every q head reading them
        kv_signs = rng.choice(np.array([-1.0, 1.0]), n_kv * head_dim)
        o = dataclasses.replace(o_in, signs=np.concatenate(
            [kv_signs[(h // group) * head_dim:(h // group + 1) * head_dim]
             for h in range(n_heads)]))
        v = readers[2]
        scale_rows(v, kv_signs)
        v_bias = v[: -len("weight")] + "bias"
        if read.has(v_bias):
            scale_rows(v_bias, kv_signs)
        o_proj = v.replace("v_proj", "o_proj")
        rotate_input(o_proj, o)
        if down_in is not None:
            d = _layer_signs(down_in, rng)
            scale_rows(up, d.signs)
            up_bias = up[: -len("weight")] + "bias"
            if read.has(up_bias):
                scale_rows(up_bias, d.signs)
            rotate_input(down, d)
    for name, fns in steps.items():
        def make(name=name, fns=fns):
            w = read(name)
            for fn in fns:
                w = fn(w)
            return np.asarray(w, dtype=np.float32)
        tensors[name] = make
    sites = {"attn_in": attn_in.online_spec(), "mlp_in": mlp_in.online_spec(),
             "o_proj": o_in.online_spec()}
    if down_in is not None:
        sites["down_proj"] = down_in.online_spec()
    text["lattice_online_rotation"] = sites
    cfg["quarot"] = {"seed": settings.seed, "online_down_proj": settings.online_down_proj,
                     "basis": settings.basis}
    return Checkpoint(config=cfg, tensors=tensors, shapes=dict(checkpoint.shapes),
                      tokenizer=checkpoint.tokenizer,
                      tokenizer_config=checkpoint.tokenizer_config,
                      generation_config=checkpoint.generation_config,
                      source=f"{checkpoint.source} (QuaRot inputs, seed {settings.seed})")
