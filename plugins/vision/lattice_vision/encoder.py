"""The image encoder of Qwen3.5 and Qwen3-VL checkpoints, as the engine's contract wants it
(`lattice_engine.contract.InputEncoder` / `LoadedInputEncoder`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lattice_engine.errors import CheckpointError
from lattice_engine.multimodal import EncodedInput, InputLimits, PreparedInput

from .preprocess import ImageSettings, content_key, decode_image, image_patches
from .tower import VisionConfig, VisionTower

MODEL_TYPES = ("qwen3_5", "qwen3_vl")
PREFIXES = ("model.visual.", "visual.")


class QwenVisionEncoder:
    """Registered under `register_encoders`: runs the `model.visual.*` tower of a
    Qwen3.5 or Qwen3-VL checkpoint."""

    name = "qwen-vision"
    modality = "image"

    def supports(self, config: Mapping[str, Any]) -> bool:
        return config.get("model_type") in MODEL_TYPES and \
            isinstance(config.get("vision_config"), dict)

    def load(self, checkpoint, limits: InputLimits) -> "LoadedQwenVision":
        return LoadedQwenVision(checkpoint, limits)


def read_preprocessor_config(source: str) -> dict:
    path = Path(source) / "preprocessor_config.json" if source else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


class LoadedQwenVision:
    modality = "image"

    def __init__(self, checkpoint, limits: InputLimits = InputLimits(), *,
                 settings: ImageSettings | None = None, backend: str = "auto"):
        config = checkpoint.config
        self.limits = limits
        self.placeholder_id = int(config["image_token_id"])
        self.vision_config = VisionConfig.from_dict(config["vision_config"])
        text_hidden = int((config.get("text_config") or {}).get("hidden_size", 0))
        if text_hidden and text_hidden != self.vision_config.out_hidden_size:
            raise CheckpointError(f"vision out_hidden_size {self.vision_config.out_hidden_size} "
                                  f"differs from the text hidden_size {text_hidden}")
        self.settings = settings or ImageSettings.from_configs(
            config["vision_config"], read_preprocessor_config(checkpoint.source))
        prefix = next((p for p in PREFIXES if f"{p}patch_embed.proj.weight" in
                       checkpoint.tensors), None)
        if prefix is None:
            raise CheckpointError(f"checkpoint {checkpoint.source} has no vision tower "
                                  f"(no {PREFIXES[0]}patch_embed.proj.weight)")

        def get(name: str, shape: tuple) -> np.ndarray:
            full = prefix + name
            if full not in checkpoint.tensors:
                raise CheckpointError(f"checkpoint {checkpoint.source} lacks {full}")
            if tuple(checkpoint.shapes[full]) != tuple(shape):
                raise CheckpointError(f"{full} has shape {tuple(checkpoint.shapes[full])}; "
                                      f"the vision config implies {tuple(shape)}")
            value = checkpoint.tensors[full]()
            if not isinstance(value, np.ndarray):
                raise CheckpointError(f"{full} is stored quantized; the vision tower needs "
                                      f"float weights")
            return np.ascontiguousarray(value, dtype=np.float32)

        from lattice_engine.loading import get_ops
        self.tower = VisionTower.from_tensors(self.vision_config, get, get_ops(backend))

    def prepare(self, data: bytes) -> PreparedInput:
        """Decode (checking the limits) and preprocess; the patches wait for `encode`."""
        image = decode_image(data, self.limits)
        patches, grid = image_patches(image, self.settings)
        merge = self.settings.merge_size
        return PreparedInput(content_key(data, self.settings), text_grid(grid, merge),
                             max(grid[1], grid[2]) // merge, (patches, grid))

    def encode(self, prepared: PreparedInput) -> EncodedInput:
        steps = self.encode_steps(prepared)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def encode_steps(self, prepared: PreparedInput):
        """`encode` one vision block at a time (a generator returning the EncodedInput)."""
        patches, grid = prepared.payload
        merged, deepstack = yield from self.tower.forward_steps(patches, grid)
        return EncodedInput(merged, prepared.grid, prepared.extent, tuple(deepstack),
                            prepared.key)


def text_grid(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(t, h, w) offsets [3, n] of the merged tokens of a (t, gh, gw) patch grid, in the
    order the merger emits them."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]).astype(np.int64)
