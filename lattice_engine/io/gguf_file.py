"""A fast reader of the GGUF container: metadata, tensor directory, memory-mapped data.

The `gguf` package's GGUFReader builds numpy views for every metadata field, which takes
~6 s for a 150k-token vocabulary; parsing the header with `struct` takes a fraction of a
second. `to_float` dequantizes a tensor's blocks: the common llama.cpp types in C
(`kernels.ggml`, bit for bit what `gguf.quants` gives, ~11x faster), every other type with
`gguf.quants`, whose type table (`GGML_QUANT_SIZES`) is also used here to size each tensor.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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


GGML_MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
# the fewest bytes a value of each type takes in the file (a string: its u64 length; an
# array: its u32 type and u64 count)
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, (f, _) in _SCALARS.items()},
                    STRING: 8, ARRAY: 12}


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    """A count, size or offset in the header that the file cannot hold."""


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

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary, its merges: ~300k of them for a 150k-token
        vocabulary). Only their lengths are walked in Python (into an int64 array: no int
        objects kept); the text is decoded in one call, each length field blanked to eight
        NULs, a separator no string holds, and split on them (0.64 -> ~0.15 s)."""
        buf, pos, end = self.buf, self.pos, len(self.buf)
        length = struct.Struct("<Q").unpack_from
        starts = array("q")
        try:
            for _ in range(count):
                (n,) = length(buf, pos)
                starts.append(pos)
                pos += 8 + n
                if pos > end:
                    raise _Truncated(starts[-1] + 8)
        except struct.error:
            raise _Truncated(pos) from None
        first, self.pos = self.pos, pos
        if not count:
            return []
        region = np.frombuffer(buf, np.uint8, pos - first, first).copy()
        fields = np.frombuffer(starts, np.int64) - first
        field_zeros = sum(np.count_nonzero(region[fields + k] == 0) for k in range(8))
        if np.count_nonzero(region == 0) != field_zeros:  # a string holds NUL: one by one
            bounds = list(starts) + [pos]
            return [str(buf[a + 8:b], "utf-8", "replace") for a, b in zip(bounds, bounds[1:])]
        for k in range(8):
            region[fields + k] = 0
        return str(region.data, "utf-8", "replace").split("\0" * 8)[1:]

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def count(self, what: str, min_bytes: int) -> int:
        """A u64 count of items that take at least min_bytes each, checked against the
        bytes left in the file before anything is allocated for them (a corrupt count of
        2**60 must not grow a list until memory runs out)."""
        n = self.unpack("<Q")
        if n * min_bytes > self.remaining():
            raise _Corrupt(f"{what} = {n} needs at least {n * min_bytes} bytes but only "
                           f"{self.remaining()} remain at byte {self.pos}")
        return n

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            value = self.unpack(_SCALARS[vtype][0])
            return float(str(np.float32(value))) if vtype == FLOAT32 else value
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type = self.unpack("<I")
            count = self.count("an array's length", _MIN_VALUE_BYTES.get(item_type, 1))
            if item_type in _SCALARS:
                dtype = np.dtype(_SCALARS[item_type][1]).newbyteorder("<")
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            if item_type == STRING:
                return self.strings(count)
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


def names_shown(names: list[str], limit: int = 5) -> str:
    """Tensor names from a file, for one line of an error message: the first `limit`,
    each as it is when printable, else quoted with escapes (a corrupt name may hold a
    newline or control bytes), then ' ...' when there are more."""
    shown = ", ".join(n if n.isprintable() else repr(n) for n in names[:limit])
    return shown + (" ..." if len(names) > limit else "")


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
        # a tensor entry takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset)
        # bytes, a key/value at least 8 (key) + 4 (type) + 1
        n_tensors = cur.count("the tensor count", 24)
        n_kv = cur.count("the metadata key count", 13)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > GGML_MAX_DIMS:
                raise _Corrupt(f"tensor {name[:80]!r} has n_dims = {n_dims}; ggml tensors "
                               f"have at most {GGML_MAX_DIMS}")
            dims = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    except _Truncated as exc:
        raise CheckpointError(f"GGUF file {path} ({size} bytes) is truncated inside its header "
                              f"(at byte {exc.args[0]}); download or convert it again") from None
    except (_Corrupt, ValueError, struct.error) as exc:
        raise CheckpointError(f"GGUF file {path} has a corrupt header ({exc}); download or "
                              f"convert it again") from None
    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or \
            alignment & (alignment - 1):
        raise CheckpointError(f"GGUF file {path}: general.alignment = {alignment!r} must be a "
                              f"power of two (the default is {DEFAULT_ALIGNMENT}); the header "
                              f"is corrupt, download or convert it again")
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
        if any(d < 1 for d in shape):  # a zero dim would also pass the size check below
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} has shape {shape}, with "
                                  f"a dimension < 1; the header is corrupt, download or "
                                  f"convert it again")
        row = shape[-1] if shape else 1
        if row % block:
            raise CheckpointError(f"GGUF file {path}: tensor {name!r} rows of {row} are not a "
                                  f"multiple of its block size {block}")
        # Python ints: a product of corrupt dims must not wrap around in int64
        n_rows = 1
        for d in shape[:-1]:
            n_rows *= d
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


def to_float(t: GGUFTensor, raw: np.ndarray) -> np.ndarray:
    """Rows of tensor `t`'s stored bytes (all of them, or a slice of whole rows) as float32
    [rows, cols]: in C for the block types `kernels.ggml` takes, else by `gguf.quants`.
    A type neither can dequantize raises CheckpointError naming the tensor."""
    cols = t.shape[-1] if t.shape else 1
    try:
        from ..kernels import ggml
        got = ggml.dequantize(raw, int(t.tensor_type), cols)
    except ImportError:  # pragma: no cover - a build without the kernels package
        got = None
    if got is not None:
        return got
    from gguf import dequantize
    try:
        return np.asarray(dequantize(raw, t.tensor_type), dtype=np.float32).reshape(-1, cols)
    except NotImplementedError as exc:
        raise CheckpointError(
            f"tensor {t.name!r} is stored as ggml type {t.tensor_type.name}, which the "
            f"installed gguf package cannot dequantize; upgrade gguf (pip install -U gguf) "
            f"or re-quantize the model to a common type (Q8_0, Q4_K, ...)") from exc


def stacked_loader(t: GGUFTensor, packed_formats: dict[int, str],
                   hf_shape: tuple[int, ...]) -> Callable[[], Any]:
    """The loader of a 3-D stacked tensor (a MoE layer's experts, [E, rows, cols]) that
    needs no reordering: a view of the memory map, as float16 / float32 or, for a ggml type
    in `packed_formats`, as a PackedTensor of the file's bytes. `WeightLoader.stacked`
    re-lays it into its own memory where that pays, or leaves it mapped (a step then pages
    in only the experts it routes to). Any other type is dequantized to float32."""
    from .checkpoint import PackedTensor

    def load() -> Any:
        if t.data.dtype in (np.float16, np.float32):
            return t.data.view(np.ndarray)
        fmt = packed_formats.get(int(t.tensor_type))
        if fmt is not None:
            return PackedTensor(format=fmt, shape=hf_shape, data=t.data.view(np.ndarray))
        return to_float(t, t.data.view(np.ndarray)).reshape(hf_shape)

    if t.data.dtype == np.uint8 and len(hf_shape) == 3:
        # a block type: its blocks stay at hand, so a format that takes them re-encodes them
        # (a Q4_K file's experts under q4_asym), whether or not a format runs them as stored
        from .stored import MappedStack
        blocks = t.data.view(np.ndarray).reshape(hf_shape[0], hf_shape[1], -1)
        return MappedStack(load, t.tensor_type.name.lower(), blocks)
    return load
