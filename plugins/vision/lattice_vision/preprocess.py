"""Image bytes -> pixel patches, equal to transformers' Qwen2-VL image processor (the Pillow
backend, which Qwen3-VL and Qwen3.5 use).

Steps, as the processor does them: decode; composite any transparency onto white and
convert to RGB; resize (bicubic, Pillow) to a size divisible by patch * merge whose pixel
count lies in [min_pixels, max_pixels] (`smart_resize`); rescale by 1/255 (in float64, then
float32); normalize by mean / std (float32); cut into patches in merge-block order, each
patch flattened as (channel, time, row, col) with the frame repeated to fill the temporal
patch.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from lattice_engine.errors import RequestError
from lattice_engine.multimodal import InputLimits

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageSettings:
    """The preprocessing of one checkpoint (its `preprocessor_config.json`, with the
    defaults of the released Qwen3-VL / Qwen3.5 processors)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_configs(cls, vision_config: Mapping[str, Any],
                     preprocessor: Mapping[str, Any]) -> "ImageSettings":
        size = preprocessor.get("size") or {}
        base = cls()
        return cls(
            patch_size=int(preprocessor.get("patch_size", vision_config.get("patch_size",
                                                                            base.patch_size))),
            temporal_patch_size=int(preprocessor.get(
                "temporal_patch_size", vision_config.get("temporal_patch_size",
                                                         base.temporal_patch_size))),
            merge_size=int(preprocessor.get("merge_size", vision_config.get(
                "spatial_merge_size", base.merge_size))),
            min_pixels=int(preprocessor.get("min_pixels", size.get("shortest_edge",
                                                                   base.min_pixels))),
            max_pixels=int(preprocessor.get("max_pixels", size.get("longest_edge",
                                                                   base.max_pixels))),
            mean=tuple(float(v) for v in preprocessor.get("image_mean", base.mean)),
            std=tuple(float(v) for v in preprocessor.get("image_std", base.std)),
            rescale_factor=float(preprocessor.get("rescale_factor", base.rescale_factor)))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def fingerprint(self) -> str:
        return repr(self)


def smart_resize(height: int, width: int, factor: int, min_pixels: int,
                 max_pixels: int) -> tuple[int, int]:
    """The (height, width) the processor resizes to: multiples of `factor`, close to the
    aspect ratio, pixel count within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise RequestError(f"the image is {width}x{height}: an aspect ratio above 200 cannot "
                           f"be encoded; crop it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sniff_format(data: bytes):
    """PNG, JPEG or WEBP from the file's magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image(data: bytes, limits: InputLimits = InputLimits()):
    """A fully decoded Pillow image of `data` (PNG, JPEG or WebP), or a RequestError that
    says what is wrong: too many bytes, another format, too many pixels, a corrupt or
    truncated file. Only those three decoders ever see the bytes."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise RequestError(f"the image has {len(data)} bytes; the limit is {limits.max_bytes} "
                           f"([inputs] max_bytes); send a smaller image")
    fmt = sniff_format(data)
    if fmt is None:
        other = next((name for magic, name in ((b"GIF8", "GIF"), (b"BM", "BMP"),
                                                (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))
                      if data.startswith(magic)), None)
        what = f"a {other} image" if other else f"not a PNG, JPEG or WebP image (it starts " \
            f"with {data[:8]!r})"
        raise RequestError(f"the image data is {what}; supported formats: "
                           f"{', '.join(FORMATS)}")
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(f"the {fmt} image declares far more pixels than the limit "
                           f"{limits.max_pixels} ([inputs] max_pixels); downscale it") from None
    except Exception as exc:  # Pillow raises many types for a broken header
        raise RequestError(f"the {fmt} image is corrupt or truncated ({exc}); send the whole "
                           f"file") from None
    if width * height > limits.max_pixels:
        raise RequestError(f"the image is {width}x{height} = {width * height} pixels; the "
                           f"limit is {limits.max_pixels} ([inputs] max_pixels); downscale it")
    if width < 1 or height < 1:
        raise RequestError(f"the image is {width}x{height}; it has no pixels")
    try:
        image.load()
    except Exception as exc:
        raise RequestError(f"the {fmt} image is corrupt or truncated ({exc}); send the whole "
                           f"file") from None
    return image


def to_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3]: transparency composited onto white, as the processor does."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(image.convert("RGB"))


def image_patches(image, settings: ImageSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """pixel patches float32 [gh * gw, 3 * tp * p * p] and the grid (1, gh, gw) of a
    decoded Pillow image."""
    from PIL import Image

    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    rh, rw = smart_resize(height, width, settings.factor, settings.min_pixels,
                          settings.max_pixels)
    resized = np.array(Image.fromarray(rgb).resize((rw, rh), resample=Image.BICUBIC))
    chw = np.moveaxis(resized, -1, 0)
    pixels = (chw.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    mean = np.asarray(settings.mean, np.float32)[:, None, None]
    std = np.asarray(settings.std, np.float32)[:, None, None]
    pixels = (pixels - mean) / std
    return patchify(pixels, settings)


def patchify(pixels: np.ndarray, settings: ImageSettings) -> tuple[np.ndarray, tuple]:
    """[C, H, W] -> [gh * gw, C * tp * p * p] in merge-block order (block row, block col,
    row in block, col in block), each patch (channel, time, row, col)."""
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    c, h, w = pixels.shape
    gh, gw = h // p, w // p
    blocks = pixels.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    frames = np.broadcast_to(blocks[:, :, :, :, :, None], (*blocks.shape[:5], tp, p, p))
    return np.ascontiguousarray(frames.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)


def content_key(data: bytes, settings: ImageSettings) -> str:
    """Prefix-cache identity of an image: its bytes and the preprocessing applied."""
    digest = hashlib.sha256(data)
    digest.update(settings.fingerprint().encode())
    return "image:" + digest.hexdigest()
