"""The sparse mixture-of-experts MLP of Qwen3-MoE and Qwen3.5-MoE, shared by both.

Per token: router logits [E] -> softmax over all experts -> the top-k -> (optionally)
renormalised to sum to 1 -> sum_j w_j * expert_j(x) with expert_j a SwiGLU MLP; Qwen3.5
adds a shared expert scaled by sigmoid(shared_expert_gate . x).

`SparseMoE.__call__` is the numpy reference (any op set): tokens are grouped by expert and
each selected expert multiplies its rows as one matmul, so a step reads each expert once.
Every token sums its experts' outputs in ascending expert order, whatever else is in the
batch. The native backend runs the same thing in C (`lk_moe_forward`, native/src/moe.c,
through `kernels.moe`), and the fused decode steps call that function per layer.

Checkpoint layouts (all give the same per-expert matrices):
  per expert  {prefix}.experts.{e}.{gate,up,down}_proj.weight (transformers' save_pretrained)
  fused       {prefix}.experts.gate_up_proj [E, 2I, H], {prefix}.experts.down_proj [E, H, I]
              (released Qwen3.5-MoE checkpoints, transformers' in-memory layout)
  stacked     {prefix}.experts.{gate,up}_proj [E, I, H], {prefix}.experts.down_proj [E, H, I]
              (GGUF ffn_{gate,up,down}_exps, named so by io/gguf_reader.py)
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from ..quant.formats import PackedMatrix
from .base import Linear, WeightLoader


def route(logits: np.ndarray, top_k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Router logits [n, E] -> (expert ids int64 [n, k] in ascending order, weights float32
    [n, k]): softmax over all experts (float32), the k largest (ties to the lower expert
    id), divided by their sum when `normalize`."""
    logits = np.asarray(logits, np.float32)
    z = np.exp(logits - logits.max(-1, keepdims=True))
    probs = z / z.sum(-1, keepdims=True, dtype=np.float32)
    # by logit (softmax is monotone; the logits carry no exp rounding), a stable sort so
    # equal logits keep ascending expert order, as the C router does
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]
    ids.sort(axis=-1)
    weights = np.take_along_axis(probs, ids, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True, dtype=np.float32)
    return ids.astype(np.int64), weights.astype(np.float32)


class SparseMoE:
    """A MoE MLP: router, E SwiGLU experts (gate/up [I, H], down [H, I] per expert) and an
    optional shared expert with its sigmoid gate."""

    def __init__(self, w: WeightLoader, prefix: str, *, hidden: int, num_experts: int,
                 top_k: int, intermediate: int, normalize: bool,
                 shared_intermediate: int = 0):
        h, n_exp, inter = hidden, num_experts, intermediate
        if not 1 <= top_k <= n_exp:
            raise CheckpointError(f"num_experts_per_tok = {top_k} must be between 1 and "
                                  f"num_experts = {n_exp}; fix config.json")
        self.hidden, self.num_experts, self.top_k = h, n_exp, top_k
        self.intermediate, self.normalize = inter, normalize
        extra = f"{prefix}.experts.{n_exp}.gate_proj.weight"
        if w.has(extra):
            raise CheckpointError(
                f"checkpoint {w.checkpoint.source} has tensor {extra!r}, but the config says "
                f"num_experts = {n_exp} (experts 0..{n_exp - 1}); the checkpoint and its "
                f"config disagree")
        # the router and the shared expert's gate stay float32 (see WeightLoader.float_matrix)
        self.router = Linear(w.float_matrix(f"{prefix}.gate.weight", (n_exp, h)))
        self.gate, self.up, self.down = self._experts(w, f"{prefix}.experts", n_exp, inter, h)
        self.shared = self.shared_gate = None
        if shared_intermediate:
            from .transformer import MLP

            class _Shared:  # the shared expert: an MLP of its own width
                intermediate_size, hidden_size = shared_intermediate, h
                mlp_bias, lattice_online_rotation = False, None
            self.shared = MLP(_Shared, w, f"{prefix}.shared_expert")
            self.shared_gate = Linear(w.float_matrix(f"{prefix}.shared_expert_gate.weight",
                                                     (1, h)))
        self._native = None  # kernels.moe.NativeMoE, or False when C cannot run it

    @staticmethod
    def _experts(w: WeightLoader, p: str, n_exp: int, inter: int, h: int):
        """(gate, up, down): one PackedMatrix per expert each, from whichever layout the
        checkpoint has; an expert count or shape that disagrees with the config is an
        error naming the tensor."""
        if w.has(f"{p}.gate_up_proj"):
            pairs = w.stacked(f"{p}.gate_up_proj", (n_exp, 2 * inter, h), "linear", parts=2)
            gate, up = [g for g, _ in pairs], [u for _, u in pairs]
            down = [d for (d,) in w.stacked(f"{p}.down_proj", (n_exp, h, inter), "linear")]
        elif w.has(f"{p}.gate_proj"):
            gate, up = ([m for (m,) in w.stacked(f"{p}.{n}_proj", (n_exp, inter, h), "linear")]
                        for n in ("gate", "up"))
            down = [d for (d,) in w.stacked(f"{p}.down_proj", (n_exp, h, inter), "linear")]
        else:
            gate = [w.matrix(f"{p}.{e}.gate_proj.weight", (inter, h), "linear")
                    for e in range(n_exp)]
            up = [w.matrix(f"{p}.{e}.up_proj.weight", (inter, h), "linear")
                  for e in range(n_exp)]
            down = [w.matrix(f"{p}.{e}.down_proj.weight", (h, inter), "linear")
                    for e in range(n_exp)]
        return gate, up, down

    def matrices(self) -> list[PackedMatrix]:
        out = [self.router.weight] + self.gate + self.up + self.down
        if self.shared is not None:
            out += [self.shared.gate_proj.weight, self.shared.up_proj.weight,
                    self.shared.down_proj.weight, self.shared_gate.weight]
        return out

    def active_bytes(self) -> int:
        """Weight bytes one token reads here: the router, top_k experts (their mean size)
        and the shared expert."""
        expert = sum(m.nbytes for m in self.gate + self.up + self.down) / self.num_experts
        shared = 0 if self.shared is None else sum(
            m.nbytes for m in (self.shared.gate_proj.weight, self.shared.up_proj.weight,
                               self.shared.down_proj.weight, self.shared_gate.weight))
        return int(self.router.weight.nbytes + self.top_k * expert + shared)

    def native(self):
        """The C description of this layer (`kernels.moe.NativeMoE`), built on first use;
        None when the native module is missing or a matrix has no C matmul."""
        if self._native is None:
            from ..kernels.moe import NativeMoE
            self._native = NativeMoE.build(self) or False
        return self._native or None

    def __call__(self, x: np.ndarray, ops) -> np.ndarray:
        shape = x.shape
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, self.hidden)
        if getattr(ops, "name", "") == "native":
            c = self.native()
            if c is not None:  # the same grouped dispatch in C (native/src/moe.c)
                return c(flat).reshape(shape)
        return self.reference(flat, ops).reshape(shape)

    def reference(self, flat: np.ndarray, ops) -> np.ndarray:
        """The MoE MLP of rows flat [n, H] with `ops`' matmuls: rows grouped by expert."""
        ids, weights = route(self.router(flat, ops), self.top_k, self.normalize)
        out = np.zeros_like(flat)
        for e in np.unique(ids):  # ascending: each row sums its experts in id order
            rows, slot = np.nonzero(ids == e)
            xe = flat[rows]
            act = ops.silu_mul(ops.matmul(xe, self.gate[e]), ops.matmul(xe, self.up[e]))
            y = ops.matmul(act, self.down[e])
            out[rows] += weights[rows, slot][:, None] * y
        if self.shared is not None:
            s = self.shared(flat, ops)
            out += ops.sigmoid(self.shared_gate(flat, ops)) * s
        return out


def decode_weight_bytes(model) -> int:
    """Weight bytes one decoded token reads, the roofline's denominator: every matrix of
    every layer, a MoE layer counted by its active part only (router, top_k experts of
    average size, shared expert: `SparseMoE.active_bytes`), plus the lm_head (the one
    embedding row is negligible)."""
    seen: set[int] = set()
    total = 0

    def visit(obj, depth: int) -> None:
        nonlocal total
        if isinstance(obj, SparseMoE):
            total += obj.active_bytes()
            return
        if isinstance(obj, PackedMatrix):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += obj.nbytes
            return
        if depth < 3 and hasattr(obj, "__dict__"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    for layer in model.layers:
        visit(layer, 0)
    if id(model.lm_head) not in seen:
        total += model.lm_head.nbytes
    return total


def resident_memory_mb(status: str = "/proc/self/status") -> dict[str, float]:
    """This process's resident memory in MB (Linux): rss, anon (allocated: converted
    weights, caches) and file (pages of mapped files: the memory-mapped experts a run has
    touched so far). Empty where /proc is not there."""
    keys = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    out: dict[str, float] = {}
    try:
        with open(status) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in keys:
                    out[keys[key]] = int(value.split()[0]) / 1024
    except OSError:
        return {}
    return out


__all__ = ["route", "SparseMoE", "decode_weight_bytes", "resident_memory_mb"]
