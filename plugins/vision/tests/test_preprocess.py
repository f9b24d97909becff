"""Preprocessing equals transformers' Qwen2VLImageProcessorPil (reference arrays made by
scripts/make_vision_fixtures.py), and bad images are refused with a reason."""

import io
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from lattice_engine.errors import RequestError
from lattice_engine.multimodal import InputLimits
from lattice_vision.preprocess import ImageSettings, decode_image, image_patches, smart_resize

from conftest import FIXTURES

PRE = FIXTURES / "preprocess"
SETTINGS = json.loads((PRE / "settings.json").read_text())


@pytest.mark.parametrize("index", range(len(SETTINGS["images"])))
def test_pixel_values_equal_the_hf_processor(index):
    name = SETTINGS["images"][index]
    ref = load_file(str(PRE / "reference.safetensors"))
    settings = ImageSettings.from_configs({}, SETTINGS["processor"])
    patches, grid = image_patches(decode_image((PRE / name).read_bytes()), settings)
    assert grid == tuple(ref[f"grid_{index}"].tolist())
    want = ref[f"pixel_values_{index}"]
    assert patches.shape == want.shape
    assert np.abs(patches - want).max() <= 1e-6


def test_fixture_images_cover_sizes_and_modes():
    from PIL import Image
    seen = {(Image.open(PRE / n).mode, Image.open(PRE / n).size) for n in SETTINGS["images"]}
    assert {"RGB", "RGBA", "L"} <= {m for m, _ in seen} and len({s for _, s in seen}) == 5


def test_smart_resize_bounds():
    assert smart_resize(23, 37, 8, 256, 2304) == (24, 40)
    h, w = smart_resize(30, 100, 8, 256, 2304)
    assert h * w <= 2304 and h % 8 == 0 and w % 8 == 0
    h, w = smart_resize(13, 9, 8, 256, 2304)
    assert h * w >= 256
    with pytest.raises(RequestError, match="aspect ratio"):
        smart_resize(1, 300, 8, 256, 2304)


def png_bytes(size=(20, 10), fmt="PNG"):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_truncated_image_is_refused():
    data = (PRE / "photo.jpg").read_bytes()
    with pytest.raises(RequestError, match="corrupt or truncated"):
        decode_image(data[:len(data) // 2])


def test_garbage_is_refused():
    with pytest.raises(RequestError, match="not a PNG, JPEG or WebP"):
        decode_image(b"this is not an image at all")


def test_other_formats_are_refused():
    with pytest.raises(RequestError, match="a GIF image; supported formats: PNG, JPEG, WEBP"):
        decode_image(png_bytes(fmt="GIF"))


def test_limits_on_bytes_and_pixels():
    data = png_bytes((20, 10))
    with pytest.raises(RequestError, match=r"limit is 10 \(\[inputs\] max_bytes\)"):
        decode_image(data, InputLimits(max_bytes=10))
    with pytest.raises(RequestError, match=r"20x10 = 200 pixels; the limit is 199"):
        decode_image(data, InputLimits(max_pixels=199))
    assert decode_image(data, InputLimits(max_pixels=200)).size == (20, 10)
