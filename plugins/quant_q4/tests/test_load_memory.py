"""Quantizing to 4 bits at load goes a slice of rows at a time: no whole float32 copy of a
tensor (tracemalloc), the same bytes as quantizing the whole matrix at once."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from lattice_engine.io.checkpoint import Checkpoint
from lattice_engine.io.safetensors_reader import open_safetensors
from lattice_engine.models.base import WeightLoader
from lattice_engine.plugins import get_plugin_manager
from lattice_engine.quant.formats import pack
from lattice_engine.testing.memory import traced_peak

ROWS, COLS = 16384, 1024  # 64 MB as float32
NAME = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("dtype_name", ["F32", "BF16"])
@pytest.mark.parametrize("method", ["q4_asym", "q4_sym"])
def test_quantize_at_load_never_holds_a_whole_float_copy(tmp_path, dtype_name, method):
    w = np.random.default_rng(0).standard_normal((ROWS, COLS), dtype=np.float32)
    if dtype_name == "BF16":
        data = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated: exact in float32
        w = (data.astype(np.uint32) << 16).view(np.float32)
    else:
        data = w
    header = json.dumps({NAME: {"dtype": dtype_name, "shape": [ROWS, COLS],
                                "data_offsets": [0, data.nbytes]}}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data.tobytes())
    loaders, shapes = open_safetensors(path)
    registry = get_plugin_manager().registry
    loader = WeightLoader(Checkpoint(config={}, tensors=loaders, shapes=shapes),
                          registry.get("quant_methods", method),
                          registry.items["weight_formats"])
    m, peak = traced_peak(lambda: loader.matrix(NAME, (ROWS, COLS), "linear"))
    assert m.format.name == f"{method}_g32"
    # a whole float32 copy alone is 64 MB; a 4 MB slice and the numpy quantizer's
    # temporaries of it stay near 20
    assert peak < ROWS * COLS * 4 / 2, f"traced peak {peak >> 20} MB"
    np.testing.assert_array_equal(m.data, pack(m.format, NAME, w).data)
