"""Skip rule shared by the structured-output tests.

They skip when xgrammar (the `grammar` extra) cannot be imported, unless the environment
sets LATTICE_REQUIRE_GRAMMAR (CI does), in which case a missing xgrammar fails them.
"""

import os

import pytest


def require_xgrammar_or_skip():
    try:
        import xgrammar  # noqa: F401
    except ImportError as exc:
        if os.environ.get("LATTICE_REQUIRE_GRAMMAR"):
            pytest.fail(f"LATTICE_REQUIRE_GRAMMAR is set but xgrammar cannot be imported "
                        f"({exc}); pip install \"lattice-engine[grammar]\"", pytrace=False)
        pytest.skip(f'xgrammar not installed ({exc}); pip install "lattice-engine[grammar]"',
                    allow_module_level=True)
