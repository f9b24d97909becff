"""The entry point: registers the 4-bit weight formats and the q4_sym / q4_asym methods."""

from __future__ import annotations

from lattice_engine import hookimpl

from . import kernels
from .formats import Q4_FORMATS
from .methods import Q4_METHODS


@hookimpl
def register_weight_formats(register):
    kernels.attach(Q4_FORMATS)  # C kernels when built; the numpy reference otherwise
    for fmt in Q4_FORMATS:
        register(fmt)


@hookimpl
def register_quant_methods(register):
    for method in Q4_METHODS:
        register(method)
