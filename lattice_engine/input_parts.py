"""Images in chat messages: OpenAI content parts -> template messages + image bytes.

A message's content may be a list of parts: {"type": "text", "text": ...} and
{"type": "image_url", "image_url": {"url": ...}} (the OpenAI form; `image_url` may also be
the URL string itself), or {"type": "image", "image": bytes} from Python callers. URLs:
`data:image/png|jpeg|webp;base64,...` inline images; `file:` URLs only below the folder the
config allows (`[inputs] local_folder`); remote `http(s)` URLs are refused (the engine
never fetches from the network on a request's behalf). Text-only part lists are joined
into one string, as before, so text prompts render exactly as they always did.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlparse

from .errors import RequestError
from .multimodal import InputLimits

DATA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")
IMAGE_PART = {"type": "image"}  # what the chat template sees in place of an image


def has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list) and
        any(isinstance(p, dict) and p.get("type") in ("image_url", "image")
            for p in m["content"]) for m in messages)


def split_images(messages: list[dict[str, Any]],
                 limits: InputLimits) -> tuple[list[dict[str, Any]], list[bytes]]:
    """(messages for the chat template, the images' bytes in prompt order). Each image part
    becomes {"type": "image"}, which Qwen-VL templates render as one placeholder."""
    out, images = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", "image"):
                if len(images) >= limits.max_images:
                    raise RequestError(f"{where}: more than {limits.max_images} image(s) in one "
                                       f"request ([inputs] max_images); send fewer")
                images.append(image_bytes(part, where, limits))
                parts.append(dict(IMAGE_PART))
            else:
                raise RequestError(f"{where}: a content part must be {{'type': 'text', 'text': "
                                   f"...}} or {{'type': 'image_url', 'image_url': {{'url': "
                                   f"...}}}}; got type {kind!r}")
        out.append(dict(m, content=parts))
    return out, images


def image_bytes(part: dict[str, Any], where: str, limits: InputLimits) -> bytes:
    if part.get("type") == "image":
        data = part.get("image")
        if isinstance(data, (bytes, bytearray)):
            return _checked_size(bytes(data), where, limits)
        if isinstance(data, str):
            return url_bytes(data, where, limits)
        raise RequestError(f"{where}: an 'image' part needs 'image' as bytes or a URL")
    ref = part.get("image_url")
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where}: image_url needs a 'url' string (a data: URL)")
    return url_bytes(url, where, limits)


def url_bytes(url: str, where: str, limits: InputLimits) -> bytes:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _data_url(url, where, limits)
    if scheme in ("http", "https", "ftp"):
        raise RequestError(f"{where}: remote image URLs ({scheme}://) are not fetched; send the "
                           f"image inline as a data:image/png;base64,... URL")
    if scheme == "file" or not scheme:
        return _local_file(url, where, limits)
    raise RequestError(f"{where}: unsupported image URL scheme {scheme!r}; send a data: URL")


def _data_url(url: str, where: str, limits: InputLimits) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise RequestError(f"{where}: a data: URL needs a comma before its data")
    media = head[5:].split(";")
    mime = media[0].strip().lower()
    if mime not in DATA_TYPES:
        raise RequestError(f"{where}: unsupported image type {mime or '(none)'!r}; supported: "
                           f"image/png, image/jpeg, image/webp")
    if "base64" not in [p.strip().lower() for p in media[1:]]:
        raise RequestError(f"{where}: the data: URL must be base64 (data:{mime};base64,...)")
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise RequestError(f"{where}: the image has about {len(payload) * 3 // 4} bytes; the "
                           f"limit is {limits.max_bytes} ([inputs] max_bytes); send a "
                           f"smaller image")
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data: URL is not valid base64") from None
    return _checked_size(data, where, limits)


def _local_file(url: str, where: str, limits: InputLimits) -> bytes:
    folder: Optional[str] = limits.local_folder
    if not folder:
        raise RequestError(f"{where}: local image paths are refused; send a data: URL, or "
                           f"allow a folder with [inputs] local_folder")
    path = Path(unquote(urlparse(url).path) if url.lower().startswith("file:") else url)
    root = Path(folder).resolve()
    try:
        resolved = path.resolve()
        resolved.relative_to(root)
    except (ValueError, OSError):
        raise RequestError(f"{where}: {str(path)!r} is outside the allowed folder "
                           f"{str(root)!r} ([inputs] local_folder)") from None
    if not resolved.is_file():
        raise RequestError(f"{where}: no image file at {str(resolved)!r}")
    if resolved.stat().st_size > limits.max_bytes:
        raise RequestError(f"{where}: the image has {resolved.stat().st_size} bytes; the "
                           f"limit is {limits.max_bytes} ([inputs] max_bytes)")
    return resolved.read_bytes()


def _checked_size(data: bytes, where: str, limits: InputLimits) -> bytes:
    if len(data) > limits.max_bytes:
        raise RequestError(f"{where}: the image has {len(data)} bytes; the limit is "
                           f"{limits.max_bytes} ([inputs] max_bytes); send a smaller image")
    if not data:
        raise RequestError(f"{where}: the image is empty")
    return data
