"""The Qwen3-VL / Qwen3.5 vision tower on the core's op sets (numpy `lattice_engine.ops`,
the reference, or the C `lattice_engine.kernels`): Conv3d patch embedding as a matmul, learned position embeddings resampled
(bilinear, corners aligned) to the image's patch grid, 2-D rotary attention blocks with a
GELU-tanh MLP, the 2x2 patch merger, and Qwen3-VL's deepstack mergers (features of chosen
blocks, added to the text model's first layers).

Rows are patches in merge-block order (`preprocess.patchify`): every 4 consecutive rows
form one merged token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from lattice_engine.errors import CheckpointError
from lattice_engine.kernels import encoder
from lattice_engine.quant.core_formats import F32
from lattice_engine.quant.formats import PackedMatrix, pack


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    deepstack_visual_indexes: tuple = ()
    rope_theta: float = 10000.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VisionConfig":
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["deepstack_visual_indexes"] = tuple(d.get("deepstack_visual_indexes") or ())
        kwargs["rope_theta"] = float((d.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        missing = [k for k in ("depth", "hidden_size", "intermediate_size", "num_heads",
                               "out_hidden_size") if k not in kwargs]
        if missing:
            raise CheckpointError(f"vision_config lacks {', '.join(missing)}")
        cfg = cls(**kwargs)
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise CheckpointError(f"vision hidden_act {cfg.hidden_act!r} is not supported; "
                                  f"supported: gelu_pytorch_tanh, gelu")
        if cfg.hidden_size % cfg.num_heads or (cfg.hidden_size // cfg.num_heads) % 4:
            raise CheckpointError(f"vision hidden_size {cfg.hidden_size} / num_heads "
                                  f"{cfg.num_heads} must be a multiple of 4 (2-D rotary)")
        side = math.isqrt(cfg.num_position_embeddings)
        if side * side != cfg.num_position_embeddings:
            raise CheckpointError(f"num_position_embeddings {cfg.num_position_embeddings} is "
                                  f"not a square")
        return cfg

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


# --- the pieces ----------------------------------------------------------------------------

def position_rows(grid_h: int, grid_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch of a frame, in merge-block order."""
    i = np.arange(grid_h * grid_w)
    blocks_w = grid_w // merge
    in_col, in_row = i % merge, (i // merge) % merge
    block_col, block_row = (i // (merge * merge)) % blocks_w, i // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col


def interpolation_taps(index: np.ndarray, size: int, side: int):
    """Bilinear taps (floor, floor + 1, clamped) and weights on one axis, corners aligned:
    target index i of `size` maps to i * (side - 1) / (size - 1) in the table."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - np.arange(2,
                         dtype=np.float32)), np.float32(0))
    return np.clip(taps, 0, side - 1), weights.astype(np.float32)


def rotary_tables(rows: np.ndarray, cols: np.ndarray, head_dim: int,
                  theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [N, head_dim / 2]: the first quarter of the head turns with the row, the
    second with the column (rotate-half pairing over the whole head, `ops.rope`)."""
    spatial = head_dim // 2
    inv_freq = (1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
                ).astype(np.float32)
    angles = np.concatenate([rows.astype(np.float32)[:, None] * inv_freq,
                             cols.astype(np.float32)[:, None] * inv_freq], axis=1)
    return np.cos(angles), np.sin(angles)


@dataclass
class Linear:
    weight: Optional[PackedMatrix]  # [out, in], f32; None when `fast` holds it
    bias: Optional[np.ndarray]
    # or the weight packed (as many bytes) for the machine's float32 encoder matmul, when
    # the tower runs on the C kernels (lattice_engine.kernels.encoder, without bf16x3:
    # float32 in the BLAS order on AVX2): the tower's passes are many-row, with no decode
    # rows whose bits must match
    fast: object = None

    def __call__(self, x: np.ndarray, ops) -> np.ndarray:
        if self.fast is not None:
            y = encoder.matmul(x, self.fast)
        else:
            y = ops.matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


@dataclass
class Merger:
    """LayerNorm (per patch, or over the merged group with `post_shuffle`), then
    fc1 -> GELU (erf) -> fc2 on each group of merge^2 patches."""

    norm_w: np.ndarray
    norm_b: np.ndarray
    fc1: Linear
    fc2: Linear
    post_shuffle: bool
    unit: int  # merge^2

    def __call__(self, x: np.ndarray, ops) -> np.ndarray:
        n, d = x.shape
        if self.post_shuffle:
            x = ops.layer_norm(x.reshape(n // self.unit, d * self.unit), self.norm_w,
                               self.norm_b, 1e-6)
        else:
            x = ops.layer_norm(x, self.norm_w, self.norm_b, 1e-6).reshape(n // self.unit,
                                                                         d * self.unit)
        return self.fc2(ops.gelu(self.fc1(x, ops), tanh=False), ops)


@dataclass
class Block:
    norm1: tuple
    norm2: tuple
    qkv: Linear
    proj: Linear
    fc1: Linear
    fc2: Linear


@dataclass
class VisionTower:
    """Weights of `model.visual.*` and the forward, on `ops` (`lattice_engine.ops`, the
    numpy reference, or `lattice_engine.kernels`: the C matmul, attention, rope, LayerNorm
    and GELU kernels)."""

    config: VisionConfig
    ops: object
    patch: Linear             # the Conv3d as [D, C * tp * p * p]
    pos_embed: np.ndarray     # [num_position_embeddings, D]
    blocks: list = field(default_factory=list)
    merger: Optional[Merger] = None
    deepstack: list = field(default_factory=list)

    @classmethod
    def from_tensors(cls, config: VisionConfig, get, ops=None) -> "VisionTower":
        """`get(name, shape)` returns the float32 tensor `name` (without the
        model.visual. prefix), checked against `shape`."""
        from lattice_engine import ops as numpy_ops
        c = config
        d, inner = c.hidden_size, c.intermediate_size

        native = getattr(ops, "name", "") == "native"

        def linear(name, out, inp, weight=None):
            w = get(f"{name}.weight", (out, inp)) if weight is None else weight
            fast = None
            if native:
                fast = encoder.weight(np.asarray(w, np.float32), bf16x3=False)
            return Linear(None if fast is not None else pack(F32, f"{name}.weight", w),
                          get(f"{name}.bias", (out,)), fast)

        def merger(name, post_shuffle):
            width = d * c.spatial_merge_size ** 2
            norm = width if post_shuffle else d
            return Merger(get(f"{name}.norm.weight", (norm,)), get(f"{name}.norm.bias", (norm,)),
                          linear(f"{name}.linear_fc1", width, width),
                          linear(f"{name}.linear_fc2", c.out_hidden_size, width),
                          post_shuffle, c.spatial_merge_size ** 2)

        conv = get("patch_embed.proj.weight", (d, c.in_channels, c.temporal_patch_size,
                                               c.patch_size, c.patch_size))
        tower = cls(c, ops or numpy_ops,
                    linear("patch_embed.proj", d, c.patch_dim, conv.reshape(d, -1)),
                    get("pos_embed.weight", (c.num_position_embeddings, d)))
        for i in range(c.depth):
            p = f"blocks.{i}"
            tower.blocks.append(Block(
                (get(f"{p}.norm1.weight", (d,)), get(f"{p}.norm1.bias", (d,))),
                (get(f"{p}.norm2.weight", (d,)), get(f"{p}.norm2.bias", (d,))),
                linear(f"{p}.attn.qkv", 3 * d, d), linear(f"{p}.attn.proj", d, d),
                linear(f"{p}.mlp.linear_fc1", inner, d), linear(f"{p}.mlp.linear_fc2", d, inner)))
        tower.merger = merger("merger", False)
        tower.deepstack = [merger(f"deepstack_merger_list.{j}", True)
                           for j in range(len(c.deepstack_visual_indexes))]
        return tower

    def position_embeddings(self, grid_h: int, grid_w: int) -> np.ndarray:
        """The learned table resampled to the frame's grid: [gh * gw, D]."""
        side = math.isqrt(self.config.num_position_embeddings)
        rows, cols = position_rows(grid_h, grid_w, self.config.spatial_merge_size)
        h_taps, h_w = interpolation_taps(rows, grid_h, side)
        w_taps, w_w = interpolation_taps(cols, grid_w, side)
        index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        return (self.pos_embed[index] * weight[:, :, None]).sum(1)

    def forward(self, pixels: np.ndarray, grid: tuple[int, int, int]):
        """pixels [t * gh * gw, patch_dim] of one image -> (merged tokens [n, out],
        deepstack features [n, out] per deepstack index)."""
        steps = self.forward_steps(pixels, grid)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def forward_steps(self, pixels: np.ndarray, grid: tuple[int, int, int]):
        """`forward` as a generator in 1 + depth units (the patch embedding, then one block
        each, the merger with the last): it yields between units, so a scheduler runs one
        per batch step; its return value is forward's."""
        c, ops = self.config, self.ops
        t, gh, gw = grid
        if pixels.shape != (t * gh * gw, c.patch_dim):
            raise ValueError(f"pixels {pixels.shape} do not match grid {grid} "
                             f"(patch_dim {c.patch_dim})")
        x = self.patch(np.ascontiguousarray(pixels, dtype=np.float32), ops)
        x = x + np.tile(self.position_embeddings(gh, gw), (t, 1))
        rows, cols = position_rows(gh, gw, c.spatial_merge_size)
        cos, sin = rotary_tables(np.tile(rows, t), np.tile(cols, t), c.head_dim, c.rope_theta)
        frame = gh * gw
        frame_offsets = np.arange(0, x.shape[0] + 1, frame, dtype=np.int64)
        tanh_approx = c.hidden_act == "gelu_pytorch_tanh"
        features = []
        yield
        for i, blk in enumerate(self.blocks):
            h = ops.layer_norm(x, *blk.norm1, 1e-6)
            qkv = blk.qkv(h, ops).reshape(1, -1, 3, c.num_heads, c.head_dim)
            q = ops.rope(qkv[:, :, 0], cos, sin)
            k = ops.rope(qkv[:, :, 1], cos, sin)
            v = np.ascontiguousarray(qkv[:, :, 2])
            # each frame attends to itself, every patch to every patch: the frames are
            # packed sequences of the bidirectional encoder attention
            out = ops.encoder_attention_packed(q[0], k[0], v[0], frame_offsets,
                                               c.head_dim ** -0.5)
            x = x + blk.proj(out.reshape(x.shape[0], c.hidden_size), ops)
            h = blk.fc1(ops.layer_norm(x, *blk.norm2, 1e-6), ops)
            x = x + blk.fc2(ops.gelu(h, tanh=tanh_approx), ops)
            if i in c.deepstack_visual_indexes:
                features.append(self.deepstack[c.deepstack_visual_indexes.index(i)](x, ops))
            if i + 1 < len(self.blocks):  # the merger shares the last block's unit
                yield
        return self.merger(x, ops), features
