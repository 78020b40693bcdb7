"""Run ``python -m normkit.bench`` as ``normkit bench``."""

import sys

from normkit.bench.cli import main

sys.exit(main())
