"""lattice-quant-q4: 4-bit block quantization (q4_sym, q4_asym) for lattice-engine.

Installed next to the core (`pip install ./plugins/quant_q4`), it registers its weight
formats and quant methods through the entry-point group "lattice_engine" (see `plugin`).
"""

__version__ = "0.1.0"
