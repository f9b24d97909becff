"""BERT-family encoders (`model_type: bert`: all-MiniLM-L6-v2, BGE, E5 and the other
sentence-transformers checkpoints of that family): post-norm blocks of bidirectional
multi-head attention and a GELU MLP over word + absolute position + token type embeddings.

An encoder has no lm_head and no cache: it is not a `CausalLM`. It provides
`encode(tokens, mask)`, the final hidden states of a right-padded batch, which
`lattice_engine.embedding` pools into sentence embeddings (`contract.Encoder`). Every op
goes through the op set (the C kernels on the native backend).

The layers run on the real tokens only, packed one sequence after another ([N, H], no
padding: a batch of sorted WikiText lines carried ~10% padding), with
`ops.encoder_attention_packed` (C: native/src/encoder_attention.c) over each sequence's own
rows, so a row of a batch gets the numbers of the sequence alone (up to summation order).
Everything after attention (output projection, LayerNorm, the GELU MLP) is row-wise and
runs ROW_CHUNK rows at a time: the MLP's [rows, 4H] intermediate then stays in cache
(1.5 MB at 256 rows of MiniLM) where the whole batch's (49 MB at 32 x 250 tokens) went to
memory and back for the bias, the GELU and the residual, each memory-bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError
from ..kernels import encoder
from .base import Linear, WeightLoader, check_tokens, config_from_dict, project

GELU_KINDS = ("gelu", "gelu_new", "gelu_pytorch_tanh")


@dataclass
class BertConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    position_embedding_type: str = "absolute"

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size={self.hidden_size} is not a multiple of "
                                  f"num_attention_heads={self.num_attention_heads}; the "
                                  f"config is invalid")
        if self.hidden_act not in GELU_KINDS:
            raise CheckpointError(f"hidden_act={self.hidden_act!r} is not supported for bert; "
                                  f"supported: {', '.join(GELU_KINDS)}")
        if self.position_embedding_type != "absolute":
            raise CheckpointError(f"position_embedding_type={self.position_embedding_type!r} "
                                  f"is not supported; supported: absolute")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class EncoderLayer:
    def __init__(self, cfg: BertConfig, w: WeightLoader, prefix: str):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.nh, self.d = cfg.num_attention_heads, cfg.head_dim
        self.eps = cfg.layer_norm_eps
        self.tanh = cfg.hidden_act != "gelu"

        def linear(name: str, rows: int, cols: int) -> Linear:
            return Linear(w.matrix(f"{prefix}.{name}.weight", (rows, cols), "linear"),
                          w.vector(f"{prefix}.{name}.bias", (rows,)))

        def norm(name: str) -> tuple[np.ndarray, np.ndarray]:
            return (w.vector(f"{prefix}.{name}.weight", (h,)),
                    w.vector(f"{prefix}.{name}.bias", (h,)))

        self.query = linear("attention.self.query", h, h)
        self.key = linear("attention.self.key", h, h)
        self.value = linear("attention.self.value", h, h)
        self.attn_out = linear("attention.output.dense", h, h)
        self.attn_norm = norm("attention.output.LayerNorm")
        self.intermediate = linear("intermediate.dense", f, h)
        self.output = linear("output.dense", h, f)
        self.out_norm = norm("output.LayerNorm")
        self.fast = {}  # Linear -> its encoder-matmul weight (`use_encoder_matmuls`)

    def use_encoder_matmuls(self) -> None:
        """Run the float32 linears on this machine's encoder matmul when it has one
        (kernels.encoder): bf16x3 products on AMX-BF16 (relative error ~4e-6, embeddings
        within cosine 0.9999999 of float32's, 1.5x the embedding throughput), or on AVX2
        CPUs float32 in the BLAS order (one FMA chain per output; 1.2-1.4x the float32
        kernels on all-MiniLM-L6-v2's shapes on a Zen 3). Every row count takes it, so a
        text's embedding does not depend on the batch it came in."""
        for lin in (self.query, self.key, self.value, self.attn_out, self.intermediate,
                    self.output):
            if lin.weight.format.name == "f32" and lin.adapters is None:
                packed = encoder.weight(lin.weight.to_float())
                if packed is not None:
                    self.fast[lin] = packed

    def _linear(self, lin: Linear, x: np.ndarray, ops) -> np.ndarray:
        fast = self.fast.get(lin)
        if fast is None or lin.adapters is not None:
            return lin(x, ops)
        y = encoder.matmul(x, fast)
        if lin.bias is not None:
            y += lin.bias
        return y

    def __call__(self, x: np.ndarray, offsets: np.ndarray, ops) -> np.ndarray:
        """x [N, H]: the batch's real tokens packed, sequence b the rows offsets[b] ..
        offsets[b + 1]. Returns the layer's output [N, H] (a new array)."""
        n, h = x.shape
        if self.fast:
            q, k, v = (self._linear(lin, x, ops) for lin in (self.query, self.key, self.value))
        else:
            q, k, v = project(x, (self.query, self.key, self.value), ops)
        shape = (n, self.nh, self.d)
        ctx = ops.encoder_attention_packed(q.reshape(shape), k.reshape(shape), v.reshape(shape),
                                           offsets, 1.0 / np.sqrt(self.d)).reshape(n, h)
        out = np.empty_like(x)
        for r0 in range(0, n, ROW_CHUNK):
            rows = slice(r0, min(n, r0 + ROW_CHUNK))
            a = self._linear(self.attn_out, ctx[rows], ops)
            a += x[rows]
            a = ops.layer_norm(a, *self.attn_norm, self.eps)
            inner = ops.gelu(self._linear(self.intermediate, a, ops), self.tanh)
            y = self._linear(self.output, inner, ops)
            y += a
            out[rows] = ops.layer_norm(y, *self.out_norm, self.eps)
        return out


# rows per pass of the row-wise half of a layer (see the module docstring)
ROW_CHUNK = 256


class Model:
    """A BERT encoder: `encode(tokens, mask)` -> final hidden states [B, T, H]."""

    config_class = BertConfig

    def __init__(self, cfg: BertConfig, w: WeightLoader, ops, prefix: str = ""):
        self.config = cfg
        self.ops = ops
        h = cfg.hidden_size
        e = f"{prefix}embeddings"
        self.word_embeddings = w.matrix(f"{e}.word_embeddings.weight", (cfg.vocab_size, h),
                                        "embedding")
        self.position_embeddings = w.vector(f"{e}.position_embeddings.weight",
                                            (cfg.max_position_embeddings, h))
        self.token_type_embeddings = w.vector(f"{e}.token_type_embeddings.weight",
                                              (cfg.type_vocab_size, h))
        self.embed_norm = (w.vector(f"{e}.LayerNorm.weight", (h,)),
                           w.vector(f"{e}.LayerNorm.bias", (h,)))
        self.layers = [EncoderLayer(cfg, w, f"{prefix}encoder.layer.{i}")
                       for i in range(cfg.num_hidden_layers)]
        if getattr(ops, "name", "") == "native":
            for layer in self.layers:
                layer.use_encoder_matmuls()

    @classmethod
    def from_checkpoint(cls, checkpoint, loader: WeightLoader, ops) -> "Model":
        cfg = config_from_dict(cls.config_class, dict(checkpoint.config))
        # BertModel saves its tensors bare; BertFor* (and some exports) under "bert."
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in checkpoint.tensors \
            else ""
        return cls(cfg, loader, ops, prefix)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_tokens(self) -> int:
        return self.config.max_position_embeddings

    def encode(self, tokens: Any, mask: Any) -> np.ndarray:
        """Final hidden states float32 [B, T, H] of tokens [B, T], right-padded: mask [B, T]
        is 1 for a real token and 0 for padding (padding is not computed: its rows are 0)."""
        ops = self.ops
        tokens = check_tokens(tokens, self.config.vocab_size)
        mask = np.asarray(mask)
        b, t = tokens.shape
        if mask.shape != (b, t):
            raise ValueError(f"mask has shape {mask.shape}, expected {(b, t)} like tokens")
        if t > self.config.max_position_embeddings:
            raise ValueError(f"{t} tokens exceed the model's {self.config.max_position_embeddings}"
                             f" positions (max_position_embeddings)")
        real = mask.astype(bool)
        lengths = real.sum(axis=1).astype(np.int64)
        if np.any(real != (np.arange(t)[None, :] < lengths[:, None])) or np.any(lengths < 1):
            raise ValueError("mask must mark a non-empty prefix of each row (right padding)")
        positions = np.broadcast_to(np.arange(t), (b, t))[real]
        x = ops.embed(self.word_embeddings, tokens[real])
        x += self.position_embeddings[positions]
        x += self.token_type_embeddings[0]
        x = ops.layer_norm(x, *self.embed_norm, self.config.layer_norm_eps)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for layer in self.layers:
            x = layer(x, offsets, ops)
        out = np.zeros((b, t, x.shape[1]), np.float32)
        out[real] = x
        return out
