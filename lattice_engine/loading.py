"""From a path or catalog name to a ready model: read the checkpoint, pick the formats,
build the architecture, attach the tokenizer."""

from __future__ import annotations

import gc
import logging
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import ops as numpy_ops
from .errors import CheckpointError, ConfigError, PluginError
from .io.checkpoint import Checkpoint
from .models import model_class_for
from .models.base import ConfigFieldError, WeightLoader
from .quant.methods import GGUF_METHOD, QuantSpec
from .tokenizer import TextTokenizer

log = logging.getLogger(__name__)

OP_NAMES = ("matmul", "embed", "rms_norm", "rope_tables", "rope", "silu_mul", "softmax",
            "attention", "sigmoid", "softplus", "causal_conv1d", "gated_delta_rule",
            "gated_rms_norm", "paged_attention", "block_rotate", "layer_norm", "gelu",
            "lora_apply", "encoder_attention", "encoder_attention_packed")
BACKENDS = ("auto", "native", "numpy")


def get_ops(backend: str = "auto"):
    """The op set a model computes with: C kernels ("native") or numpy ("numpy")."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "numpy":
        return numpy_ops
    try:
        from . import kernels
        native_ok = kernels.available()
    except ImportError:
        native_ok = False
    if not native_ok:
        if backend == "native":
            raise ConfigError("backend 'native' was asked for but the C kernels are not built; "
                              "reinstall with `pip install .` (needs a C compiler) or use "
                              "backend = 'numpy'")
        return numpy_ops
    return types.SimpleNamespace(
        name="native", **{n: getattr(kernels, n, getattr(numpy_ops, n)) for n in OP_NAMES})


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Optional[TextTokenizer]
    checkpoint: Checkpoint
    name: str
    quant: str
    loader: Any = None  # the WeightLoader that built the model (quantize reads it)


def open_checkpoint(path: Path, formats: dict) -> Checkpoint:
    """Read an HF folder or a GGUF file; refuse anything else with the reason."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model path {str(path)!r} does not exist; give an HF folder, a "
                              f".gguf file, or a catalog name (see `lattice models`)")
    if path.is_dir():
        from .io.hf_folder import load_hf_folder
        return load_hf_folder(path)
    if path.suffix == ".gguf":
        from .io.gguf_reader import load_gguf
        packed = {f.gguf_type: f.name for f in formats.values() if f.gguf_type is not None}
        return load_gguf(path, packed_formats=packed)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise CheckpointError(f"{path} is a pickle checkpoint; lattice never loads pickle (it "
                              f"can run arbitrary code). Convert it to safetensors first")
    if path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a bare safetensors file; give the folder that holds "
                              f"it with its config.json and tokenizer.json")
    raise CheckpointError(f"{path} is neither a model folder nor a .gguf file")


def resolve_source(source: str | Path) -> Path:
    """A path that exists, or a catalog name (pulled on first use)."""
    from .io.catalog import CATALOG, resolve
    text = str(source)
    if text not in CATALOG and not Path(text).expanduser().exists() and (
            "/" in text or "\\" in text or text.endswith(".gguf")):
        raise CheckpointError(f"model path {text!r} does not exist; give an HF folder, a "
                              f".gguf file, or a catalog name ({', '.join(CATALOG)})")
    return resolve(source)


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a model loads (restored after): a
    150k-token vocabulary and its merges are ~450k new containers, each few hundred of
    which set off a collection that walks every live one; loading the catalog's
    Qwen2.5-Coder-0.5B took 2.88 -> 2.64 s (medians of 8 alternated runs). A load makes
    no reference cycles worth collecting mid-way; the next collection takes any."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load(source: str | Path, *, quant: QuantSpec = QuantSpec(), backend: str = "auto",
         plugin_manager=None, transforms: Optional[dict[str, Any]] = None,
         loader_class=WeightLoader, kv_cache: str = "auto") -> LoadedModel:
    """Load a model by path or catalog name, quantized as `quant` asks.

    `transforms` (name -> settings, see `lattice_engine.transforms`) rewrite the
    checkpoint's weights before they are quantized, in order. `kv_cache` is how the
    model's caches store keys and values (`cache.dense.KV_DTYPES`, or "auto": f32 when
    the quant method is f32, else f16; a model that keeps its own float32 cache keeps it).

    Raises:
        CheckpointError: the files are missing, malformed, or of an unsupported architecture.
        PluginError: the quant method or a weight format is not registered.
    """
    with _collector_paused():
        return _load(source, quant, backend, plugin_manager, transforms, loader_class,
                     kv_cache)


def _load(source, quant, backend, plugin_manager, transforms, loader_class,
          kv_cache) -> LoadedModel:
    from .plugins import get_plugin_manager
    from .quant.methods import missing_method_hint
    registry = (plugin_manager or get_plugin_manager()).registry
    formats = registry.items.get("weight_formats", {})
    if quant.method is not None and quant.method not in registry.names("quant_methods"):
        raise PluginError(f"unknown quant method {quant.method!r}; registered: "
                          f"{', '.join(sorted(registry.names('quant_methods')))}"
                          f"{missing_method_hint(quant.method)}")
    path = resolve_source(source)
    checkpoint = open_checkpoint(path, formats)
    from .io.hugepages import trim_heap
    trim_heap()  # the header's parsing temporaries, before the weights take their place
    if transforms:
        from .transforms import apply_transforms
        checkpoint = apply_transforms(checkpoint, transforms, registry)
    # a checkpoint written by `lattice quantize`, or a GGUF file, loads as stored unless
    # told otherwise
    ops = get_ops(backend)
    stored = checkpoint.config.get("quantization") or {}
    if not stored and quant.method is None and checkpoint.stored_types:
        stored = gguf_as_stored(checkpoint, formats, requantize=q8_0_is_vectorized(ops))
    elif quant.method == GGUF_METHOD.name:
        if not checkpoint.stored_types:
            raise ConfigError(f"quant method {GGUF_METHOD.name!r} runs a GGUF file's blocks as "
                              f"stored, and {path} is not a GGUF file; pick another method "
                              f"(q8_0, f16, f32, ...) or give a .gguf file")
        stored = gguf_blocks_as_stored(checkpoint, formats)
    method_name = quant.method or stored.get("method") or "f32"
    if method_name not in registry.names("quant_methods"):
        raise PluginError(f"{path} was quantized with method {method_name!r}, which is not "
                          f"registered{missing_method_hint(method_name)}")
    group_size = quant.group_size
    overrides = dict(quant.overrides)
    if method_name == stored.get("method") and group_size in (None, stored.get("group_size")):
        group_size = stored.get("group_size")
        # every stored tensor keeps its stored format: no re-quantization
        for name, fmt in stored.get("formats", {}).items():
            overrides.setdefault(name, fmt)  # the user's overrides come first and win
    method = registry.get("quant_methods", method_name).with_group_size(group_size)
    cls = model_class_for(checkpoint.config, registry.items.get("architectures", {}))
    loader = loader_class(checkpoint, method, formats, overrides,
                          native_layout=getattr(ops, "name", "") == "native")
    try:
        model = cls.from_checkpoint(checkpoint, loader, ops)
    except ConfigFieldError as exc:
        where = f"{path / 'config.json'}" if path.is_dir() else f"{path} (its metadata)"
        raise CheckpointError(f"{where}: {exc}") from None
    from .cache.dense import KV_AUTO, default_kv_dtype
    if kv_cache == KV_AUTO:
        if hasattr(model, "kv_cache"):
            set_kv_cache(model, default_kv_dtype(method_name))
    elif kv_cache != "f32":
        set_kv_cache(model, kv_cache)
    unused = loader.unused()
    if unused:
        log.info("%d checkpoint tensors not used by %s: %s", len(unused), cls.__module__,
                 ", ".join(unused[:8]))
    tokenizer = None
    if checkpoint.tokenizer is not None:
        tokenizer = TextTokenizer(checkpoint.tokenizer, checkpoint.tokenizer_config,
                                  checkpoint.generation_config, checkpoint.config)
    return LoadedModel(model, tokenizer, checkpoint, str(source), method_name, loader)


# the formats a GGUF file keeps when it loads as stored: the core's, whose kernels run a
# llama.cpp file's blocks exactly. (Q4_0 / Q4_1 map to lattice-quant-q4's formats too, but
# those kernels quantize activations to int8: on SmolLM2-135M's Q4_1 file they move the
# 512-token NLL of the file's values by +0.0035, q8_0 by +0.0018, so q8_0 is the default.)
_AS_STORED_FORMATS = ("f32", "f16", "q8_0")
# ggml float types: a file mostly of these loads as float32, the values it holds
_GGML_FLOATS = (0, 1, 28, 30)  # F32, F16, F64, BF16
# the method of a file mostly of block types the core has no kernels for (Q4_K_M's Q4_K,
# Q6_K, Q5_0; Q4_0, Q4_1, ...): the nearest core format. Its rounding of the file's values
# is far below theirs (Qwen2.5-Coder-0.5B Q4_K_M, 512 WikiText-2 tokens: NLL 3.0569 either
# way, rms logit change 0.027), and float32 would read 4x the bytes per token (2.5 GB
# resident for that model, 7.3 GB for the 1.5B)
_GGUF_FALLBACK_METHOD = "q8_0"


def q8_0_is_vectorized(ops) -> bool:
    """Whether `ops` runs q8_0 with SIMD kernels: the native backend on an x86 variant. The
    generic C (LATTICE_ISA=generic, or a CPU without a variant) multiplies q8_0 3-5x slower
    than float32 (4864 x 896, M = 1 / 8: 12.8 vs 4.1 / 79.6 vs 14.1 ms)."""
    if getattr(ops, "name", "") != "native":
        return False
    from . import kernels
    return kernels.isa() != "generic"


def gguf_as_stored(checkpoint, formats: dict, requantize: bool = True) -> dict[str, Any]:
    """How a GGUF file loads when no quant method is asked for, in the shape of a
    `lattice quantize` checkpoint's quantization section: every matrix in one of the core's
    formats (f32, f16, q8_0) kept as it is, as llama.cpp runs the file, under the method of
    the file's main type: that format when the core has it; for a file mostly of other
    block types (K-quants, Q4_0, ...) q8_0 when `requantize` (its other matrices rounded to
    q8_0 from the values they dequantize to: what the vectorized kernels run fastest), else
    ({}) float32; and float32 for a file mostly of F32 or BF16."""
    by_type = _formats_by_type(formats, lambda name, f: name in _AS_STORED_FORMATS)
    weight: dict[int, int] = {}
    kept: dict[str, str] = {}
    for name, ggml in checkpoint.stored_types.items():
        shape = checkpoint.shapes.get(name, ())
        if len(shape) < 2:
            continue  # norms and biases are float32 whatever the file holds
        weight[ggml] = weight.get(ggml, 0) + int(np.prod(shape))
        if ggml in by_type and len(shape) == 2:
            kept[name] = by_type[ggml]
    if not weight:
        return {}
    main = max(weight, key=weight.__getitem__)
    fmt = by_type.get(main)
    if fmt is None and requantize and main not in _GGML_FLOATS and \
            _GGUF_FALLBACK_METHOD in formats:
        fmt = _GGUF_FALLBACK_METHOD
    if fmt is None or fmt == "f32":
        return {}
    return {"method": fmt, "formats": kept}


def gguf_blocks_as_stored(checkpoint, formats: dict) -> dict[str, Any]:
    """The `gguf` quant method: every matrix whose block type has a registered format with
    a native matmul here (or is f32 / f16 / q8_0) kept in the file's bytes, the others q8_0.
    A Q4_K_M file then holds 4.5-6.6 bits per weight instead of q8_0's 8.5 (Qwen2.5-Coder-1.5B:
    1.1 GB resident instead of 1.7) and loads without converting a block; its logits are the
    file's values times x rounded to int8 as llama.cpp does (`quant/ggml_formats.py`)."""
    from .quant.ggml_formats import is_core_ggml
    by_type = _formats_by_type(formats, lambda name, f: name in _AS_STORED_FORMATS or
                               is_core_ggml(f))
    kept = {name: by_type[ggml] for name, ggml in checkpoint.stored_types.items()
            if ggml in by_type and len(checkpoint.shapes.get(name, ())) == 2}
    return {"method": GGUF_METHOD.name, "formats": kept}


def _formats_by_type(formats: dict, keep) -> dict[int, str]:
    """ggml type id -> name of the registered format holding it, for the formats `keep`
    (name, format) accepts."""
    return {f.gguf_type: name for name, f in formats.items()
            if f.gguf_type is not None and keep(name, f)}


def set_kv_cache(model, dtype: str) -> None:
    """Make `model`'s dense caches store keys and values as `dtype` (checked)."""
    from .cache.dense import check_kv_dtype
    if dtype != "f32" and not hasattr(model, "kv_cache"):
        raise ConfigError(f"model.kv_cache = {dtype!r}: the {type(model).__module__} model "
                          f"keeps its own cache, in float32; use kv_cache = 'f32'")
    head_dim = getattr(getattr(model, "config", None), "head_dim", None)
    model.kv_cache = check_kv_dtype(dtype, head_dim)


def set_threads(n: int) -> None:
    """Threads for the native kernels (no-op when they are not built)."""
    try:
        from . import kernels
    except ImportError:
        return
    if kernels.available():
        kernels.set_threads(n)
