"""``normkit demo``: exactly what ``make demo`` runs, the lab's quick preset (``normkit lab --quick``):
every experiment testing the layer-norm paper's claims on shipped data, with verdicts and a
report in ``lab-report/``. Options are the lab's (``normkit demo --help``)."""

from normkit.lab.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
