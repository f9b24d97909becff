"""Loading converts a matrix from its file a slice of rows at a time: no whole-tensor float
copy (tracemalloc), no file pages kept resident (the RSS high-water mark), and the same
bytes as converting the whole float tensor at once. Synthetic checkpoints, no model."""

from __future__ import annotations

import functools
import json
import struct

import numpy as np
import pytest

from lattice_engine.io.checkpoint import Checkpoint
from lattice_engine.io.safetensors_reader import open_safetensors
from lattice_engine.io.stored import FileRows, StoredTensor
from lattice_engine.models.base import WeightLoader
from lattice_engine.plugins import get_plugin_manager
from lattice_engine.quant.formats import pack
from lattice_engine.testing.memory import rss_peak_growth, traced_peak

ROWS, COLS = 16384, 1024          # 16M values: 64 MB as float32
F32_BYTES = ROWS * COLS * 4
NAME = "model.layers.0.mlp.up_proj.weight"


@functools.lru_cache(maxsize=1)
def weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, COLS), dtype=np.float32)


def to_bf16(w: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even."""
    bits = w.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, name: str, data: np.ndarray, dtype_name: str) -> None:
    header = json.dumps({name: {"dtype": dtype_name, "shape": [ROWS, COLS],
                                "data_offsets": [0, data.nbytes]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(data.tobytes())


def safetensors_checkpoint(tmp_path, dtype_name: str):
    w = weights()
    data = {"F32": w, "F16": w.astype(np.float16), "BF16": to_bf16(w)}[dtype_name]
    path = tmp_path / "model.safetensors"
    write_safetensors(path, NAME, data, dtype_name)
    loaders, shapes = open_safetensors(path)
    return Checkpoint(config={}, tensors=loaders, shapes=shapes, source=str(tmp_path))


def gguf_checkpoint(tmp_path, ggml: str):
    gguf = pytest.importorskip("gguf")
    from lattice_engine.io.gguf_file import read_gguf
    from lattice_engine.io.gguf_reader import _loader

    w = weights()
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    if ggml == "Q8_0":
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(w, q8), raw_dtype=q8)
    elif ggml in BLOCK_HALVES:  # a type the gguf package cannot quantize: random blocks
        qtype = gguf.GGMLQuantizationType[ggml]
        writer.add_tensor("blk.0.ffn_up.weight", random_blocks(gguf, qtype), raw_dtype=qtype)
    else:
        writer.add_tensor("blk.0.ffn_up.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _, tensors = read_gguf(path)
    formats = {0: "f32", 1: "f16", 8: "q8_0"}
    (t,) = tensors
    loader = _loader(path, t, formats, None, t.shape)
    return Checkpoint(config={}, tensors={NAME: loader}, shapes={NAME: t.shape},
                      source=str(path))


# ggml block types loaded through their block bytes -> byte offsets of their f16 scales
BLOCK_HALVES = {"Q4_K": (0, 2), "Q6_K": (208,), "Q5_0": (0,)}


def random_blocks(gguf, qtype) -> np.ndarray:
    """ROWS x COLS values of `qtype` as random blocks with finite scales."""
    values, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, (ROWS, COLS // values, nbytes), dtype=np.uint8)
    for off in BLOCK_HALVES[qtype.name]:
        halves = (rng.standard_normal((ROWS, COLS // values)) * 0.01).astype(np.float16)
        raw[:, :, off:off + 2] = halves.view(np.uint8).reshape(ROWS, COLS // values, 2)
    return raw.reshape(ROWS, -1)


def weight_loader(checkpoint, method: str) -> WeightLoader:
    registry = get_plugin_manager().registry
    return WeightLoader(checkpoint, registry.get("quant_methods", method),
                        registry.items["weight_formats"])


def whole_conversion(checkpoint, fmt_name: str) -> np.ndarray:
    """The reference: the whole tensor as float32, packed at once."""
    registry = get_plugin_manager().registry
    raw = checkpoint.tensors[NAME]()
    if hasattr(raw, "format"):  # a PackedTensor
        raw = registry.get("weight_formats", raw.format).to_float(raw.data, COLS)
    fmt = registry.get("weight_formats", fmt_name)
    return pack(fmt, NAME, np.asarray(raw, dtype=np.float32)).data


CASES = [("safetensors", "F32", "q8_0"), ("safetensors", "F16", "q8_0"),
         ("safetensors", "BF16", "q8_0"), ("safetensors", "BF16", "f16"),
         ("safetensors", "F32", "f16"), ("gguf", "F32", "q8_0"), ("gguf", "Q8_0", "f16"),
         # a Q4_K_M file's block types kept as q8_0: one native pass from the blocks
         # (quant.core_formats.requantizer), the bytes of the float round trip
         ("gguf", "Q4_K", "q8_0"), ("gguf", "Q6_K", "q8_0"), ("gguf", "Q5_0", "q8_0")]


def make_checkpoint(tmp_path, source: str, stored: str):
    return (safetensors_checkpoint(tmp_path, stored) if source == "safetensors"
            else gguf_checkpoint(tmp_path, stored))


@pytest.mark.parametrize("source,stored,method", CASES)
def test_conversion_at_load_never_holds_a_whole_float_copy(tmp_path, source, stored, method):
    checkpoint = make_checkpoint(tmp_path, source, stored)
    assert isinstance(checkpoint.tensors[NAME], StoredTensor)
    loader = weight_loader(checkpoint, method)
    m, peak = traced_peak(lambda: loader.matrix(NAME, (ROWS, COLS), "linear"))
    # a whole float32 copy is F32_BYTES; the slices are a sixteenth of it
    assert peak < F32_BYTES / 4, f"{source} {stored} -> {method}: traced peak {peak >> 20} MB"
    assert m.format.name == method
    np.testing.assert_array_equal(m.data, whole_conversion(checkpoint, method))


@pytest.mark.parametrize("source,stored,method", [c for c in CASES if c[2] == "q8_0"] +
                         [("gguf", "Q8_0", "f16")])
def test_conversion_at_load_keeps_no_file_pages_resident(tmp_path, source, stored, method):
    """A memory map touched whole, or the file read whole into an anonymous buffer, shows
    in the RSS high-water mark though tracemalloc cannot see it."""
    checkpoint = make_checkpoint(tmp_path, source, stored)
    loader = weight_loader(checkpoint, method)
    m, growth = rss_peak_growth(lambda: loader.matrix(NAME, (ROWS, COLS), "linear"))
    if growth is None:
        pytest.skip("this kernel cannot reset the RSS high-water mark")
    assert growth < m.nbytes + F32_BYTES / 4, \
        f"{source} {stored} -> {method}: RSS rose {growth >> 20} MB for {m.nbytes >> 20} MB packed"


def test_weights_kept_in_their_stored_format_are_not_converted(tmp_path):
    """f32 -> f32 stays a view of the mapped file (no copy at all)."""
    checkpoint = safetensors_checkpoint(tmp_path, "F32")
    m = weight_loader(checkpoint, "f32").matrix(NAME, (ROWS, COLS), "linear")
    assert isinstance(m.data.base, np.memmap) or isinstance(m.data.base.base, np.memmap) or \
        not m.data.flags.owndata
    np.testing.assert_array_equal(m.data.view(np.float32), weights())


def test_file_rows_read_row_slices(tmp_path):
    checkpoint = safetensors_checkpoint(tmp_path, "F16")
    rows = checkpoint.tensors[NAME].rows()
    assert isinstance(rows, FileRows) and rows.shape == (ROWS, COLS)
    want = weights().astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(rows[5:9], want[5:9])
    np.testing.assert_array_equal(rows[ROWS - 2:ROWS + 5], want[ROWS - 2:])
    assert rows[7:7].shape == (0, COLS)
    with pytest.raises(TypeError, match="contiguous row slice"):
        rows[::2]
