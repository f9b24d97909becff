"""Pieces every architecture shares: weight loading with shape checks, Linear, RoPE, the
causal-LM base class (the caches live in `lattice_engine.cache`).

A model never reads a checkpoint directly: it asks a `WeightLoader` for vectors and
matrices by HF name, with the shape it expects and the role of the matrix, and gets float32
vectors and `PackedMatrix` weights in the format the quant method picked. A matrix stored
in another type than its format is converted from the file a slice of rows at a time
(`io/stored.py`), so loading never holds a whole float32 copy of a tensor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import MISSING, fields
from typing import Any, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import numpy as np

from ..errors import CheckpointError
from ..io import hugepages
from ..io.checkpoint import Checkpoint, PackedTensor
from ..io.stored import BlockRows, MappedStack, StoredTensor
from ..quant.core_formats import requantizer
from ..quant.formats import DequantizedRows, PackedMatrix, WeightFormat, pack, reencode
from ..quant.methods import QuantMethod

log = logging.getLogger(__name__)


STORED_AS = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16)}


class ConfigFieldError(CheckpointError):
    """A model config field is missing or of the wrong form; `loading.load` prefixes the
    file it came from."""


def config_from_dict(cls, params: dict[str, Any]):
    """Build a config dataclass from an HF config dict, ignoring keys it does not know.
    Every known key is checked against the field's type first (integers are counts and
    sizes, so >= 1; floats finite and >= 0), so a malformed config is a ConfigFieldError naming the
    key and the expected form instead of a TypeError or ZeroDivisionError deep in a model."""
    if not isinstance(params, dict):
        raise ConfigFieldError(f"the model config must be a JSON object, got "
                               f"{type(params).__name__}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name not in params:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigFieldError(f"{f.name} is missing; a {params.get('model_type')!r} "
                                       f"config needs it")
            continue
        kwargs[f.name] = _checked_field(f.name, params[f.name], hints[f.name])
    return cls(**kwargs)


def _checked_field(name: str, value: Any, hint: Any) -> Any:
    if get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    base = get_origin(hint) or hint
    if base is int:
        ok, form = isinstance(value, int) and not isinstance(value, bool) and value >= 1, \
            "a positive integer"
    elif base is float:  # eps, rope theta, rotary fraction: none is negative
        ok, form = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and value >= 0, "a finite number >= 0"
    elif base in (str, bool, dict, list):
        ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
        form = {str: "a string", bool: "true or false", dict: "an object",
                list: "an array"}[base]
    else:
        return value
    if not ok:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise ConfigFieldError(f"{name} = {shown} must be {form}")
    return value


def _keep_experts_mapped() -> bool:
    import os
    return os.environ.get("LATTICE_MAP_EXPERTS", "") == "1"


def _room_for(nbytes: int, meminfo: str = "/proc/meminfo") -> bool:
    """Whether nbytes more of our own memory leave at least max(1 GiB, 10% of RAM)
    available (Linux MemAvailable; True where /proc is not there)."""
    try:
        with open(meminfo) as f:
            info = {k: int(v.split()[0]) << 10 for k, _, v in (ln.partition(":") for ln in f)
                    if k in ("MemAvailable", "MemTotal")}
    except (OSError, ValueError):
        return True
    if len(info) < 2:
        return True
    return nbytes <= info["MemAvailable"] - max(1 << 30, info["MemTotal"] // 10)


def _relaying_pays(fmt: WeightFormat, cols: int, rows: int) -> bool:
    """Whether `native_layout` gives matrices of `fmt` with `rows` rows another layout here
    (asked of a zero matrix of 16 rows, converted in place: the answer costs nothing)."""
    from ..quant.core_formats import native_layout
    if rows % 16 or cols % fmt.block_size:
        return False
    probe = PackedMatrix(fmt, 16, cols, np.zeros((16, fmt.row_bytes(cols)), np.uint8))
    return native_layout(probe).format is not fmt


class WeightLoader:
    """Hands tensors of a checkpoint to a model, converted to the formats it should use.

    With `native_layout`, matrices come in the layout the native kernels run fastest from
    (q8_0 -> q8_0_r16: the same blocks, rows interleaved; see `core_formats`).
    """

    def __init__(self, checkpoint: Checkpoint, method: QuantMethod,
                 formats: dict[str, WeightFormat], overrides: Optional[dict[str, str]] = None,
                 native_layout: bool = False):
        self.checkpoint = checkpoint
        self.method = method
        self.formats = formats
        self.overrides = overrides or {}
        self.native_layout = native_layout
        self._relaid: dict[tuple, PackedMatrix] = {}  # buffer -> its native-layout matrix
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.checkpoint.tensors

    def _stored(self, name: str, shape: tuple[int, ...]):
        """The checkpoint's loader of `name`, after checking it exists with `shape`."""
        if name not in self.checkpoint.tensors:
            raise CheckpointError(
                f"checkpoint {self.checkpoint.source} has no tensor {name!r} (expected shape "
                f"{shape}); the file is incomplete or was written for another architecture")
        got = tuple(self.checkpoint.shapes[name])
        if got != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} in {self.checkpoint.source} has shape {got}, but the config "
                f"implies {tuple(shape)}; the checkpoint and its config.json disagree")
        self.used.add(name)
        return self.checkpoint.tensors[name]

    def _read(self, name: str, read):
        try:
            return read()
        except CheckpointError:
            raise
        except (ValueError, OSError, EOFError) as exc:  # EOFError: the file shrank under us
            raise CheckpointError(f"cannot read tensor {name!r} from {self.checkpoint.source}: "
                                  f"{exc}") from exc

    def _raw(self, name: str, shape: tuple[int, ...]):
        return self._read(name, self._stored(name, shape))

    def vector(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        raw = self._raw(name, shape)
        if isinstance(raw, PackedTensor):
            fmt = self._format(raw.format)
            raw = fmt.to_float(raw.data.reshape(1, -1), int(np.prod(shape)))
        return np.ascontiguousarray(raw, dtype=np.float32).reshape(shape)

    def matrix(self, name: str, shape: tuple[int, int], role: str) -> PackedMatrix:
        m = self._matrix(name, shape, role)
        if self.native_layout:
            from ..quant.core_formats import native_layout
            # the layout is changed in place: a buffer handed out twice (a checkpoint that
            # caches its arrays, a model asking for one tensor twice) is converted once
            key = (m.data.__array_interface__["data"][0], m.data.shape, m.format.name)
            if key in self._relaid:
                return self._relaid[key]
            relaid = native_layout(m)
            if relaid is not m:
                self._relaid[key] = relaid
            m = relaid
        return m

    def _matrix(self, name: str, shape: tuple[int, int], role: str) -> PackedMatrix:
        fmt_name = self.method.format_for(role, name, shape[1],
                                          lambda f: self._format(f).block_size, self.overrides)
        fmt = self._format(fmt_name)
        stored = self._stored(name, shape)
        if isinstance(stored, StoredTensor) and stored.stored != fmt.name:
            # converted from the file a slice of rows at a time: never a whole float copy;
            # re-encoded from its blocks where the format can hold them (from_stored)
            convert = (fmt.from_stored or {}).get(stored.stored) or \
                requantizer(fmt, stored.stored)
            if convert is not None:
                m = self._try_reencode(name, lambda: [self._read(name, lambda: reencode(
                    fmt, name, stored.raw_rows(), convert, allocate=hugepages.empty))])
                if m is not None:
                    return m[0]
            return self._read(name, lambda: pack(fmt, name, stored.rows(),
                                                 allocate=hugepages.empty))
        return self._packed(name, self._read(name, stored), shape, fmt)

    def float_matrix(self, name: str, shape: tuple[int, int]) -> PackedMatrix:
        """A matrix kept in float32 whatever the quant method says (a MoE router: small, and
        its rounding would move tokens between experts; llama.cpp keeps it in float too)."""
        return self._packed(name, self._raw(name, shape), shape, self._format("f32"))

    def stacked(self, name: str, shape: tuple[int, int, int], role: str,
                parts: int = 1) -> list[tuple[PackedMatrix, ...]]:
        """The matrices of a stacked 3-D tensor [n, rows, cols] (a MoE layer's experts): per
        slice a tuple of `parts` PackedMatrix, its rows cut into equal blocks (gate_up_proj:
        gate and up), in the format the quant method picks for `role`. A slice that is
        already in that format stays a view of the checkpoint's buffer (a memory map stays
        mapped) unless `native_layout` re-lays it: with `native_layout`, experts whose
        format has a faster layout here (q8_0 -> q8_0_r16, q4 -> its _r16) are re-laid, in
        place when writable, and a mapped tensor is first read whole into our own memory
        (`hugepages.copy_from_map`: resident once) as llama.cpp repacks its weights: a
        q4_0 MoE at bench/moe.py's shapes then decodes 1.2-1.35x faster on an AVX2 CPU.
        They stay mapped (a step then pages in only the experts it routes to) with
        LATTICE_MAP_EXPERTS=1, or when the copy would leave too little memory available
        (`_room_for`)."""
        n, rows, cols = shape
        fmt = self._format(self.method.format_for(
            role, name, cols, lambda f: self._format(f).block_size, self.overrides))
        if rows % parts or (rows // parts) % fmt.row_group:
            raise CheckpointError(f"tensor {name!r} of shape {shape} cannot be cut into {parts} "
                                  f"blocks of rows in format {fmt.name}")
        step = rows // parts
        mats = self._reencoded_stack(name, shape, fmt)
        if mats is not None:
            return self._cut(mats, parts, step)
        raw = self._raw(name, shape)
        if isinstance(raw, PackedTensor) and raw.format == fmt.name and \
                not raw.data.flags.writeable and self.native_layout and \
                not _keep_experts_mapped() and _relaying_pays(fmt, cols, step):
            if _room_for(raw.data.nbytes):  # one read of the whole tensor, re-laid below
                mapped = raw.data
                raw = PackedTensor(raw.format, raw.shape,
                                   self._read(name, lambda: hugepages.copy_from_map(mapped)))
            else:  # these experts stay mapped (a step pages in the ones it routes to)
                log.warning("%s: its %.0f MB of experts stay memory-mapped in the file's "
                            "layout, which decodes slower: re-laying them needs that much "
                            "memory with max(1 GiB, 10%% of RAM) still available afterwards. "
                            "Free memory, or set LATTICE_MAP_EXPERTS=1 to keep experts "
                            "mapped without this warning", name, raw.data.nbytes / 2 ** 20)
        if isinstance(raw, PackedTensor):
            data = raw.data.reshape(n, rows, -1)
            parts_of = [PackedTensor(raw.format, (rows, cols), data[e]) for e in range(n)]
        else:
            parts_of = [raw[e] for e in range(n)]
        mats = [self._packed(f"{name}[{e}]", part, (rows, cols), fmt)
                for e, part in enumerate(parts_of)]
        return self._cut(mats, parts, step)

    def _reencoded_stack(self, name: str, shape: tuple[int, int, int],
                         fmt: WeightFormat) -> Optional[list[PackedMatrix]]:
        """Each expert re-encoded from the file's blocks when `fmt` takes their type
        (`from_stored`: a GGUF's Q4_K experts under q4_asym), else None."""
        loader = self._stored(name, shape)
        convert = (fmt.from_stored or {}).get(loader.stored) \
            if isinstance(loader, MappedStack) else None
        if convert is None:
            return None
        n, rows, cols = shape
        return self._try_reencode(name, lambda: [self._read(f"{name}[{e}]", lambda e=e: reencode(
            fmt, f"{name}[{e}]", BlockRows(loader.blocks[e], cols), convert,
            allocate=hugepages.empty)) for e in range(n)])

    @staticmethod
    def _try_reencode(name: str, build) -> Optional[list[PackedMatrix]]:
        """build()'s matrices, or None when a re-encoder refused a block (its ValueError,
        which `_read` wraps): the caller then takes the float round trip."""
        try:
            return build()
        except CheckpointError as exc:
            if not isinstance(exc.__cause__, ValueError):
                raise
            log.info("%s: %s; re-quantized from its float values instead", name, exc.__cause__)
            return None

    def _cut(self, mats: list[PackedMatrix], parts: int,
             step: int) -> list[tuple[PackedMatrix, ...]]:
        """Each expert's matrix cut into `parts` blocks of `step` rows, in the native layout
        where it pays and the buffer is ours."""
        out = []
        for m in mats:
            cut = []
            for i in range(parts):
                piece = m if parts == 1 else PackedMatrix(m.format, step, m.cols,
                                                          m.data[i * step:(i + 1) * step])
                if self.native_layout and piece.data.flags.writeable:
                    from ..quant.core_formats import native_layout
                    piece = native_layout(piece)
                cut.append(piece)
            out.append(tuple(cut))
        return out

    def _packed(self, name: str, raw, shape: tuple[int, int], fmt: WeightFormat) -> PackedMatrix:
        if isinstance(raw, PackedTensor):
            if raw.format == fmt.name:  # already stored the way we want: no float round trip
                if tuple(raw.data.shape) != (shape[0], fmt.row_bytes(shape[1])):
                    raise CheckpointError(
                        f"tensor {name!r} in {self.checkpoint.source} is stored as {fmt.name} "
                        f"with {tuple(raw.data.shape)} bytes, but a {shape} matrix in that "
                        f"format needs {(shape[0], fmt.row_bytes(shape[1]))}; the file is "
                        f"corrupt or was written by another version")
                return PackedMatrix(fmt, shape[0], shape[1], raw.data)
            raw = DequantizedRows(self._format(raw.format), raw.data, shape[1])
        elif STORED_AS.get(fmt.name) == raw.dtype and raw.flags.c_contiguous:
            # f32 / f16 weights kept as they are: a zero-copy view of the mapped file
            return PackedMatrix(fmt, shape[0], shape[1], raw.reshape(shape[0], -1).view(np.uint8))
        return pack(fmt, name, raw, allocate=hugepages.empty)

    def _format(self, name: str) -> WeightFormat:
        if name not in self.formats:
            raise CheckpointError(f"weight format {name!r} is not registered; registered "
                                  f"formats: {', '.join(sorted(self.formats))}")
        return self.formats[name]

    def unused(self) -> list[str]:
        return sorted(set(self.checkpoint.tensors) - self.used)


def check_tokens(tokens, vocab_size: int, batch: Optional[int] = None) -> np.ndarray:
    """tokens as int64 [B, T], refusing other ranks, ids outside the vocabulary and (when
    given) a batch the cache does not hold."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"tokens have batch {tokens.shape[0]} but the cache holds {batch} "
                         f"sequences")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token id out of range 0..{vocab_size - 1}")
    return tokens


class Linear:
    """y = x @ W.T (+ b), W stored in any weight format, plus the low-rank updates of the
    resident adapters for the rows that selected one (`adapters`, a
    `lattice_engine.adapters.LinearAdapters`, None until an adapter is loaded). `name` is
    the HF module name (`model.layers.0.self_attn.q_proj`) adapters address it by."""

    def __init__(self, weight: PackedMatrix, bias: Optional[np.ndarray] = None,
                 name: str = ""):
        self.weight = weight
        self.bias = bias
        self.name = name
        self.adapters = None

    def __call__(self, x: np.ndarray, ops) -> np.ndarray:
        y = ops.matmul(x, self.weight)
        if self.bias is not None:
            y += self.bias
        if self.adapters is not None:
            self.adapters.apply(x, y, ops)
        return y


def name_linears(owner: Any, prefix: str) -> None:
    """Give each `Linear` attribute of `owner` its HF module name, `prefix.attribute`."""
    for attr, value in vars(owner).items():
        if isinstance(value, Linear):
            value.name = f"{prefix}.{attr}"


def project(x: np.ndarray, linears: Sequence[Linear], ops) -> list[np.ndarray]:
    """[lin(x, ops) for lin in linears], run as one native job when the weights can share
    one (native backend, one format and width): x is converted once and the threads wake
    once for q/k/v or gate/up. The same kernels run either way, so the bits are the same."""
    if len(linears) > 1 and getattr(ops, "name", "") == "native":
        from .. import kernels
        ws = [lin.weight for lin in linears]
        fmt, cols = ws[0].format, ws[0].cols
        if kernels.supports(fmt) and all(w.format.name == fmt.name and w.cols == cols
                                         for w in ws):  # (q/k/v at most: within its limit)
            outs = kernels.matmul_multi(x, ws)
            for y, lin in zip(outs, linears):
                if lin.bias is not None:
                    y += lin.bias
                if lin.adapters is not None:
                    lin.adapters.apply(x, y, ops)
            return outs
    return [lin(x, ops) for lin in linears]


def rope_inv_freq(rotary_dim: int, theta: float, scaling: Optional[dict]) -> np.ndarray:
    """Inverse frequencies for RoPE, with the HF rope_scaling variants we support."""
    # float32 exponent like transformers, so the tables match the reference
    exponent = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)
    inv = (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise CheckpointError(f"rope_scaling type {kind!r} is not supported; supported: default, "
                          f"linear, llama3")


class CausalLM:
    """What every causal LM here shares: logits from final hidden states through the
    lm_head, and the fused native decode step, built on first use. Subclasses define
    `hidden_states(tokens, cache)` and `_build_decode_step()`, and set `self.config`,
    `self.ops`, `self.lm_head`."""

    # Decode one token per sequence with the whole step in one C call when the native
    # kernels run the model; False keeps the per-kernel path.
    fused_decode = True
    _step = None
    _step_built = False
    # how make_cache / make_paged_cache store keys and values (`cache.dense.KV_DTYPES`,
    # `[model] kv_cache`); the fused native steps and the attention kernels read each dtype
    kv_cache = "f32"
    _kv_transforms = None  # (kv_cache, per-layer key transforms) once computed

    def kv_key_transforms(self):
        """Per attention layer (k_shift, k_scale) for q8_0 keys (`cache.dense.key_transform`),
        computed once from the weights; None for the other dtypes or a model without
        `_key_transforms`."""
        if self.kv_cache != "q8_0" or not hasattr(self, "_key_transforms"):
            return None
        if self._kv_transforms is None or self._kv_transforms[0] != self.kv_cache:
            self._kv_transforms = (self.kv_cache, self._key_transforms())
        return self._kv_transforms[1]

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def forward(self, tokens: np.ndarray, cache, last_only: bool = False,
                inputs=None) -> np.ndarray:
        """Logits for tokens [B, T] appended after the cache's contents.

        `inputs` (a `multimodal.ForwardInputs`, models that take images only) gives rotary
        positions and embedding rows that replace placeholder tokens.
        Returns float32 [B, T, V], or [B, 1, V] for the last position when last_only.
        """
        hidden = self.hidden_states(tokens, cache) if inputs is None else \
            self.hidden_states(tokens, cache, inputs=inputs)
        return self.logits(hidden[:, -1:] if last_only else hidden)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return self.ops.matmul(hidden, self.lm_head)

    def _decode_step(self):
        """The fused native decode step, built on first use; None when the model does not
        run on the native kernels or a weight format has no C kernel."""
        if not self.fused_decode:
            return None
        if not self._step_built:
            self._step_built = True
            if getattr(self.ops, "name", "") == "native":
                self._step = self._build_decode_step()
        step = self._step
        if step is not None and getattr(step, "kv_dtype", self.kv_cache) != self.kv_cache:
            step.set_kv_format(self.kv_cache, self.kv_key_transforms())
        return step

