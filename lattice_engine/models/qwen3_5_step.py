"""Qwen35Step: the fused native decode step of Qwen3.5 (qwen3_5.py), the marshalling of its
weights, hybrid cache and paged pools into `lk_qwen35` (native/src/qwen35_decoder.c).
"""

from __future__ import annotations

import numpy as np

from ..kernels.buffers import _F32, _in, _new_or_check
from ..kernels.runtime import _FLOATS, _INT64S, _L, _fb, _ffi
from ..kernels.steps import (_fill_linear, _keep_vec, _kv_array_ok, _kv_pointer, _kv_row,
                             _paged_arrays, _raise_step_error, _run_rows, _run_step, _set_kv_format,
                             _set_rotation, _supports)
from ..quant.formats import PackedMatrix


class Qwen35Step:
    """One Qwen3.5 decode step in a single C call (`lk_qwen35_step`): embed, every Gated
    DeltaNet and gated-attention layer, final norm, for a batch of rows at T = 1.

    Built once per model from its weights (`PackedMatrix` in f32 / f16 / q8_0, float32
    vectors); `bind_cache` points it at a hybrid cache's arrays; calling it embeds B tokens
    at position `pos`, updates the conv / delta states and writes keys and values at `pos`,
    and returns the final-norm hidden states [B, hidden]. The arithmetic is the per-kernel
    path's, kernel for kernel.

    layers: one dict per layer, with "kind" ("linear_attention" or "full_attention"),
    vectors attn_norm, mlp_norm, matrices gate, up, down (optional down_rotation =
    (mix, block)), and
    - linear: matrices in_qkv, in_z, in_b, in_a, out; conv_w [K, conv_dim], neg_a and
      dt_bias [v_heads], head_norm [v_dim];
    - full: matrices q (query and gate rows per head), k, v, o with optional biases
      q_bias ... o_bias; vectors q_norm, k_norm.
    """

    LINEAR, FULL = "linear_attention", "full_attention"
    MATRICES = {LINEAR: ("in_qkv", "in_z", "in_b", "in_a", "out", "gate", "up", "down"),
                FULL: ("q", "k", "v", "o", "gate", "up", "down")}

    supports = staticmethod(_supports)  # as DecoderStep.supports

    @classmethod
    def matrices_of(cls, layers: list[dict]) -> list[PackedMatrix]:
        """The matrices the step multiplies by itself (a MoE layer's experts are checked by
        its NativeMoE)."""
        return [L[n] for L in layers for n in cls.MATRICES[L["kind"]]
                if n in L or not L.get("moe")]

    def __init__(self, *, hidden: int, intermediate: int, n_heads: int, n_kv_heads: int,
                 head_dim: int, rope_half: int, lin_k_heads: int, lin_v_heads: int,
                 lin_k_dim: int, lin_v_dim: int, conv_kernel: int, eps: float,
                 embed: PackedMatrix, final_norm: np.ndarray, layers: list[dict]):
        if not self.supports(embed, *self.matrices_of(layers)):
            raise ValueError("Qwen35Step: every matrix must be f32, f16 or q8_0 with the "
                             "native module built")
        keep = self._keep = []
        m = _ffi.new("lk_qwen35 *")
        m.n_layers, m.hidden, m.intermediate = len(layers), hidden, intermediate
        m.n_heads, m.n_kv_heads, m.head_dim, m.rope_half = n_heads, n_kv_heads, head_dim, rope_half
        m.lin_k_heads, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim = (lin_k_heads, lin_v_heads,
                                                                 lin_k_dim, lin_v_dim)
        m.conv_kernel, m.eps = conv_kernel, eps
        _fill_linear(keep, m.embed, embed)
        m.final_norm = _keep_vec(keep, final_norm)
        self._layers = _ffi.new("lk_qwen35_layer[]", max(len(layers), 1))
        self._kinds = [spec["kind"] for spec in layers]
        for i, spec in enumerate(layers):
            L = self._layers[i]
            L.kind = 0 if spec["kind"] == self.LINEAR else 1
            L.attn_norm = _keep_vec(keep, spec["attn_norm"])
            L.mlp_norm = _keep_vec(keep, spec["mlp_norm"])
            for name in self.MATRICES[spec["kind"]]:
                if name in spec or not spec.get("moe"):
                    _fill_linear(keep, getattr(L, name), spec[name], spec.get(f"{name}_bias"),
                                 spec.get(f"{name}_adapters"))
            if spec.get("moe"):  # a MoE MLP (kernels.moe.NativeMoE) instead of gate/up/down
                keep.append(spec["moe"])
                L.moe = spec["moe"].pointer
            if spec["kind"] == self.LINEAR:
                for name in ("conv_w", "neg_a", "dt_bias", "head_norm"):
                    setattr(L, name, _keep_vec(keep, spec[name]))
            else:
                L.q_norm = _keep_vec(keep, spec["q_norm"])
                L.k_norm = _keep_vec(keep, spec["k_norm"])
            _set_rotation(keep, L.down_in, spec.get("down_rotation"))
        m.layers = self._layers
        m.cache_cap = 0
        self._m = m
        self._hidden = hidden
        self._bound: tuple = ()
        self._paged = None
        self._work = np.empty(0, _F32)
        self.kv_dtype = "f32"

    def set_kv_format(self, dtype: str, key_transforms=None) -> None:
        """Store the attention layers' keys and values as `dtype` (see
        `DecoderStep.set_kv_format`; key_transforms per attention layer, in order)."""
        full = [self._layers[i] for i, kind in enumerate(self._kinds) if kind == self.FULL]
        _set_kv_format(self, full, dtype, key_transforms)
        self._bound = ()
        self._paged = None

    def bind_cache(self, keys: list[np.ndarray], values: list[np.ndarray],
                   conv: list[np.ndarray], delta: list[np.ndarray]) -> None:
        """Point the layers at a hybrid cache's arrays: keys / values [B, capacity, H_kv, D]
        of the attention layers and conv [B, K-1, conv_dim] / delta [B, Hv, Dk, Dv] states
        of the DeltaNet layers, each list in layer order (re-bind after the KV grows)."""
        m = self._m
        n_full = self._kinds.count(self.FULL)
        if len(keys) != n_full or len(values) != n_full or \
                len(conv) != len(delta) or len(conv) != len(self._kinds) - n_full:
            raise ValueError(f"bind_cache: {len(keys)} key / {len(conv)} state arrays for "
                             f"{n_full} attention and {len(self._kinds) - n_full} DeltaNet layers")
        cap = keys[0].shape[1] if keys else 1 << 62
        batch = (keys or conv)[0].shape[0] if (keys or conv) else 0
        conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
        want = {"kv": (batch, cap, m.n_kv_heads, _kv_row(self.kv_dtype, m.head_dim)),
                "conv": (batch, m.conv_kernel - 1, conv_dim),
                "delta": (batch, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim)}
        for kind, arrays in (("kv", keys), ("kv", values), ("conv", conv), ("delta", delta)):
            for a in arrays:
                if not _kv_array_ok(a, self.kv_dtype if kind == "kv" else "f32", want[kind]):
                    raise ValueError(f"bind_cache: a {kind} array {a.dtype} {a.shape} is not "
                                     f"C-contiguous float32 {want[kind]}")
        full = linear = 0
        for i, kind in enumerate(self._kinds):
            L = self._layers[i]
            if kind == self.FULL:
                L.k_cache = _kv_pointer(keys[full])
                L.v_cache = _kv_pointer(values[full])
                full += 1
            else:
                L.conv_state = _fb(_FLOATS, conv[linear], True)
                L.delta_state = _fb(_FLOATS, delta[linear], True)
                linear += 1
        m.cache_cap = cap
        self._bound = (batch, tuple(keys), tuple(values), tuple(conv), tuple(delta))

    def is_bound_to(self, keys, values, conv, delta) -> bool:
        if not self._bound:
            return False
        arrays = self._bound[1:]
        return all(len(a) == len(b) and all(x is y for x, y in zip(a, b))
                   for a, b in zip(arrays, (keys, values, conv, delta)))

    def __call__(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        B = tokens.size
        if not self._bound or B != self._bound[0]:
            raise ValueError(f"decode step: {B} tokens for a cache bound with "
                             f"{self._bound[0] if self._bound else 'no'} rows; bind_cache first")
        out = _new_or_check(out, (B, self._hidden))
        self._work = _run_step(_L.lk_qwen35_step, _L.lk_qwen35_work_size, self._m, self._work,
                               tokens, pos, cos, sin, out, "lk_qwen35_step")
        return out

    def rows(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
             trails: list | None = None) -> np.ndarray:
        """T rows of one sequence (the bound cache's sequence 0, batch 1) at positions pos ..
        pos + T - 1 in one call (`lk_qwen35_step_rows`: a speculative verify): cos / sin
        [T, rope_half]; the DeltaNet layers run token by token, and with trails (per
        DeltaNet layer (conv [T, 1, K-1, conv_dim], delta rows [T, 1, conv_dim + 2 Hv]), as
        `HybridCache.trail_views` gives them) keep each row's conv window and delta-rule
        inputs there, leaving the delta states as they were (the kept rows are replayed on
        them). Returns
        the final-norm hidden states [T, hidden], each row's bits a decode step's."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        if not self._bound or self._bound[0] != 1:
            raise ValueError("decode step rows: bind a cache of batch 1 first")
        ptrs = _ffi.NULL
        if trails is not None:
            m, T = self._m, tokens.size
            conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
            want = ((T, 1, m.conv_kernel - 1, conv_dim), (T, 1, conv_dim + 2 * m.lin_v_heads))
            linear = [i for i, kind in enumerate(self._kinds) if kind != self.FULL]
            if len(trails) != len(linear):
                raise ValueError(f"decode step: {len(trails)} trails for {len(linear)} "
                                 f"DeltaNet layers")
            ptrs = _ffi.new("float *[]", 2 * max(len(self._kinds), 1))
            for i, pair in zip(linear, trails):
                for j, (a, shape) in enumerate(zip(pair, want)):
                    if a.dtype != _F32 or not a.flags.c_contiguous or a.shape != shape:
                        raise ValueError(f"decode step: a trail {a.dtype} {a.shape} is not "
                                         f"C-contiguous float32 {shape}")
                    ptrs[2 * i + j] = _fb(_FLOATS, a, True)
        out = np.empty((tokens.size, self._hidden), _F32)
        self._work = _run_rows(_L.lk_qwen35_step_rows, _L.lk_qwen35_work_size, self._m,
                               self._work, tokens, pos, cos, sin, out, "lk_qwen35_step_rows",
                               ptrs)
        return out

    def paged(self, tokens: np.ndarray, cos: np.ndarray, sin: np.ndarray, batch,
              keys: list[np.ndarray], values: list[np.ndarray],
              states: list[np.ndarray], trails: dict | None = None) -> np.ndarray:
        """The step over a flat batch of sequences in a paged cache (`lk_qwen35_step_paged`;
        `paged_forward.PagedBatch`: rows at their own positions, prefill chunks and decode
        rows alike): cos / sin [n, rope_half] for the rows' positions; keys / values the
        attention layers' pools [num_blocks, block_size, H_kv, D] and states the DeltaNet
        layers' state slots (conv [slots, K-1, conv_dim], delta [slots, Hv, Dk, Dv] per
        layer, alternating), each in layer order. Writes keys and values at the rows' slots,
        advances each sequence's states in its slot, and returns the final-norm hidden
        states [n, hidden]. trails: {sequence index: [(conv trail [rows, K-1, conv_dim],
        delta rows [rows, conv_dim + 2 Hv]) per DeltaNet layer]} for the verified sequences
        of a speculative step, which keep each row's conv window and delta-rule inputs there
        and leave their delta states as they were (`lk_qwen35_step_paged_trail`)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = tokens.size
        ptrs, (num_blocks, block_size), num_slots = self._pools(keys, values, states)
        slots, q_start, pos_start, tables, state_slots = _paged_arrays(
            batch, n, cos, self._m.rope_half, states=True)
        need = _L.lk_qwen35_work_size(self._m, n)
        if self._work.size < need:
            self._work = np.empty(need, _F32)
        out = np.empty((n, self._hidden), _F32)
        cp, cos = _in(cos)
        sp, sin = _in(sin)
        trail_ptrs = self._trail_pointers(trails, pos_start.size, q_start) if trails \
            else _ffi.NULL
        rc = _L.lk_qwen35_step_paged_trail(
            self._m, _fb(_INT64S, tokens), n, cp, sp, _fb(_INT64S, slots), ptrs[0], ptrs[1],
            num_blocks, block_size, ptrs[2], ptrs[3], num_slots, _fb(_INT64S, state_slots),
            pos_start.size, _fb(_INT64S, q_start), _fb(_INT64S, pos_start),
            _ffi.cast("int32_t *", _fb(tables)), tables.shape[1] if tables.ndim == 2 else 0,
            trail_ptrs, _fb(_FLOATS, self._work, True), self._work.size,
            _fb(_FLOATS, out, True))
        _raise_step_error(rc, tokens, self._m, "lk_qwen35_step_paged",
                          "a row's slot, position, block table or recurrent-state slot is "
                          "outside the cache")
        return out

    def _trail_pointers(self, trails: dict, nseq: int, q_start: np.ndarray):
        """The trails argument of lk_qwen35_step_paged_trail (shapes checked: C writes
        rows x row floats into each)."""
        m, layers = self._m, len(self._kinds)
        conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
        ptrs = _ffi.new("float *[]", 2 * nseq * layers)
        for s, per_layer in trails.items():
            rows = int(q_start[s + 1] - q_start[s])
            want = ((rows, m.conv_kernel - 1, conv_dim), (rows, conv_dim + 2 * m.lin_v_heads))
            linear = [i for i, kind in enumerate(self._kinds) if kind != self.FULL]
            if len(per_layer) != len(linear):
                raise ValueError(f"decode step: {len(per_layer)} trails for {len(linear)} "
                                 f"DeltaNet layers")
            for i, pair in zip(linear, per_layer):
                for j, (a, shape) in enumerate(zip(pair, want)):
                    if a.dtype is not _F32 or not a.flags.c_contiguous or a.shape != shape:
                        raise ValueError(f"decode step: a trail {a.dtype} {a.shape} is not "
                                         f"C-contiguous float32 {shape}")
                    ptrs[2 * (s * layers + i) + j] = _fb(_FLOATS, a, True)
        return ptrs

    def _pools(self, keys, values, states):
        """Per-layer pointer arrays (k, v, conv, delta; NULL where a layer has none), kept
        while the cache keeps its arrays; the KV pools' (blocks, block_size), state slots."""
        arrays = (tuple(keys), tuple(values), tuple(states))
        ident = tuple(id(a) for group in arrays for a in group)
        if self._paged is not None and self._paged[0] == ident:
            return self._paged[1:4]
        m = self._m
        n_full = self._kinds.count(self.FULL)
        n_linear = len(self._kinds) - n_full
        if len(keys) != n_full or len(values) != n_full or len(states) != 2 * n_linear:
            raise ValueError(f"decode step: {len(keys)} key pools and {len(states)} state "
                             f"arrays for {n_full} attention and {n_linear} DeltaNet layers")
        kv = keys[0].shape[:2] if keys else (0, 1)
        slots = states[0].shape[0] if states else 0
        conv_dim = 2 * m.lin_k_heads * m.lin_k_dim + m.lin_v_heads * m.lin_v_dim
        want = {"kv": kv + (m.n_kv_heads, _kv_row(self.kv_dtype, m.head_dim)),
                "conv": (slots, m.conv_kernel - 1, conv_dim),
                "delta": (slots, m.lin_v_heads, m.lin_k_dim, m.lin_v_dim)}
        for kind, group in (("kv", keys), ("kv", values), ("conv", states[0::2]),
                            ("delta", states[1::2])):
            for a in group:
                if not _kv_array_ok(a, self.kv_dtype if kind == "kv" else "f32", want[kind]):
                    raise ValueError(f"decode step: a {kind} pool {a.dtype} {a.shape} is not "
                                     f"C-contiguous float32 {want[kind]}")
        ptrs = [_ffi.new("void *[]", max(len(self._kinds), 1)) for _ in range(2)] + \
            [_ffi.new("float *[]", max(len(self._kinds), 1)) for _ in range(2)]
        full = linear = 0
        for i, kind in enumerate(self._kinds):
            if kind == self.FULL:
                ptrs[0][i] = _kv_pointer(keys[full])
                ptrs[1][i] = _kv_pointer(values[full])
                full += 1
            else:
                ptrs[2][i] = _fb(_FLOATS, states[2 * linear], True)
                ptrs[3][i] = _fb(_FLOATS, states[2 * linear + 1], True)
                linear += 1
        # the arrays themselves are kept too: the pointers must not outlive them
        self._paged = (ident, ptrs, kv, slots, arrays)
        return self._paged[1:4]
