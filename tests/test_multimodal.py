"""Prompts with encoded inputs (lattice_engine.multimodal): placeholder expansion, the 3-D
rotary positions of Qwen-VL's get_rope_index, M-RoPE tables, and the loaded-encoder check."""

import numpy as np
import pytest

from lattice_engine import ops
from lattice_engine.contract import check_loaded_encoder
from lattice_engine.errors import PluginError, RequestError
from lattice_engine.models.base import rope_inv_freq
from lattice_engine.multimodal import (EncodedInput, ForwardInputs, MultimodalPrompt,
                                       expand_placeholders, mrope_axes, mrope_tables)

PAD = 9


def image(h, w, hidden=4, value=1.0, deep=0):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([np.zeros(h * w, np.int64), hh.ravel(), ww.ravel()])
    embeds = np.full((h * w, hidden), value, np.float32)
    return EncodedInput(embeds, grid, max(h, w), tuple(embeds + i for i in range(deep)))


def test_placeholders_expand_and_positions_follow_the_grid():
    prompt = expand_placeholders([1, 2, PAD, 3, PAD, 4], PAD, [image(2, 3), image(1, 2)])
    assert prompt.tokens == [1, 2] + [PAD] * 6 + [3] + [PAD] * 2 + [4]
    assert prompt.starts == [2, 9]
    t, h, w = prompt.positions
    # text 0, 1; image at 2: t = 2, h = 2 + row, w = 2 + col; text resumes at 2 + max(2, 3)
    assert t.tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 8]
    assert h.tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 8]
    assert w.tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]
    assert prompt.rope_delta == 8 + 1 - 12


def test_placeholder_count_must_match_the_images():
    with pytest.raises(RequestError, match="1 image placeholder token.*2 image"):
        expand_placeholders([1, PAD, 2], PAD, [image(1, 1), image(1, 1)])


def test_window_slices_rows_embeds_and_deepstack():
    prompt = expand_placeholders([1, PAD, 2], PAD, [image(2, 2, value=3.0, deep=2)])
    win = prompt.window(2, 5)  # tokens 2..4: image rows 1..3 and the text token
    assert win.rows.tolist() == [0, 1, 2]
    assert win.embeds.shape == (3, 4) and np.all(win.embeds == 3.0)
    assert [d[0, 0] for d in win.deepstack] == [3.0, 4.0]
    assert np.array_equal(win.positions, prompt.positions[:, 2:5])
    assert not prompt.window(5, 6).replaces


def test_mrope_axes_interleaved_and_contiguous():
    assert mrope_axes(8, [4, 2, 2], True).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert mrope_axes(8, [4, 2, 2], False).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="summing to 8"):
        mrope_axes(8, [4, 2, 1], True)


def test_mrope_of_text_positions_is_1d_rope_bit_for_bit():
    inv = rope_inv_freq(64, 1e7, None)
    pos = np.arange(1000, 1300)
    cos, sin = ops.rope_tables(pos, inv)
    mcos, msin = mrope_tables(np.broadcast_to(pos, (3, len(pos))), inv,
                              mrope_axes(32, [11, 11, 10], True))
    assert np.array_equal(cos, mcos) and np.array_equal(sin, msin)
    shifted = ForwardInputs.shifted(1000, 300, -7).positions
    assert np.array_equal(shifted[1], pos - 7)


def test_mrope_frequencies_follow_their_axis():
    inv = rope_inv_freq(16, 10000.0, None)
    axes = mrope_axes(8, [4, 2, 2], True)
    positions = np.array([[3], [5], [7]])
    cos, _ = mrope_tables(positions, inv, axes)
    want = np.cos(np.float32([3, 5, 7, 3, 5, 7, 3, 3]) * inv.astype(np.float32))
    assert np.array_equal(cos[0], want)


def test_overlapping_inputs_are_refused():
    with pytest.raises(ValueError, match="overlaps"):
        MultimodalPrompt([PAD] * 4, [image(1, 2), image(1, 2)], [0, 1])


def test_a_loaded_encoder_must_provide_prepare_encode_and_a_placeholder():
    class Half:
        modality = "image"
        placeholder_id = "<|image_pad|>"

        def prepare(self, data):
            return data

    with pytest.raises(PluginError, match="lacks encode, placeholder_id"):
        check_loaded_encoder("acme", Half())
