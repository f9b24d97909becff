"""Adapters applied around named linear modules (LoRA): the core's side.

A model's `Linear`s carry their HF module name (`model.layers.3.self_attn.q_proj`). An
adapter kind (contributed by the `register_adapters` hook, e.g. `lattice-lora`) reads its
files into `AdapterWeights`: per module name, float32 low-rank factors (A [r, in],
B [out, r], scale). The core keeps resident adapters in numbered slots of the model's
`AdapterSlots` and, in every forward, adds

    y[row] += scale * (x[row] @ A.T) @ B.T

to the rows whose sequence selected that slot (-1: no adapter). The numpy reference is
`ops.lora_apply`; the native one (`kernels.lora_apply`, C `lk_lora_apply`) also runs inside
the fused decode steps, where each `lk_linear` points at its module's `lk_lora` table and
all tables share the model's `lk_lora_rows` (the row -> slot selection of the call).

The base weights are never touched (any weight format works: the adapter stays float);
`merge` folds one adapter into float weights for a single-adapter deployment.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np

from .errors import RequestError


@dataclass
class LowRank:
    """One module's update: y += scale * (x @ a.T) @ b.T."""

    a: np.ndarray   # float32 [r, in]
    b: np.ndarray   # float32 [out, r]
    scale: float

    def __post_init__(self) -> None:
        self.a = np.ascontiguousarray(self.a, dtype=np.float32)
        self.b = np.ascontiguousarray(self.b, dtype=np.float32)
        self.scale = float(self.scale)
        if self.a.ndim != 2 or self.b.ndim != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"low-rank factors A {self.a.shape} and B {self.b.shape} do not "
                             f"share a rank (A [r, in], B [out, r])")

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        """The dense update scale * B @ A, float32 [out, in]."""
        return (self.scale * (self.b @ self.a)).astype(np.float32)


@dataclass
class AdapterWeights:
    """What an adapter kind loads: a name, the low-rank update per module name, and
    whatever the kind keeps for saving (its config)."""

    name: str
    modules: dict[str, LowRank]
    kind: str = "lora"
    meta: dict[str, Any] = field(default_factory=dict)


def mix_adapters(parts: list[tuple[AdapterWeights, float]], name: str) -> AdapterWeights:
    """The weighted sum of adapters sum_i w_i * scale_i * B_i A_i, exactly, as one low-rank
    update per module: the factors are concatenated along the rank (rank = sum of ranks)."""
    if not parts:
        raise ValueError("a mixture needs at least one adapter")
    modules: dict[str, LowRank] = {}
    names = sorted({m for a, _ in parts for m in a.modules})
    for m in names:
        a_parts, b_parts = [], []
        for adapter, weight in parts:
            lr = adapter.modules.get(m)
            if lr is None:
                continue
            a_parts.append(lr.a)
            b_parts.append(lr.b * np.float32(weight * lr.scale))
        modules[m] = LowRank(np.concatenate(a_parts, 0), np.concatenate(b_parts, 1), 1.0)
    return AdapterWeights(name, modules, parts[0][0].kind,
                          {"mixture": [(a.name, float(w)) for a, w in parts]})


def named_linears(model) -> dict[str, Any]:
    """Every `Linear` of a model by its HF module name (blocks in `model.layers`, their
    attention / MLP parts one level down)."""
    from .models.base import Linear
    found: dict[str, Any] = {}

    def visit(obj, depth: int) -> None:
        for value in vars(obj).values():
            if isinstance(value, Linear):
                if value.name:
                    found[value.name] = value
            elif depth < 2 and hasattr(value, "__dict__") and not isinstance(
                    value, (np.ndarray, type)) and type(value).__module__.startswith(
                    "lattice_engine.models"):
                visit(value, depth + 1)

    for block in getattr(model, "layers", []):
        visit(block, 0)
    return found


class RowSelection:
    """Which slot each row of the current forward uses: one slot for every row
    (`uniform`, -1 = none) or an int32 per row. The C view (`lk_lora_rows`) is shared by
    every module's table."""

    def __init__(self) -> None:
        self.uniform = -1
        self.per_row: Optional[np.ndarray] = None
        self._c = None

    @property
    def active(self) -> bool:
        return self.per_row is not None or self.uniform >= 0

    def slots_for(self, m: int) -> Optional[np.ndarray]:
        """int32 [m] slot per row, or None when every row uses `uniform`."""
        if self.per_row is None:
            return None
        if self.per_row.shape != (m,):
            raise ValueError(f"adapter rows: {self.per_row.size} rows were selected but the "
                             f"forward runs {m}")
        return self.per_row

    def c_struct(self):
        if self._c is None:
            from .kernels.runtime import _ffi
            self._c = _ffi.new("lk_lora_rows *")
            self._sync()
        return self._c

    def _sync(self) -> None:
        if self._c is None:
            return
        from .kernels.runtime import _ffi
        c = self._c
        c.uniform = self.uniform
        if self.per_row is None:
            c.slot, c.n = _ffi.NULL, 0
        else:
            c.slot = _ffi.cast("int32_t *", self.per_row.ctypes.data)
            c.n = self.per_row.size

    def set(self, uniform: int = -1, per_row: Optional[np.ndarray] = None) -> None:
        self.uniform = int(uniform)
        self.per_row = None if per_row is None else np.ascontiguousarray(per_row, np.int32)
        self._sync()


class LinearAdapters:
    """A module's resident updates by slot (the `Linear.adapters` of an adapted model)."""

    def __init__(self, rows: RowSelection, in_features: int, out_features: int,
                 dtype: str = "f32"):
        self.rows = rows
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # how the kernel holds the factors: kernel_factors
        if dtype not in FACTOR_DTYPES:
            raise ValueError(f"adapter factor dtype {dtype!r} is not one of {FACTOR_DTYPES}")
        self.factors: list[Optional[LowRank]] = []
        self._c = None
        self._c_factors = None

    def put(self, slot: int, lr: Optional[LowRank]) -> None:
        while len(self.factors) <= slot:
            self.factors.append(None)
        self.factors[slot] = lr
        while self.factors and self.factors[-1] is None:
            self.factors.pop()
        self._sync()

    @property
    def any(self) -> bool:
        return bool(self.factors)

    def c_struct(self):
        """The `lk_lora` of this module (its contents follow `put`)."""
        if self._c is None:
            from .kernels.runtime import _ffi
            self._c = _ffi.new("lk_lora *")
            self._c.rows = self.rows.c_struct()
            self._sync()
        return self._c

    def _sync(self) -> None:
        if self._c is None:
            return
        from .kernels.runtime import _ffi
        n = len(self.factors)
        arr = _ffi.new("lk_lora_factor[]", max(n, 1))
        kept = []
        for i, lr in enumerate(self.factors):
            if lr is not None:
                # made when the adapter became resident (_onto_huge_pages), else here
                a, bp, scale = getattr(lr, "_kernel", {}).get(self.dtype) or \
                    kernel_factors(lr, self.dtype)
                kept.append((a, bp))
                arr[i].a = _ffi.cast("void *", a.ctypes.data)
                arr[i].bp = _ffi.cast("void *", bp.ctypes.data)
                arr[i].r, arr[i].scale = lr.rank, scale
                arr[i].dtype = FACTOR_DTYPES.index(self.dtype)  # LK_LORA_F32 / LK_LORA_F16
        # the old array stays referenced until the new one is in place
        self._c.slots, self._c.n_slots = arr, n
        self._c_factors = (arr, list(self.factors), kept)

    def apply(self, x: np.ndarray, y: np.ndarray, ops) -> np.ndarray:
        """y (x's rows, out_features) += each row's slot update; returns y."""
        if not self.factors or not self.rows.active:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        ops.lora_apply(x2, y2, self, self.rows.slots_for(x2.shape[0]))
        return y


# how the native kernel holds an adapter's factors, in LK_LORA_* order: float32 over a
# float32 base (its logits stay the reference's), float16 over any other (half the bytes a
# decode step streams, 140 -> 70 MB for four rank-16 adapters on Qwen2.5-Coder-0.5B; an
# f16 factor's rounding, 2^-11 of the value, is far below the base weights' own)
FACTOR_DTYPES = ("f32", "f16")


def factor_dtype(weight) -> str:
    """The factor dtype for a linear whose weight is `weight` (a PackedMatrix)."""
    return "f32" if weight.format.name == "f32" else "f16"


def pack_up_factor(b: np.ndarray) -> np.ndarray:
    """B [out, r] in the kernel's layout (`lk_lora_factor.bp`): blocks of 16 outputs, each
    [r, 16] (a column's 16 outputs contiguous), the last block padded with zeros."""
    out, r = b.shape
    nb = -(-out // 16)
    padded = np.zeros((nb * 16, r), b.dtype)
    padded[:out] = b
    return np.ascontiguousarray(padded.reshape(nb, 16, r).transpose(0, 2, 1))


def _pow2_at_least(m: float) -> float:
    return float(2.0 ** np.ceil(np.log2(m))) if m > 0 else 1.0


def kernel_factors(lr: LowRank, dtype: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(a, packed b, scale) as the kernel reads them for `dtype`. For f16 each factor is
    first divided by the power of two at or above its largest magnitude (exact), so its
    values sit in [-1, 1] where halves are normal down to 6e-5 of the largest; the scale
    carries both powers."""
    if dtype == "f32":
        return lr.a, pack_up_factor(lr.b), lr.scale
    sa = _pow2_at_least(float(np.abs(lr.a).max(initial=0.0)))
    sb = _pow2_at_least(float(np.abs(lr.b).max(initial=0.0)))
    a = (lr.a / np.float32(sa)).astype(np.float16)
    bp = pack_up_factor((lr.b / np.float32(sb)).astype(np.float16))
    return a, bp, lr.scale * sa * sb


def _onto_huge_pages(weights: AdapterWeights, dtypes: dict[str, str]) -> None:
    """Make an adapter's kernel factors (`kernel_factors`, in the dtype `dtypes` names per
    module) in one buffer on 2 MiB pages, kept on each LowRank as `_kernel[dtype]`: decode
    streams every resident factor once per token, and on 4 KiB pages the TLB misses slowed
    that stream as they slow the base weights' (see io/hugepages.py). The buffer goes with
    the adapter's last reference; the LowRank's own a / b stay as they are."""
    from .io.hugepages import ALIGN, own_region
    todo = []
    for name, lr in weights.modules.items():
        dtype = dtypes.get(name, "f32")
        if not hasattr(lr, "_kernel"):
            lr._kernel = {}
        if dtype not in lr._kernel:
            todo.append((lr, dtype, kernel_factors(lr, dtype)))
    if not todo:
        return
    arrays = [arr for _, _, (a, bp, _) in todo for arr in (a, bp)]
    sizes = [-(-arr.nbytes // ALIGN) * ALIGN for arr in arrays]
    buf = own_region(sum(sizes) + ALIGN)
    at = (-buf.ctypes.data) % ALIGN
    placed = []
    for old, size in zip(arrays, sizes):
        new = buf[at:at + old.nbytes].view(old.dtype).reshape(old.shape)
        new[...] = old
        placed.append(new)
        at += size
    for k, (lr, dtype, (_, _, scale)) in enumerate(todo):
        lr._kernel[dtype] = (placed[2 * k], placed[2 * k + 1], scale)


class AdapterSlots:
    """The adapters resident in one model: numbered slots of per-module updates, the row
    selection of the running forward, and reference counts (a slot in use by a request is
    freed only when its last user lets go)."""

    def __init__(self, model):
        self.model = model
        self.rows = RowSelection()
        self.linears = named_linears(model)
        if not self.linears:
            raise RequestError(f"{type(model).__name__} has no named linear modules; "
                               f"adapters cannot be applied to it")
        for lin in self.linears.values():
            lin.adapters = LinearAdapters(self.rows, lin.weight.cols, lin.weight.rows,
                                          factor_dtype(lin.weight))
        self.weights: dict[int, AdapterWeights] = {}
        self.refs: dict[int, int] = {}
        self.lock = threading.RLock()
        # the fused steps read the tables through lk_linear.lora: build them again
        model._step, model._step_built = None, False

    @classmethod
    def of(cls, model) -> "AdapterSlots":
        slots = getattr(model, "adapter_slots", None)
        if slots is None:
            slots = model.adapter_slots = cls(model)
        return slots

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every linear an adapter may target."""
        return {n: (lin.weight.rows, lin.weight.cols) for n, lin in self.linears.items()}

    def add(self, weights: AdapterWeights) -> int:
        """Make `weights` resident; returns its slot (one reference held by the caller)."""
        shapes = self.module_shapes()
        for name, lr in weights.modules.items():
            if name not in shapes:
                raise RequestError(f"adapter {weights.name!r} targets module {name!r}, which "
                                   f"this model does not have")
            out_f, in_f = shapes[name]
            if lr.a.shape[1] != in_f or lr.b.shape[0] != out_f:
                raise RequestError(f"adapter {weights.name!r}: module {name!r} is [{out_f}, "
                                   f"{in_f}] but the adapter's A {lr.a.shape} / B {lr.b.shape} "
                                   f"fit [{lr.b.shape[0]}, {lr.a.shape[1]}]")
        _onto_huge_pages(weights, {name: self.linears[name].adapters.dtype
                                   for name in weights.modules})
        with self.lock:
            slot = next(i for i in range(len(self.weights) + 1) if i not in self.weights)
            self.weights[slot] = weights
            self.refs[slot] = 1
            for name, lin in self.linears.items():
                lin.adapters.put(slot, weights.modules.get(name))
        return slot

    def retain(self, slot: int) -> None:
        with self.lock:
            self.refs[slot] += 1

    def release(self, slot: int) -> None:
        with self.lock:
            self.refs[slot] -= 1
            if self.refs[slot] <= 0:
                del self.refs[slot]
                del self.weights[slot]
                for lin in self.linears.values():
                    lin.adapters.put(slot, None)

    @contextlib.contextmanager
    def selecting(self, uniform: int = -1, per_row: Optional[np.ndarray] = None
                  ) -> Iterator[None]:
        """Forwards inside use slot `uniform` for every row, or `per_row` (int32, one per
        row of the forward)."""
        saved = (self.rows.uniform, self.rows.per_row)
        self.rows.set(uniform, per_row)
        try:
            yield
        finally:
            self.rows.set(*saved)


def merge(model, weights: AdapterWeights) -> None:
    """Fold an adapter into the model's weights for good (single-adapter deployment): each
    targeted matrix becomes float32 W + scale * B @ A. Irreversible for this model object."""
    from .quant.formats import PackedMatrix
    linears = named_linears(model)
    for name, lr in weights.modules.items():
        if name not in linears:
            raise RequestError(f"adapter {weights.name!r} targets module {name!r}, which this "
                               f"model does not have")
    f32 = None
    for name, lr in weights.modules.items():
        lin = linears[name]
        w = lin.weight.to_float() + lr.delta()
        if f32 is None:
            from .plugins import get_plugin_manager
            f32 = get_plugin_manager().registry.get("weight_formats", "f32")
        lin.weight = PackedMatrix(f32, w.shape[0], w.shape[1],
                                  np.ascontiguousarray(w, np.float32).view(np.uint8))
    model._step, model._step_built = None, False


class AdapterManager:
    """Adapters loaded into one engine, by name. Each name points at a slot of the model's
    `AdapterSlots`; replacing a name's weights (a mixture, `adapt_step`) puts the new
    version in a new slot, so a request that started with the old version keeps it until
    it ends (it holds a reference to its slot)."""

    def __init__(self, model, registry):
        self.model = model
        self.registry = registry
        self.slots = AdapterSlots.of(model)
        self.by_name: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self.train_states: dict[str, Any] = {}
        self.lock = threading.RLock()

    def kind(self, kind: str):
        table = self.registry.items.get("adapters", {})
        if kind not in table:
            raise RequestError(f"unknown adapter kind {kind!r}; installed kinds: "
                               f"{', '.join(sorted(table)) or '(none: pip install lattice-lora)'}")
        return table[kind]

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def load(self, path, *, name: Optional[str] = None, kind: str = "lora") -> str:
        weights = self.kind(kind).load(path, self.model, name)
        return self.put(weights)

    def put(self, weights: AdapterWeights) -> str:
        """Make `weights` resident under `weights.name` (a new version if the name exists)."""
        if not isinstance(weights.name, str) or not weights.name.strip():
            raise RequestError(f"adapter name {weights.name!r} must be a non-empty string")
        slot = self.slots.add(weights)
        with self.lock:
            old = self.by_name.get(weights.name)
            self.by_name[weights.name] = slot
            self.versions[weights.name] = self.versions.get(weights.name, 0) + 1
        if old is not None:
            self.slots.release(old)
        return weights.name

    def get(self, name: str) -> AdapterWeights:
        return self.slots.weights[self._slot(name)]

    def mix(self, name: str, parts: list[tuple[str, float]]) -> str:
        """A weighted mixture of loaded adapters, resident under `name`."""
        if not parts:
            raise RequestError("a mixture needs at least one (adapter, weight) pair")
        return self.put(mix_adapters([(self.get(n), float(w)) for n, w in parts], name))

    def unload(self, name: str) -> None:
        with self.lock:
            slot = self._slot(name)
            del self.by_name[name]
            self.train_states.pop(name, None)
        self.slots.release(slot)

    def train(self, name: str, tokens, options: Optional[dict] = None,
              steps: int = 1) -> tuple[AdapterWeights, dict]:
        """`steps` optimizer steps of adapter `name` on one example (token ids) with its
        kind's `train_step` (options: its optimizer settings); returns the new weights and
        {"loss": [...], "grad_norm": [...]} without making them resident (see `adapt`).
        The optimizer state carries over between calls for the same adapter."""
        weights = self.get(name)
        kind = self.kind(weights.kind)
        train_step = getattr(kind, "train_step", None)
        if not callable(train_step):
            raise RequestError(f"adapter {name!r} is of kind {weights.kind!r}, which cannot "
                               f"be trained online")
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 64:
            raise RequestError(f"steps = {steps!r} must be an integer in [1, 64]")
        state = self.train_states.get(name)
        info: dict = {"loss": [], "grad_norm": []}
        for _ in range(steps):
            weights, loss, norm, state = train_step(self.model, weights, tokens,
                                                    dict(options or {}), state)
            info["loss"].append(loss)
            info["grad_norm"].append(norm)
        with self.lock:
            self.train_states[name] = state
        return weights, info

    def adapt(self, name: str, tokens, options: Optional[dict] = None,
              steps: int = 1) -> dict:
        """Train adapter `name` on one example and make the result its new version
        (requests already running keep the version they started with)."""
        weights, info = self.train(name, tokens, options, steps)
        self.put(weights)
        info["version"] = self.versions[name]
        return info

    def _slot(self, name: str) -> int:
        slot = self.by_name.get(name)
        if slot is None:
            raise UnknownAdapter(name, self.names())
        return slot

    def acquire(self, name: str) -> tuple[int, str]:
        """(slot, prefix-cache variant) of the current version of `name`, referenced until
        `release(slot)`."""
        with self.lock:
            slot = self._slot(name)
            self.slots.retain(slot)
            return slot, f"{name}@{self.versions[name]}:{slot}"

    def release(self, slot: int) -> None:
        self.slots.release(slot)

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[int]:
        """Forwards inside apply adapter `name` to every row."""
        slot, _ = self.acquire(name)
        try:
            with self.slots.selecting(uniform=slot):
                yield slot
        finally:
            self.release(slot)

    def stream_with(self, name: str, make: Callable[[], Iterator]) -> Iterator:
        """A generator that runs `make()`'s generator with adapter `name` selected; the
        adapter is checked now, not at the first `next`."""
        slot, _ = self.acquire(name)

        def run():
            try:
                gen = make()
                while True:
                    with self.slots.selecting(uniform=slot):
                        try:
                            item = next(gen)
                        except StopIteration:
                            return
                    yield item
            finally:
                self.release(slot)
        return run()


class UnknownAdapter(RequestError):
    """A request named an adapter that is not loaded (HTTP 404)."""

    def __init__(self, name: str, loaded: list[str]):
        self.name = name
        super().__init__(f"adapter {name!r} is not loaded; loaded: "
                         f"{', '.join(loaded) or '(none)'}; load it with "
                         f"POST /v1/load_lora_adapter or `lattice generate --adapter DIR`")
