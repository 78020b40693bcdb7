"""``python -m normkit``: the ``normkit`` command (:func:`normkit.cli.main`), for environments
where the console script is not on ``PATH``."""

import sys

from normkit.cli import main

sys.exit(main())
