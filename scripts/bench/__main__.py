"""Run the benchmark suite from a checkout: ``sudo .venv/bin/python scripts/bench [--quick]``.

The bench is not part of the installed package.  Run as a directory, this
file puts ``scripts/`` (so ``bench`` imports as a package) and the
repository root (so ``vmafs`` is this checkout's, not an installed copy)
first on ``sys.path``, then hands over to :func:`bench.cli.main`.
"""

import os
import sys

_SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0:1] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]

from bench.cli import main  # noqa: E402 - needs the path set above

sys.exit(main())
