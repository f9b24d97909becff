"""What a test suite needs to check code against the engine, the core's own and a plugin's.

- `lattice_engine.testing.tolerance`: float32 error bounds derived from the computation
  (a dot product's length and magnitudes), not fitted to one machine's rounding.
- `lattice_engine.testing.pytest_plugin`: the `native` marker (skip when a compiled module
  is missing, fail instead under LATTICE_REQUIRE_NATIVE=1) and the kernel-variant list a
  test parametrizes over (every variant this CPU has; the others show as skips that say
  which CPU flag is missing). Enable it in a conftest.py:
  `pytest_plugins = ["lattice_engine.testing.pytest_plugin"]`.

Nothing here imports pytest at package import time, so the engine never depends on it.
"""
