"""The core's own plugin: it registers the built-in architectures, formats, quant methods,
samplers and logits processors through the same hooks third-party plugins use.

Its hooks are `tryfirst`, so its entries come first in every registry: the built-in logits
processors (repetition penalty, temperature, top-k / top-p / min-p) run before a plugin's,
which therefore sees the tempered, truncated logits. A plugin that must run before them
marks its own hook `tryfirst` too (among tryfirst hooks the later-registered plugin goes
first, as pluggy calls them)."""

from __future__ import annotations

import importlib

from .hookspecs import hookimpl
from .models import BUILTIN_ARCHITECTURES


@hookimpl(tryfirst=True)
def register_architectures(register):
    for model_type, module in BUILTIN_ARCHITECTURES.items():
        register(model_type, importlib.import_module(module).Model)


@hookimpl(tryfirst=True)
def register_weight_formats(register):
    from .quant import ggml_formats
    from .quant.core_formats import CORE_FORMATS, LAYOUT_FORMATS, attach_native
    attach_native(CORE_FORMATS + LAYOUT_FORMATS)  # the table points at the C kernels when built
    ggml_formats.attach_native()
    for fmt in CORE_FORMATS + LAYOUT_FORMATS + ggml_formats.GGML_FORMATS:
        register(fmt)


@hookimpl(tryfirst=True)
def register_quant_methods(register):
    from .quant.methods import CORE_METHODS
    for method in CORE_METHODS:
        register(method)


@hookimpl(tryfirst=True)
def register_samplers(register):
    from .sampling import BUILTIN_SAMPLERS
    for name, factory in BUILTIN_SAMPLERS.items():
        register(name, factory)


@hookimpl(tryfirst=True)
def register_logits_processors(register):
    from .sampling import BUILTIN_PROCESSORS
    for name, factory in BUILTIN_PROCESSORS.items():
        register(name, factory)
