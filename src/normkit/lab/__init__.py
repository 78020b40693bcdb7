"""The normkit lab: experiments that test layer normalization's claims on shipped data.

``normkit lab`` (see :mod:`normkit.lab.cli`) runs them; :func:`run_lab` is the same from Python.
Each experiment is one module in :mod:`normkit.lab.experiments`, configured by a frozen
dataclass (:mod:`normkit.lab.config`); verdicts come from :mod:`normkit.lab.verdict`, reports
from :mod:`normkit.lab.report`.
"""

from normkit.lab.experiments import EXPERIMENTS
from normkit.lab.runner import run_lab

__all__ = ["EXPERIMENTS", "run_lab"]
