"""The vision tower and image+text logits against transformers float32 (fixtures made by
scripts/make_vision_fixtures.py): Qwen3.5 (no deepstack) and Qwen3-VL (deepstack)."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from lattice_engine.loading import load
from lattice_engine.multimodal import ForwardInputs, expand_placeholders
from lattice_vision.encoder import LoadedQwenVision

from conftest import BACKENDS, FIXTURES

MODELS = ["qwen3_5", "qwen3_vl"]
TOL = 1e-4  # the acceptance bound; observed max |diff| is below 3e-5


def setup(name, backend):
    loaded = load(str(FIXTURES / name), backend=backend)
    encoder = LoadedQwenVision(loaded.checkpoint)
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    return loaded.model, encoder, golden


def one_pad_per_image(ids, pad):
    """The prompt as a chat template writes it: one placeholder per image."""
    return [t for i, t in enumerate(ids) if not (t == pad and i and ids[i - 1] == pad)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_vision_tower(name, backend):
    loaded = load(str(FIXTURES / name), backend=backend)
    encoder = LoadedQwenVision(loaded.checkpoint, backend=backend)
    golden = load_file(str(FIXTURES / name / "golden.safetensors"))
    prepared = encoder.prepare((FIXTURES / name / "image.png").read_bytes())
    patches, grid = prepared.payload
    assert np.abs(patches - golden["pixel_values"]).max() <= 1e-6
    assert grid == tuple(golden["grid"].tolist())
    encoded = encoder.encode(prepared)
    assert encoded.embeds.shape == golden["vision_out"].shape
    assert np.abs(encoded.embeds - golden["vision_out"]).max() <= TOL
    deep = sorted(k for k in golden if k.startswith("deepstack_"))
    assert len(encoded.deepstack) == len(deep) == (2 if name == "qwen3_vl" else 0)
    for got, key in zip(encoded.deepstack, deep):
        assert np.abs(got - golden[key]).max() <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("chunk", [None, 7])
def test_image_prompt_logits_and_greedy(name, backend, chunk):
    model, encoder, golden = setup(name, backend)
    encoded = encoder.encode(encoder.prepare((FIXTURES / name / "image.png").read_bytes()))
    ids = golden["prompt_ids"][0].tolist()
    prompt = expand_placeholders(one_pad_per_image(ids, encoder.placeholder_id),
                                 encoder.placeholder_id, [encoded])
    assert prompt.tokens == ids
    assert np.array_equal(prompt.positions, golden["positions"])
    cache = model.make_cache(1)
    t = len(ids)
    step = chunk or t
    prefill = np.concatenate([
        model.forward(np.array([ids[s:s + step]]), cache, inputs=prompt.window(s, s + step))
        for s in range(0, t, step)], axis=1)
    assert np.abs(prefill - golden["prefill_logits"]).max() <= TOL
    token = int(prefill[0, -1].argmax())
    for s, want in enumerate(golden["decode_ids"][0]):
        assert token == want
        logits = model.forward(np.array([[token]]), cache, last_only=True,
                               inputs=ForwardInputs.shifted(t + s, 1, prompt.rope_delta))
        assert np.abs(logits[0, 0] - golden["decode_logits"][0, s]).max() <= TOL
        token = int(logits[0, 0].argmax())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_text_only_is_unchanged_bit_for_bit(name, backend):
    """Index positions given as 3-D M-RoPE positions give the 1-D forward's bits."""
    model, _, golden = setup(name, backend)
    ids = np.array([[5, 17, 33, 2, 99, 4]])
    plain, mrope = model.make_cache(1), model.make_cache(1)
    a = model.forward(ids, plain)
    b = model.forward(ids, mrope, inputs=ForwardInputs.shifted(0, 6, 0))
    assert np.array_equal(a, b)
    for k in range(3):
        tok = np.array([[int(a[0, -1].argmax()) if k == 0 else 7 + k]])
        a = model.forward(tok, plain)
        b = model.forward(tok, mrope, inputs=ForwardInputs.shifted(6 + k, 1, 0))
        assert np.array_equal(a, b)
