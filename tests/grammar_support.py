"""Skip rule shared by the structured-output tests.

They skip when xgrammar (the `grammar` extra) is not installed, unless the environment sets
LATTICE_REQUIRE_GRAMMAR (CI does), in which case a missing xgrammar fails them.
"""

import importlib.util
import os

import pytest


def require_xgrammar_or_skip():
    if importlib.util.find_spec("xgrammar") is not None:
        return
    if os.environ.get("LATTICE_REQUIRE_GRAMMAR"):
        pytest.fail('LATTICE_REQUIRE_GRAMMAR is set but xgrammar is not installed; '
                    'pip install "lattice-engine[grammar]"', pytrace=False)
    pytest.skip('xgrammar not installed (pip install "lattice-engine[grammar]")',
                allow_module_level=True)
