"""`python -m lattice_engine.cli`: the same as the `lattice` command."""

import sys

from . import main

sys.exit(main())
