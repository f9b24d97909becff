"""The entry point: registers the 4-bit weight formats and the q4_sym / q4_asym methods."""

from __future__ import annotations

from lattice_engine import hookimpl

from . import kernels
from .formats import Q4_FORMATS, Q4_R16_FORMATS
from .methods import Q4_METHODS


@hookimpl
def register_weight_formats(register):
    # C kernels when built (and the _r16 layout at load); the numpy reference otherwise
    kernels.attach(Q4_FORMATS, Q4_R16_FORMATS)
    for fmt in Q4_FORMATS + Q4_R16_FORMATS:
        register(fmt)


@hookimpl
def register_quant_methods(register):
    for method in Q4_METHODS:
        register(method)
