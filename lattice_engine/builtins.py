"""The core's own plugin: it registers the built-in architectures, formats, quant methods,
samplers and logits processors through the same hooks third-party plugins use."""

from __future__ import annotations

import importlib

from .hookspecs import hookimpl
from .models import BUILTIN_ARCHITECTURES


@hookimpl
def register_architectures(register):
    for model_type, module in BUILTIN_ARCHITECTURES.items():
        register(model_type, importlib.import_module(module).Model)


@hookimpl
def register_weight_formats(register):
    from .quant.core_formats import CORE_FORMATS, LAYOUT_FORMATS, attach_native
    attach_native(CORE_FORMATS + LAYOUT_FORMATS)  # the table points at the C kernels when built
    for fmt in CORE_FORMATS + LAYOUT_FORMATS:
        register(fmt)


@hookimpl
def register_quant_methods(register):
    from .quant.methods import CORE_METHODS
    for method in CORE_METHODS:
        register(method)


@hookimpl
def register_samplers(register):
    from .sampling import BUILTIN_SAMPLERS
    for name, factory in BUILTIN_SAMPLERS.items():
        register(name, factory)


@hookimpl
def register_logits_processors(register):
    from .sampling import BUILTIN_PROCESSORS
    for name, factory in BUILTIN_PROCESSORS.items():
        register(name, factory)
