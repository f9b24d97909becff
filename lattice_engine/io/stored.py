"""Tensors read from their file a slice of rows at a time, for conversion at load.

A checkpoint hands every tensor out through a zero-argument loader (`Checkpoint.tensors`).
The readers wrap the loader of each 2-D float or block tensor in a `StoredTensor`, which is
called like any loader (the whole tensor, as before) and can also give its rows as float32
slices (`rows()`), each read with `pread` into a buffer of its own and decoded there. The
`WeightLoader` converts a matrix whose stored type is not the format it keeps it in
(bf16 -> q8_0, f32 -> q4_asym, Q8_0 -> f16, ...) through these slices, so no whole-tensor
float32 copy is ever made, and since the bytes are read rather than memory-mapped, the
file's pages never count toward the process's resident memory: peak RSS stays near the
size of the packed weights plus one slice.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import hugepages

# decode(bytes uint8 [n, row_bytes]) -> float32 [n, cols]
Decode = Callable[[np.ndarray], np.ndarray]


class StoredTensor:
    """A checkpoint loader that can also read its rows slice by slice.

    Attributes:
        stored: the weight-format name its bytes are in when they can be used as they are
            ("f32", "f16", "q8_0", a plugin's block format), or a name no format has
            ("bf16", a GGUF type such as "q4_k") when they always need decoding.
        shape: the logical [rows, cols] float shape.
    """

    def __init__(self, load: Callable[[], Any], path: str | Path, offset: int,
                 shape: tuple[int, int], row_bytes: int, decode: Decode, stored: str):
        self._load = load
        self.path = Path(path)
        self.offset = int(offset)
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_bytes = int(row_bytes)
        self.decode = decode
        self.stored = stored

    def __call__(self) -> Any:
        return self._load()

    def rows(self) -> "FileRows":
        return FileRows(self)

    def raw_rows(self) -> "FileRows":
        """Row slices of the stored bytes themselves (uint8 [n, row_bytes]), for a format
        that re-encodes them (`WeightFormat.from_stored`)."""
        return FileRows(self, raw=True)


class MappedStack:
    """The loader of a 3-D stacked tensor (a MoE layer's experts, [E, rows, cols]) stored in
    a block type no registered format takes as it is: called, it gives the float32 values
    like any loader; `stored` (the type's name, e.g. "q4_k") and `blocks` (uint8
    [E, rows, row_bytes], a view of the memory map) let the WeightLoader re-encode each
    expert's blocks instead, where the format it keeps them in can (`WeightFormat.from_stored`)."""

    def __init__(self, load: Callable[[], Any], stored: str, blocks: np.ndarray):
        self._load, self.stored, self.blocks = load, stored, blocks

    def __call__(self) -> Any:
        return self._load()


class BlockRows:
    """Row slices of one [rows, row_bytes] block matrix with its float `shape` (rows, cols):
    what `quant.formats.reencode` reads."""

    def __init__(self, blocks: np.ndarray, cols: int):
        self.blocks, self.shape = blocks, (int(blocks.shape[0]), int(cols))

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.ascontiguousarray(self.blocks[rows])


class FileRows:
    """float32 row slices of a `StoredTensor` (or, with raw, its bytes): `rows[a:b]` reads
    rows a..b-1 from the file. Has the `shape` and row slicing `quant.formats.pack` needs."""

    def __init__(self, tensor: StoredTensor, raw: bool = False):
        self.tensor = tensor
        self.shape = tensor.shape
        self.raw = raw

    def __getitem__(self, rows: slice) -> np.ndarray:
        """Rows a..b-1 read from the file. With raw, the bytes are in this thread's read
        buffer, valid until its next raw read (`pack` and `reencode` use each slice before
        reading the next): a fresh buffer per slice was memory the kernel zeroed each
        time, ~5% of loading a Q4_K_M file."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("FileRows takes a contiguous row slice, e.g. rows[a:b]")
        start, stop, _ = rows.indices(self.shape[0])
        t = self.tensor
        n = max(stop - start, 0)
        out = _read_buffer(n * t.row_bytes) if self.raw else np.empty(n * t.row_bytes, np.uint8)
        raw = hugepages.read_into(t.path, t.offset + start * t.row_bytes, out)
        raw = raw.reshape(n, t.row_bytes)
        return raw if self.raw else t.decode(raw)


_local = threading.local()


def _read_buffer(nbytes: int) -> np.ndarray:
    """nbytes of this thread's reusable read buffer (grown on demand, kept)."""
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.size < nbytes:
        buf = _local.buffer = np.empty(nbytes, np.uint8)
    return buf[:nbytes]
