"""A fast reader of the GGUF container: metadata, tensor directory, memory-mapped data.

The `gguf` package's GGUFReader builds numpy views for every metadata field, which takes
~6 s for a 150k-token vocabulary; parsing the header with `struct` takes a fraction of a
second. Dequantization still uses `gguf.quants`, whose type table (`GGML_QUANT_SIZES`)
is also used here to size each tensor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# value type id -> (struct format, numpy dtype) for fixed-size scalars
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32),
            7: ("<?", np.bool_), 10: ("<Q", np.uint64), 11: ("<q", np.int64),
            12: ("<d", np.float64)}
STRING, ARRAY, FLOAT32 = 8, 9, 6


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise _Truncated(self.pos)
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            value = self.unpack(_SCALARS[vtype][0])
            return float(str(np.float32(value))) if vtype == FLOAT32 else value
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type, count = self.unpack("<I"), self.unpack("<Q")
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


@dataclass
class GGUFTensor:
    """One tensor of the directory. `shape` is numpy order (rows, cols)."""

    name: str
    tensor_type: Any           # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int                # absolute byte offset in the file
    n_bytes: int
    data: np.ndarray           # uint8 [rows, row_bytes] for block types, typed for floats


def read_gguf(path: Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """Metadata dict and tensor list of a GGUF file; any damage is a CheckpointError."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mapped))
    try:
        if bytes(cur.take(4)) != MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (bad magic)")
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path} is GGUF version {version}; supported: 2, 3")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    except _Truncated as exc:
        raise CheckpointError(f"GGUF file {path} ({size} bytes) is truncated inside its header "
                              f"(at byte {exc.args[0]}); download or convert it again") from None
    except (ValueError, struct.error) as exc:
        raise CheckpointError(f"GGUF file {path} has a corrupt header ({exc}); download or "
                              f"convert it again") from None
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, type_id, rel in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} has unknown ggml type "
                                  f"{type_id}; upgrade gguf (pip install -U gguf)") from None
        shape = tuple(int(d) for d in reversed(dims))  # GGUF lists the fastest dim first
        row = shape[-1] if shape else 1
        if row % block:
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} rows of {row} are not a "
                                  f"multiple of its block size {block}")
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = row // block * type_size
        n_bytes = n_rows * row_bytes
        start = data_start + rel
        if start + n_bytes > size:
            raise CheckpointError(f"GGUF file {path} is truncated: tensor {name!r} needs bytes "
                                  f"up to offset {start + n_bytes} but the file has {size}; "
                                  f"download or convert it again")
        raw = mapped[start:start + n_bytes]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16)
            data = data.reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], row_bytes)
        tensors.append(GGUFTensor(name, qtype, shape, start, n_bytes, data))
    return meta, tensors
