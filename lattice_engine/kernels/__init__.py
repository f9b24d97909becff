"""Native kernels: the C library `lattice_engine._native` behind the names and semantics of
`lattice_engine.ops` (the numpy reference they are tested against).

Each function takes an optional `out=` buffer so a model can reuse its activations instead
of allocating per call. Inputs that are already C-contiguous float32 go to C without a
copy; anything else is converted first. Decode calls these hundreds of times per token on
small rows, so the wrappers keep to a few attribute checks (about a microsecond) before the
C call, and this package only re-exports them: `kernels.matmul` is the function itself.

Where each part lives:

    runtime       loading the library (`available`, `LOAD_ERROR`), `isa` / `set_isa`,
                  `q8_variant(s)`, `variant`, `set_threads` / `threads`
    buffers       marshalling numpy arrays into C calls; the weight-format ids
    matmuls       matmul, matmul_multi, embed, quantize_q8_0, q8_0_r16_convert,
                  format_matmul / format_embed, supports
    elementwise   rms_norm, gated_rms_norm, rope (rope_tables), silu, silu_mul, sigmoid,
                  softplus, softmax, log_sum_exp, add
    kv_attention  attention, paged_attention
    deltanet      causal_conv1d, gated_delta_rule (Qwen3.5's linear attention)
    rotate        block_rotate
    bandwidth     bench_read, measure_read_bandwidth
    steps         what the fused decode steps share; the steps themselves sit beside their
                  models (models/transformer_step.py: DecoderStep, models/qwen3_5_step.py:
                  Qwen35Step) and are re-exported here

The library state (`_lib`, `_ffi`, `LOAD_ERROR`) lives in `runtime`: patch it there.
"""

from __future__ import annotations

from .bandwidth import bench_read, measure_read_bandwidth
from .deltanet import causal_conv1d, gated_delta_rule
from .elementwise import (add, gated_rms_norm, log_sum_exp, rms_norm, rope, rope_tables,
                          sigmoid, silu, silu_mul, softmax, softplus)
from .kv_attention import attention, paged_attention
from .matmuls import (embed, format_embed, format_matmul, matmul, matmul_multi,
                      q8_0_r16_convert, quantize_q8_0, supports)
from .rotate import block_rotate
from .runtime import (LOAD_ERROR, available, isa, q8_variant, q8_variants, set_isa,
                      set_threads, threads, variant)

__all__ = [
    "available", "isa", "set_isa", "set_threads", "threads", "supports", "q8_variant",
    "q8_variants", "variant",
    "matmul", "matmul_multi", "embed", "quantize_q8_0", "format_matmul", "format_embed",
    "rms_norm", "rope_tables", "rope", "silu", "silu_mul", "softmax", "log_sum_exp",
    "attention", "add",
    "bench_read", "measure_read_bandwidth", "DecoderStep", "Qwen35Step",
    "sigmoid", "softplus", "causal_conv1d", "gated_delta_rule", "gated_rms_norm",
    "paged_attention", "block_rotate",
]

_STEPS = ("DecoderStep", "Qwen35Step")


def __getattr__(name: str):
    """The fused steps, imported on first use: their modules import this package's parts,
    so importing them here, eagerly, would be a cycle for whoever imports them first."""
    if name == "DecoderStep":
        from ..models.transformer_step import DecoderStep as step
    elif name == "Qwen35Step":
        from ..models.qwen3_5_step import Qwen35Step as step
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = step
    return step


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_STEPS))
