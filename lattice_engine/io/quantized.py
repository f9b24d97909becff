"""Quantized checkpoints: what `lattice quantize` writes and how they load again.

A quantized checkpoint is an HF-style folder: `model.safetensors`, the tokenizer files and
a `config.json` with a `quantization` section:

    "quantization": {"format_version": 1, "method": "q4_asym", "group_size": 32,
                     "formats": {tensor name: weight format, ...},
                     "packed": {tensor name: [rows, cols], ...}}

Matrices in a block format (q8_0, q4_*) are stored as uint8 [rows, row_bytes] exactly as
they sit in memory, and listed in `packed` with their logical shape; f32 / f16 matrices
and vectors are ordinary float tensors. Loading hands the packed ones out as
`PackedTensor`s, and `loading.load` keeps every stored format, so a reload is bit-identical
and nothing is re-quantized.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import CheckpointError
from .checkpoint import PackedTensor

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
FLOAT_FORMATS = {"f32": np.float32, "f16": np.float16}


def wrap_packed(section: Any, tensors: dict[str, Callable], shapes: dict[str, tuple],
                folder: Path) -> None:
    """Turn the uint8 tensors listed in a config's `quantization` section into
    `PackedTensor` loaders with their logical shapes (in place)."""
    where = f"{folder / 'config.json'}"
    if not isinstance(section, dict) or section.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: the quantization section is not format_version {FORMAT_VERSION} "
            f"({section!r:.80}); re-run `lattice quantize` with this version")
    formats, packed = section.get("formats"), section.get("packed")
    if not isinstance(formats, dict) or not isinstance(packed, dict):
        raise CheckpointError(f"{where}: the quantization section needs 'formats' and 'packed' "
                              f"tables; the file is corrupt, re-run `lattice quantize`")
    for name, shape in packed.items():
        if name not in tensors:
            raise CheckpointError(f"{folder}: tensor {name!r} is listed in the quantization "
                                  f"section but missing from the weights; the checkpoint is "
                                  f"incomplete, re-run `lattice quantize`")
        if name not in formats or not (isinstance(shape, list) and len(shape) == 2):
            raise CheckpointError(f"{where}: packed tensor {name!r} needs a format and a "
                                  f"[rows, cols] shape, got {formats.get(name)!r} {shape!r}")
        stored = tuple(shapes[name])
        if len(stored) != 2 or stored[0] != shape[0]:
            raise CheckpointError(f"{folder}: packed tensor {name!r} is stored as {stored}, "
                                  f"which cannot hold a {tuple(shape)} matrix")

        def load(raw=tensors[name], fmt=formats[name], shape=tuple(shape), name=name):
            data = raw()
            if data.dtype != np.uint8:
                raise CheckpointError(f"{folder}: packed tensor {name!r} must be U8, is "
                                      f"{data.dtype}")
            return PackedTensor(format=fmt, shape=shape, data=data)

        tensors[name] = load
        shapes[name] = tuple(shape)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_quantized(out: Path, config: Mapping[str, Any], matrices: Mapping[str, Any],
                   vectors: Mapping[str, np.ndarray], method: str, group_size,
                   tokenizer=None, tokenizer_config=None, generation_config=None) -> Path:
    """Write a quantized checkpoint folder (see the module docstring); returns it.

    `matrices` are `PackedMatrix` by HF name, `vectors` float arrays by HF name.
    """
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    formats: dict[str, str] = {}
    packed: dict[str, list[int]] = {}
    for name, m in matrices.items():
        formats[name] = m.format.name
        if m.format.name in FLOAT_FORMATS:
            arrays[name] = np.ascontiguousarray(m.data).view(FLOAT_FORMATS[m.format.name]) \
                .reshape(m.rows, m.cols)
        else:
            arrays[name] = np.ascontiguousarray(m.data)
            packed[name] = [m.rows, m.cols]
    for name, v in vectors.items():
        arrays[name] = np.ascontiguousarray(v, dtype=np.float32)
    section = {"format_version": FORMAT_VERSION, "method": method, "group_size": group_size,
               "formats": formats, "packed": packed}
    cfg = dict(config)
    cfg["quantization"] = section
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(arrays, str(p),
                                                          metadata={"format": "pt"}))

    def dump(obj):
        return lambda p: p.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")

    if tokenizer is not None:
        _atomic_write(out / "tokenizer.json", lambda p: tokenizer.save(str(p)))
    if tokenizer_config:
        _atomic_write(out / "tokenizer_config.json", dump(tokenizer_config))
    if generation_config:
        _atomic_write(out / "generation_config.json", dump(generation_config))
    # config.json last: a folder without it is visibly incomplete
    _atomic_write(out / "config.json", dump(cfg))
    return out
