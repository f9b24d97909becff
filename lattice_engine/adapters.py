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

    def __init__(self, rows: RowSelection, in_features: int, out_features: int):
        self.rows = rows
        self.in_features, self.out_features = in_features, out_features
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
        for i, lr in enumerate(self.factors):
            if lr is not None:
                arr[i].a = _ffi.cast("float *", lr.a.ctypes.data)
                arr[i].b = _ffi.cast("float *", lr.b.ctypes.data)
                arr[i].r, arr[i].scale = lr.rank, lr.scale
        # the old array stays referenced until the new one is in place
        self._c.slots, self._c.n_slots = arr, n
        self._c_factors = (arr, list(self.factors))

    def apply(self, x: np.ndarray, y: np.ndarray, ops) -> np.ndarray:
        """y (x's rows, out_features) += each row's slot update; returns y."""
        if not self.factors or not self.rows.active:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        ops.lora_apply(x2, y2, self, self.rows.slots_for(x2.shape[0]))
        return y


def _onto_huge_pages(weights: AdapterWeights) -> None:
    """Move an adapter's factors into one buffer on 2 MiB pages (same values, same
    LowRank objects): decode streams every resident factor once per token, and on 4 KiB
    pages the TLB misses slowed that stream as they slow the base weights' (see
    io/hugepages.py). The buffer goes with the adapter's last reference."""
    from .io.hugepages import ALIGN, own_region
    todo = [lr for lr in weights.modules.values() if not getattr(lr, "_on_huge_pages", False)]
    arrays = [(lr, f) for lr in todo for f in ("a", "b")]
    if not arrays:
        return
    sizes = [-(-getattr(lr, f).nbytes // ALIGN) * ALIGN for lr, f in arrays]
    buf = own_region(sum(sizes) + ALIGN)
    at = (-buf.ctypes.data) % ALIGN
    for (lr, f), size in zip(arrays, sizes):
        old = getattr(lr, f)
        new = buf[at:at + old.nbytes].view(np.float32).reshape(old.shape)
        new[...] = old
        setattr(lr, f, new)
        at += size
    for lr in todo:
        lr._on_huge_pages = True


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
            lin.adapters = LinearAdapters(self.rows, lin.weight.cols, lin.weight.rows)
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
        _onto_huge_pages(weights)
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
