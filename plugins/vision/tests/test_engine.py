"""Images through the engine: Engine.chat, continuous batching (image and text requests
in one batch, text outputs unchanged), the encoded-image / prefix cache, bad inputs."""

import pytest

from lattice_engine.engine import Engine
from lattice_engine.errors import RequestError
from lattice_engine.batching import BatchingOptions

from conftest import BACKENDS, FIXTURES, image_message, vision_model_folder

NAMES = ["qwen3_5", "qwen3_vl"]


@pytest.fixture(scope="module", params=NAMES)
def folder(request, tmp_path_factory):
    return vision_model_folder(tmp_path_factory.mktemp(request.param), request.param)


def png(name="qwen3_5"):
    return (FIXTURES / name / "image.png").read_bytes()


def run_batch(engine, requests, fresh=True, **options):
    if fresh:
        engine.start_batching(BatchingOptions(kv_cache_tokens=2048, block_size=8, **options))
    ids = [engine.add_request(messages=m, max_tokens=6, temperature=0.0) for m in requests]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_with_an_image_equals_the_batched_run(folder, backend):
    engine = Engine.load(str(folder), backend=backend)
    messages = image_message(png())
    single = engine.chat(messages, max_tokens=6, temperature=0.0)
    assert single.prompt_tokens > 15  # the image's 15 tokens and the template's
    batched = run_batch(engine, [messages])
    assert batched[0] == single.tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_requests_keep_their_tokens_next_to_image_requests(folder, backend):
    engine = Engine.load(str(folder), backend=backend)
    texts = [[{"role": "user", "content": f"tell me about number {i} please"}]
             for i in range(2)]
    alone = run_batch(engine, texts)
    images = [image_message(png(), "describe"), image_message(png(), "what colour?")]
    mixed = run_batch(engine, [images[0], texts[0], images[1], texts[1]], max_running=4,
                      interleave_tokens=4)
    assert [mixed[1], mixed[3]] == alone
    assert mixed[0] == engine.chat(images[0], max_tokens=6, temperature=0.0).tokens


def test_a_second_turn_with_the_same_image_is_not_encoded_again(folder):
    engine = Engine.load(str(folder))
    messages = image_message(png())
    run_batch(engine, [messages])
    encodes, skipped = engine.encoded_cache.encodes, engine.encoded_cache.skipped
    assert encodes == 1
    follow = messages + [{"role": "assistant", "content": "a picture"},
                         {"role": "user", "content": "and then?"}]
    engine.encoded_cache._items.clear()  # only the prefix cache can save the encode now
    run_batch(engine, [follow], fresh=False)
    assert engine.encoded_cache.encodes == encodes
    assert engine.encoded_cache.skipped == skipped + 1
    # the prefix cache served the image's tokens too (keyed by the image's content)
    runner = engine.runner
    assert runner.cache.prefix_hit_tokens >= 16


def test_different_images_do_not_share_cached_blocks(folder):
    from PIL import Image
    import io
    engine = Engine.load(str(folder))
    a = png()
    img = Image.open(io.BytesIO(a)).transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    first = run_batch(engine, [image_message(a)])
    second = run_batch(engine, [image_message(buf.getvalue())])
    fresh = Engine.load(str(folder))
    assert second[0] == fresh.chat(image_message(buf.getvalue()), max_tokens=6,
                                   temperature=0.0).tokens
    assert engine.encoded_cache.encodes == 2 and first


def test_bad_images_are_request_errors(folder):
    engine = Engine.load(str(folder))
    data = png()
    for messages, match in [
        (image_message(data[:len(data) // 2]), "corrupt or truncated"),
        (image_message(b"GIF89a" + b"\0" * 40), "a GIF image; supported formats"),
        ([{"role": "user", "content": [{"type": "image_url",
                                        "image_url": {"url": "https://example.com/a.png"}}]}],
         "remote image URLs"),
        ([{"role": "user", "content": [{"type": "image_url",
                                        "image_url": {"url": "file:///etc/passwd"}}]}],
         "local image paths are refused"),
        (image_message(data) * 5, r"more than 4 image\(s\)"),
    ]:
        with pytest.raises(RequestError, match=match):
            engine.chat(messages, max_tokens=2)


def test_an_image_for_a_text_only_model_is_refused(tmp_path):
    from lattice_engine.testing.checkpoints import write_tiny_llama
    engine = Engine.load(str(write_tiny_llama(tmp_path / "llama")))
    with pytest.raises(RequestError, match="takes no images"):
        engine.chat(image_message(png()), max_tokens=2)


def test_cli_generate_with_an_image(folder, tmp_path, capsys):
    import json
    from lattice_engine.cli import main
    image = tmp_path / "picture.png"
    image.write_bytes(png())
    code = main(["generate", "What is in this picture?", "--model", str(folder), "--image",
                 str(image), "--max-tokens", "6", "--temperature", "0", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    engine = Engine.load(str(folder))
    want = engine.chat([{"role": "user", "content": [
        {"type": "image", "image": png()},
        {"type": "text", "text": "What is in this picture?"}]}], max_tokens=6, temperature=0.0)
    assert out["text"] == want.text and out["tokens"] == len(want.tokens)
    assert main(["generate", "hi", "--model", str(folder), "--image",
                 str(tmp_path / "missing.png")]) != 0
    assert "cannot read it" in capsys.readouterr().err


def test_an_image_is_encoded_one_block_per_step_while_others_decode(folder):
    engine = Engine.load(str(folder))
    engine.start_batching(BatchingOptions(kv_cache_tokens=2048, block_size=8))
    engine.add_request(messages=[{"role": "user", "content": "hello there"}], max_tokens=40,
                       temperature=0.0)
    while not engine.runner.scheduler.running or \
            engine.runner.scheduler.running[0].prefilling:
        engine.step()
    image = engine.add_request(messages=image_message(png()), max_tokens=3, temperature=0.0)
    depth = engine.encoder.vision_config.depth
    stream = engine.runner.scheduler.running[0]
    steps_encoding = 0
    while engine.runner.encoding:
        generated = stream.num_generated
        engine.step()
        steps_encoding += 1
        # the decoding stream got its token in every step the image was being encoded
        assert stream.num_generated == generated + 1
    assert steps_encoding == depth + 1  # the patch embedding, then one step per block
    finished = set()
    while engine.has_unfinished():
        finished |= {o.request_id for o in engine.step() if o.finished}
    assert image in finished


def test_file_urls_only_below_the_allowed_folder(folder, tmp_path):
    from lattice_engine.config import InputsSection
    from lattice_engine.loading import load
    allowed = tmp_path / "images"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png())
    engine = Engine(load(str(folder)), inputs=InputsSection(local_folder=str(allowed)))

    def ask(url):
        return engine.chat([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "what is it?"}]}], max_tokens=4, temperature=0.0)

    via_file = ask((allowed / "a.png").as_uri())
    assert via_file.tokens == engine.chat(image_message(png(), "what is it?"), max_tokens=4,
                                          temperature=0.0).tokens
    (tmp_path / "secret.png").write_bytes(png())
    with pytest.raises(RequestError, match="outside the allowed folder"):
        ask((allowed / ".." / "secret.png").as_uri())
    with pytest.raises(RequestError, match="max_pixels"):
        Engine(load(str(folder)), inputs=InputsSection(max_pixels=100)).chat(
            image_message(png()), max_tokens=2)


def test_speculative_decoding_of_image_chats_equals_plain(folder):
    """Image prompts and speculative drafts in one sequence: at temperature 0 the n-gram
    drafter's verify rows (M-RoPE positions after the image, rollback of the Qwen3.5
    recurrent state) give plain decoding's tokens, alone and in a batch with text."""
    engine = Engine.load(str(folder))
    if "ngram" not in engine.plugin_manager.registry.names("drafters"):
        pytest.skip("lattice-spec-decode is not installed")
    spec = {"method": "ngram", "num_draft_tokens": 3, "adaptive": False,
            "options": {"prompt_lookup_min": 1, "prompt_lookup_max": 2}}
    messages = image_message(png(), "say it again and again")
    plain = engine.chat(messages, max_tokens=16, temperature=0.0, speculative=False)
    stats = engine.speculation_for(spec).stats
    alone = engine.chat(messages, max_tokens=16, temperature=0.0, speculative=spec)
    assert alone.tokens == plain.tokens
    assert stats.verifies > 0  # drafts were verified, not only plain steps
    text = [{"role": "user", "content": "again and again and again"}]
    text_plain = engine.chat(text, max_tokens=16, temperature=0.0, speculative=False)
    engine.start_batching(BatchingOptions(kv_cache_tokens=2048, block_size=8))
    verifies = stats.verifies
    text_spec = dict(spec, num_draft_tokens=2)  # its own counters: the image's are `stats`
    ids = [engine.add_request(messages=m, max_tokens=16, temperature=0.0, speculative=s)
           for m, s in ((messages, spec), (text, text_spec))]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    assert [tokens[i] for i in ids] == [plain.tokens, text_plain.tokens]
    assert stats.verifies > verifies  # the image request verified drafts in the batch
