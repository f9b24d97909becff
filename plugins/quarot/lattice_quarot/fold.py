"""QuaRot as a checkpoint rewrite for the llama-family decoders (llama, qwen2, qwen3).

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

All folding is done in float64 and lazily per tensor, when the model asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from lattice_engine.errors import CheckpointError
from lattice_engine.io.checkpoint import Checkpoint, PackedTensor

from .rotation import Rotation, random_rotation

SUPPORTED = ("llama", "qwen2", "qwen3")
_ROWS_PER_PIECE = 8192  # embedding-sized matrices are rotated in pieces to bound memory


@dataclass(frozen=True)
class QuarotSettings:
    """`[quarot]` in the config file."""

    enabled: bool = False
    seed: int = 0
    online_down_proj: bool = True


class _Reader:
    """Float64 views of checkpoint tensors, dequantizing packed ones."""

    def __init__(self, checkpoint: Checkpoint, formats: Mapping[str, Any]):
        self.checkpoint, self.formats = checkpoint, formats

    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.checkpoint.tensors:
            raise CheckpointError(f"QuaRot: checkpoint {self.checkpoint.source} has no tensor "
                                  f"{name!r}, which the rotation has to fold")
        raw = self.checkpoint.tensors[name]()
        shape = tuple(self.checkpoint.shapes[name])
        if isinstance(raw, PackedTensor):
            fmt = self.formats.get(raw.format)
            if fmt is None:
                raise CheckpointError(f"QuaRot: tensor {name!r} is stored as {raw.format!r}, "
                                      f"which no installed plugin can read")
            raw = fmt.to_float(raw.data.reshape(shape[0] if len(shape) > 1 else 1, -1),
                               shape[-1])
        return np.asarray(raw, dtype=np.float64).reshape(shape)


def _rows(rotation: Rotation, w: np.ndarray) -> np.ndarray:
    """w @ M row by row, in pieces, as float32."""
    out = np.empty(w.shape, np.float32)
    for start in range(0, w.shape[0], _ROWS_PER_PIECE):
        out[start:start + _ROWS_PER_PIECE] = rotation.apply(w[start:start + _ROWS_PER_PIECE])
    return out


def _cols(rotation: Rotation, w: np.ndarray) -> np.ndarray:
    """M^T @ w (a writer's output rotation), as float32."""
    return _rows(rotation, np.ascontiguousarray(w.T)).T.copy()


def quarot(checkpoint: Checkpoint, settings: QuarotSettings,
           formats: Mapping[str, Any]) -> Checkpoint:
    """The rotated checkpoint (same tokenizer; config untied and, with the online rotation,
    carrying `lattice_online_rotation`)."""
    cfg = dict(checkpoint.config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise CheckpointError(f"QuaRot supports model types {', '.join(SUPPORTED)}; "
                              f"{checkpoint.source} is {model_type!r}. Disable [quarot] for it")
    if cfg.get("lattice_online_rotation"):
        raise CheckpointError(f"{checkpoint.source} is already rotated (its config has "
                              f"lattice_online_rotation); disable [quarot] for it")
    try:
        hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
        layers = int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"QuaRot: config of {checkpoint.source} lacks {exc}") from exc
    rng = np.random.default_rng(settings.seed)
    R = random_rotation(hidden, rng)
    F = random_rotation(inter, rng) if settings.online_down_proj else None
    read = _Reader(checkpoint, formats)
    tensors: dict[str, Callable[[], Any]] = dict(checkpoint.tensors)
    shapes = dict(checkpoint.shapes)

    def put(name: str, make: Callable[[], np.ndarray], shape=None) -> None:
        tensors[name] = make
        if shape is not None:
            shapes[name] = tuple(shape)

    def ones(name: str) -> None:
        put(name, lambda: np.ones(shapes[name], np.float32))

    def reader(name: str, norm: str, signs=None) -> None:
        def make():
            w = read(name) * read(norm)[None, :]
            out = _rows(R, w)
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

    put("model.embed_tokens.weight", lambda: _rows(R, read("model.embed_tokens.weight")))
    for i in range(layers):
        p = f"model.layers.{i}"
        attn_norm, mlp_norm = f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"
        for proj in ("q_proj", "k_proj", "v_proj"):
            reader(f"{p}.self_attn.{proj}.weight", attn_norm)
        writer(f"{p}.self_attn.o_proj.weight")
        reader(f"{p}.mlp.gate_proj.weight", mlp_norm)
        reader(f"{p}.mlp.up_proj.weight", mlp_norm, None if F is None else F.signs)
        up_bias = f"{p}.mlp.up_proj.bias"
        if F is not None and read.has(up_bias):
            put(up_bias, lambda b=up_bias: (read(b) * F.signs).astype(np.float32))
        writer(f"{p}.mlp.down_proj.weight", F)
        ones(attn_norm)
        ones(mlp_norm)
    head = "lm_head.weight" if read.has("lm_head.weight") and not cfg.get(
        "tie_word_embeddings", False) else "model.embed_tokens.weight"
    vocab = checkpoint.shapes[head][0]
    put("lm_head.weight",
        lambda: _rows(R, read(head) * read("model.norm.weight")[None, :]), (vocab, hidden))
    ones("model.norm.weight")

    cfg["tie_word_embeddings"] = False
    cfg["quarot"] = {"seed": settings.seed, "online_down_proj": settings.online_down_proj}
    if F is not None:
        cfg["lattice_online_rotation"] = {"down_proj": F.online_spec()}
    return Checkpoint(config=cfg, tensors=tensors, shapes=shapes, tokenizer=checkpoint.tokenizer,
                      tokenizer_config=checkpoint.tokenizer_config,
                      generation_config=checkpoint.generation_config,
                      source=f"{checkpoint.source} (QuaRot seed {settings.seed})")
