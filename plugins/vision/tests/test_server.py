"""`lattice serve` with images, driven by the official openai client on loopback: a
streamed chat about an image_url data URL; 4 image and 4 text requests at once, the text
answers equal to the same requests served alone; the encoder skipped for a repeated image
(metric); bad images and images for a text-only model are 400s and the server stays up."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from lattice_engine.batching import BatchingOptions  # noqa: E402
from lattice_engine.engine import Engine  # noqa: E402
from lattice_engine.testing.server import LoopbackServer  # noqa: E402

from conftest import FIXTURES, vision_model_folder  # noqa: E402

OPTIONS = BatchingOptions(kv_cache_tokens=4096, block_size=8, max_running=8, step_tokens=64,
                          interleave_tokens=8)


def Server(folder, options=OPTIONS) -> LoopbackServer:
    return LoopbackServer(Engine.load(str(folder)), model_name="tiny", options=options)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return vision_model_folder(tmp_path_factory.mktemp("qwen3_5"), "qwen3_5")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder)
    yield s
    s.stop()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_request(text: str, data: bytes | None = None) -> list:
    data = data or (FIXTURES / "qwen3_5" / "image.png").read_bytes()
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(data)}},
        {"type": "text", "text": text}]}]


def text_request(i: int) -> list:
    return [{"role": "user", "content": f"question number {i}: what now?"}]


def stream(client, messages) -> tuple[str, list[int], str]:
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny", messages=messages,
                                                max_tokens=8, temperature=0.0,
                                                stream=True):
        choice = chunk.choices[0]
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
    return "".join(pieces), finish


def test_a_streamed_chat_about_an_image(server):
    text, finish = stream(server.client, image_request("What is shown?"))
    assert finish in ("stop", "length")
    before = server.metrics()
    assert before["lattice_image_encodes_total"] >= 1
    again, _ = stream(server.client, image_request("What is shown?"))
    assert again == text
    after = server.metrics()
    assert after["lattice_image_encodes_total"] == before["lattice_image_encodes_total"]
    assert after["lattice_image_encodes_skipped_total"] >= \
        before["lattice_image_encodes_skipped_total"] + 1


def test_four_image_and_four_text_requests_at_once(server, folder):
    alone = Server(folder)
    try:
        text_alone = [stream(alone.client, text_request(i)) for i in range(4)]
    finally:
        alone.stop()
    requests = []
    for i in range(4):
        requests.append(image_request(f"image question {i}"))
        requests.append(text_request(i))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda m: stream(server.client, m), requests))
    assert all(finish in ("stop", "length") for _, finish in results)
    assert [results[2 * i + 1] for i in range(4)] == text_alone
    assert server.app.lattice.engine.runner.cache.pool.num_used() == 0


def test_bad_images_are_400s_and_the_server_stays_up(server):
    data = (FIXTURES / "qwen3_5" / "image.png").read_bytes()
    cases = [
        (image_request("x", data[:len(data) // 2]), "corrupt or truncated"),
        (image_request("x", b"BM" + b"\0" * 64), "a BMP image; supported formats"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/gif;base64," + base64.b64encode(data).decode()}}]}],
         "unsupported image type 'image/gif'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/cat.png"}}]}], "remote image URLs"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "file:///etc/hostname"}}]}], "local image paths are refused"),
        (image_request("x") * 5, r"more than 4 image"),
    ]
    for messages, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            server.client.chat.completions.create(model="tiny", messages=messages,
                                                  max_tokens=2)
    text, finish = stream(server.client, text_request(0))
    assert finish in ("stop", "length")


def test_an_image_for_a_text_only_model_is_a_400(tmp_path):
    from lattice_engine.testing.checkpoints import write_tiny_llama
    s = Server(write_tiny_llama(tmp_path / "llama"))
    try:
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            s.client.chat.completions.create(model="tiny", messages=image_request("x"),
                                             max_tokens=2)
        assert s.client.chat.completions.create(
            model="tiny", messages=text_request(1), max_tokens=2).choices[0].finish_reason
    finally:
        s.stop()
