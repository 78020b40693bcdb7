"""The normkit lab: experiments that test layer normalization's claims on shipped data.

``normkit lab`` (see :mod:`normkit.lab.cli`) runs them; :func:`run_lab` is the same from Python.
Each experiment is one module in :mod:`normkit.lab.experiments`, configured by a frozen
dataclass (:mod:`normkit.lab.config`); every verdict is a test from :mod:`normkit.lab.stats`
(worded by :mod:`normkit.lab.verdict`); reports come from :mod:`normkit.lab.report`, the README's
table from :mod:`normkit.lab.table`, time estimates of a preset from :mod:`normkit.lab.estimate`.
"""

from normkit.lab.experiments import EXPERIMENTS
from normkit.lab.runner import run_lab

__all__ = ["EXPERIMENTS", "run_lab"]
