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
    elementwise   rms_norm, gated_rms_norm, layer_norm, gelu, rope (rope_tables), silu, silu_mul, sigmoid,
                  softplus, softmax, log_sum_exp, add
    kv_attention  attention, paged_attention, encoder_attention(_packed)
    deltanet      causal_conv1d, gated_delta_rule (Qwen3.5's linear attention)
    rotate        block_rotate
    lora          lora_apply (adapters' low-rank updates, see lattice_engine.adapters)
    bandwidth     bench_read, measure_read_bandwidth
    steps         what the fused decode steps share

The fused decode steps sit beside their models: `models.transformer_step.DecoderStep` and
`models.qwen3_5_step.Qwen35Step`. They are not re-exported here: their modules import this
package's parts, so importing them here would be an import cycle, and a lazy module
`__getattr__` would slow every `kernels.X` lookup (CPython does not specialise attribute
loads on a module that defines one).

The library state (`_lib`, `_ffi`, `LOAD_ERROR`) lives in `runtime`: patch it there.
"""

from __future__ import annotations

from .bandwidth import bench_read, measure_read_bandwidth
from .deltanet import causal_conv1d, gated_delta_rule
from .elementwise import (add, gated_rms_norm, gelu, layer_norm, log_sum_exp, rms_norm,
                          rope, rope_tables, sigmoid, silu, silu_mul, softmax, softplus)
from .kv_attention import attention, encoder_attention, encoder_attention_packed, paged_attention
from .lora import lora_apply
from .matmuls import (embed, format_embed, format_matmul, matmul, matmul_multi,
                      q8_0_r16_convert, quantize_q8_0, supports)
from .rotate import block_rotate
from .runtime import (LOAD_ERROR, available, cpu_is_amd, isa, q8_variant, q8_variants, set_isa,
                      set_threads, threads, variant)

__all__ = [
    "available", "isa", "set_isa", "set_threads", "threads", "supports", "q8_variant",
    "q8_variants", "variant",
    "matmul", "matmul_multi", "embed", "quantize_q8_0", "format_matmul", "format_embed",
    "rms_norm", "layer_norm", "gelu", "rope_tables", "rope", "silu", "silu_mul", "softmax", "log_sum_exp",
    "attention", "encoder_attention", "encoder_attention_packed", "add",
    "bench_read", "measure_read_bandwidth",
    "sigmoid", "softplus", "causal_conv1d", "gated_delta_rule", "gated_rms_norm",
    "paged_attention", "block_rotate", "lora_apply",
]
