"""The mixture-of-experts MLP in C (`lk_moe_forward`, native/src/moe.c): the description of
one layer's router, experts and shared expert, built once from a `models.moe.SparseMoE`,
and called on rows [n, hidden] by the per-kernel path; the fused decode steps point their
layers at the same description (`NativeMoE.pointer`)."""

from __future__ import annotations

import numpy as np

from .buffers import _F32, _in
from .runtime import _FLOATS, _L, _fb, _ffi, _lib
from .steps import _fill_linear, _step_format


class NativeMoE:
    """One MoE layer as an `lk_moe`; call it on float32 rows [n, hidden]."""

    def __init__(self, moe):
        keep = self._keep = []
        m = self._m = _ffi.new("lk_moe *")
        m.hidden, m.n_experts, m.top_k = moe.hidden, moe.num_experts, moe.top_k
        m.inter, m.normalize = moe.intermediate, int(moe.normalize)
        _fill_linear(keep, m.router, moe.router.weight)
        self._experts = {}
        for name in ("gate", "up", "down"):
            arr = _ffi.new("lk_linear[]", moe.num_experts)
            for e, w in enumerate(getattr(moe, name)):
                _fill_linear(keep, arr[e], w)
            self._experts[name] = arr
            setattr(m, name, arr)
        m.shared_inter = 0
        if moe.shared is not None:
            m.shared_inter = moe.shared.gate_proj.weight.rows
            for dst, lin in ((m.sh_gate, moe.shared.gate_proj), (m.sh_up, moe.shared.up_proj),
                             (m.sh_down, moe.shared.down_proj), (m.sh_score, moe.shared_gate)):
                _fill_linear(keep, dst, lin.weight)
        if not _L.lk_moe_ok(m):
            raise ValueError("lk_moe_ok refused the MoE description (shapes or formats)")
        self.hidden = moe.hidden

    @classmethod
    def build(cls, moe):
        """The C description of `moe`, or None when the native module is missing or a
        matrix has no C matmul (then the numpy reference runs on the native ops), or the
        layer is larger than the C code takes (LK_MOE_EXPERTS_MAX, LK_MOE_TOPK_MAX)."""
        if _lib is None or moe.num_experts > _lib.LK_MOE_EXPERTS_MAX or \
                moe.top_k > _lib.LK_MOE_TOPK_MAX:
            return None
        if not all(_step_format(w.format) for w in moe.matrices()):
            return None
        if len({w.format.name for w in moe.gate + moe.up}) != 1 or \
                len({w.format.name for w in moe.down}) != 1:
            return None
        return cls(moe)

    @property
    def pointer(self):
        """The `lk_moe *` a fused step's layer points at (valid while self lives)."""
        return self._m

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xp, x = _in(x)
        n = x.size // self.hidden if self.hidden else 0
        out = np.empty((n, self.hidden), _F32)
        rc = _L.lk_moe_forward(self._m, xp, n, _fb(_FLOATS, out, True))
        if rc == -5:
            raise MemoryError("lk_moe_forward: out of memory (or a plugin matmul failed)")
        if rc:
            raise RuntimeError(f"lk_moe_forward failed with code {rc}")
        return out
