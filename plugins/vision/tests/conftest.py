from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def native_available() -> bool:
    try:
        from lattice_engine import kernels
        return kernels.available()
    except ImportError:
        return False


BACKENDS = ["numpy", pytest.param("native", marks=pytest.mark.skipif(
    not native_available(), reason="the native kernels are not built"))]
