"""DecoderStep: the fused native decode step of the llama-family decoder (transformer.py),
the marshalling of its weights and cache into `lk_decoder` (native/src/decoder.c).
"""

from __future__ import annotations

import numpy as np

from ..kernels.buffers import _F32, _in, _new_or_check
from ..kernels.runtime import _FLOATS, _INT64S, _L, _fb, _ffi
from ..kernels.steps import (_fill_linear, _keep_vec, _kv_array_ok, _kv_pointer, _kv_row,
                             _paged_arrays, _raise_step_error, _run_rows, _run_step, _set_kv_format,
                             _set_rotation, _supports)
from ..quant.formats import PackedMatrix


class DecoderStep:
    """One decode step of a llama-family decoder in a single C call (`lk_decoder_step`).

    Built once per model from its weights (`PackedMatrix` in f32 / f16 / q8_0 and float32
    vectors); `bind_cache` points it at a cache's per-layer key/value arrays
    [B, capacity, H_kv, D]; calling it embeds B tokens at position `pos`, runs every layer
    (writing their keys and values at `pos`) and returns the final-norm hidden states
    [B, hidden]. The arithmetic is the per-kernel path's, kernel for kernel.

    layers: one dict per layer with matrices q, k, v, o, gate, up, down (PackedMatrix),
    optional biases q_bias / k_bias / v_bias / o_bias / gate_bias / up_bias / down_bias,
    vectors attn_norm, mlp_norm and optional q_norm / k_norm, and optionally
    down_rotation = (mix [m, m], block): `block_rotate` of the MLP activations before down.
    A layer with "moe" (a `kernels.moe.NativeMoE`) runs that MoE MLP instead and has no
    gate / up / down.
    """

    MATRICES = ("q", "k", "v", "o", "gate", "up", "down")

    supports = staticmethod(_supports)

    @classmethod
    def matrices_of(cls, layers: list[dict]) -> list[PackedMatrix]:
        """The matrices the step multiplies by itself (a MoE layer's experts are checked by
        its NativeMoE)."""
        return [L[n] for L in layers for n in cls.MATRICES if n in L or not L.get("moe")]

    def __init__(self, *, hidden: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 intermediate: int, eps: float, rope_half: int, interleaved: bool = False,
                 norm_offset: float = 0.0, embed: PackedMatrix, final_norm: np.ndarray,
                 layers: list[dict]):
        if not self.supports(embed, *self.matrices_of(layers)):
            raise ValueError("DecoderStep: every matrix must be f32, f16, q8_0 or a plugin "
                             "format with a C matmul (the embedding a core format), with the "
                             "native module built")
        keep = self._keep = []  # arrays the C structs point into
        m = _ffi.new("lk_decoder *")
        m.n_layers, m.hidden, m.n_heads, m.n_kv_heads = len(layers), hidden, n_heads, n_kv_heads
        m.head_dim, m.intermediate, m.rope_half = head_dim, intermediate, rope_half
        m.rope_interleaved, m.eps, m.norm_offset = int(interleaved), eps, norm_offset
        _fill_linear(keep, m.embed, embed)
        m.final_norm = _keep_vec(keep, final_norm)
        self._layers = _ffi.new("lk_decoder_layer[]", max(len(layers), 1))
        for i, spec in enumerate(layers):
            L = self._layers[i]
            L.attn_norm = _keep_vec(keep, spec["attn_norm"])
            L.mlp_norm = _keep_vec(keep, spec["mlp_norm"])
            L.q_norm = _keep_vec(keep, spec.get("q_norm"))
            L.k_norm = _keep_vec(keep, spec.get("k_norm"))
            for name in self.MATRICES:
                if name in spec or not spec.get("moe"):
                    _fill_linear(keep, getattr(L, name), spec[name], spec.get(f"{name}_bias"),
                                 spec.get(f"{name}_adapters"))
            if spec.get("moe"):
                keep.append(spec["moe"])
                L.moe = spec["moe"].pointer
            for site, key in (("down_in", "down_rotation"), ("attn_in", "attn_in_rotation"),
                              ("mlp_in", "mlp_in_rotation"), ("o_in", "o_rotation")):
                _set_rotation(keep, getattr(L, site), spec.get(key))
        m.layers = self._layers
        m.cache_cap = 0
        self._m = m
        self._hidden = hidden
        self._cache_arrays: tuple = ()
        self._paged = None  # (pool identities, key / value pointer arrays, pool shape, pools)
        self._work = np.empty(0, _F32)
        self.kv_dtype = "f32"

    def set_kv_format(self, dtype: str, key_transforms=None) -> None:
        """Store keys and values as `dtype` ("f32" | "f16" | "q8_0", `cache.dense`) in the
        caches / pools bound afterwards, q8_0 keys through key_transforms (per layer
        (k_shift, k_scale) [H_kv, D] or None, `cache.dense.key_transform`)."""
        _set_kv_format(self, [self._layers[i] for i in range(self._m.n_layers)], dtype,
                       key_transforms)
        self._cache_arrays = ()
        self._paged = None

    def _kv_shape(self, lead: tuple) -> tuple:
        return lead + (self._m.n_kv_heads, _kv_row(self.kv_dtype, self._m.head_dim))

    def bind_cache(self, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Point the layers at these key/value arrays (re-bind after the cache grows)."""
        if len(keys) != self._m.n_layers or len(values) != self._m.n_layers:
            raise ValueError(f"bind_cache: {len(keys)} key arrays for {self._m.n_layers} layers")
        cap = keys[0].shape[1] if keys else 0
        for i, (k, v) in enumerate(zip(keys, values)):
            want = self._kv_shape(k.shape[:1] + (cap,))
            for a in (k, v):
                if not _kv_array_ok(a, self.kv_dtype, want):
                    raise ValueError(f"bind_cache: layer {i} cache array {a.shape} {a.dtype} "
                                     f"is not a C-contiguous {self.kv_dtype} cache {want}")
            self._layers[i].k_cache = _kv_pointer(k)
            self._layers[i].v_cache = _kv_pointer(v)
        self._m.cache_cap = cap
        self._cache_arrays = (tuple(keys), tuple(values))

    def is_bound_to(self, keys: list[np.ndarray], values: list[np.ndarray]) -> bool:
        bound = self._cache_arrays
        return bool(bound) and all(a is b for a, b in zip(bound[0], keys)) and all(
            a is b for a, b in zip(bound[1], values)) and len(bound[0]) == len(keys)

    def __call__(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray,
                 out: np.ndarray | None = None) -> np.ndarray:
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        out = _new_or_check(out, (tokens.size, self._hidden))
        self._work = _run_step(_L.lk_decoder_step, _L.lk_decoder_work_size, self._m, self._work,
                               tokens, pos, cos, sin, out, "lk_decoder_step")
        return out

    def rows(self, tokens: np.ndarray, pos: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """T rows of one sequence (the bound cache's sequence 0) at positions pos .. pos + T
        - 1 in one call (`lk_decoder_step_rows`: a speculative verify, a draft model
        catching up): cos / sin [T, rope_half]; writes their keys and values and returns the
        final-norm hidden states [T, hidden], each row's bits those of a decode step."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        out = np.empty((tokens.size, self._hidden), _F32)
        self._work = _run_rows(_L.lk_decoder_step_rows, _L.lk_decoder_work_size, self._m,
                               self._work, tokens, pos, cos, sin, out, "lk_decoder_step_rows")
        return out

    def paged(self, tokens: np.ndarray, cos: np.ndarray, sin: np.ndarray, batch,
              keys: list[np.ndarray], values: list[np.ndarray]) -> np.ndarray:
        """The step over a flat batch of sequences in a paged KV cache
        (`paged_forward.PagedBatch`: rows at their own positions, prefill chunks and decode
        rows alike): cos / sin [n, rope_half] for the rows' positions, keys / values each
        layer's pool [num_blocks, block_size, H_kv, D]. Writes the rows' keys and values at
        their slots and returns the final-norm hidden states [n, hidden]."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        n = tokens.size
        k_ptrs, v_ptrs, (num_blocks, block_size) = self._pools(keys, values)
        slots, q_start, pos_start, tables, _ = _paged_arrays(batch, n, cos, self._m.rope_half)
        need = _L.lk_decoder_work_size(self._m, n)
        if self._work.size < need:
            self._work = np.empty(need, _F32)
        out = np.empty((n, self._hidden), _F32)
        cp, cos = _in(cos)
        sp, sin = _in(sin)
        rc = _L.lk_decoder_step_paged(
            self._m, _fb(_INT64S, tokens), n, cp, sp, _fb(_INT64S, slots), k_ptrs, v_ptrs,
            num_blocks, block_size, pos_start.size, _fb(_INT64S, q_start),
            _fb(_INT64S, pos_start), _ffi.cast("int32_t *", _fb(tables)),
            tables.shape[1] if tables.ndim == 2 else 0, _fb(_FLOATS, self._work, True),
            self._work.size, _fb(_FLOATS, out, True))
        _raise_step_error(rc, tokens, self._m, "lk_decoder_step_paged",
                          "a row's slot, position or block table is outside the KV pool")
        return out

    def _pools(self, keys, values):
        """Pointer arrays to every layer's pools, kept while the cache keeps its arrays."""
        ident = tuple(map(id, keys)) + tuple(map(id, values))
        if self._paged is None or self._paged[0] != ident:
            n_layers = self._m.n_layers
            if len(keys) != n_layers or len(values) != n_layers:
                raise ValueError(f"decode step: {len(keys)} key pools for {n_layers} layers")
            shape = self._kv_shape(keys[0].shape[:2] if keys else (0, 1))
            for a in list(keys) + list(values):
                if not _kv_array_ok(a, self.kv_dtype, shape):
                    raise ValueError(f"decode step: a KV pool {a.shape} {a.dtype} is not a "
                                     f"C-contiguous {self.kv_dtype} pool {shape}")
            k_ptrs = _ffi.new("void *[]", [_kv_pointer(a) for a in keys] or [_ffi.NULL])
            v_ptrs = _ffi.new("void *[]", [_kv_pointer(a) for a in values] or [_ffi.NULL])
            # the arrays themselves are kept too: the pointers must not outlive them
            self._paged = (ident, k_ptrs, v_ptrs, shape[:2], (tuple(keys), tuple(values)))
        return self._paged[1], self._paged[2], self._paged[3]
