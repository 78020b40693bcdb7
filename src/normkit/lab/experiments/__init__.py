"""The lab's experiments, one module each, all with the same interface:

- ``NAME``, ``TITLE``, ``CLAIM`` (the paper's claim it tests);
- ``run(cfg, seeds, tracker) -> dict``: train every arm for every seed, return JSON-able results;
- ``findings(result) -> list[Finding]``: the verdicts, computed from the numbers;
- ``table(result) -> (header, rows)``: the report's table;
- ``plots(result, out_dir) -> list[Path]``: PNG figures.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "load"]

EXPERIMENTS = ("mlp", "lstm", "sequential", "transformer", "online", "cost", "sensitivity", "convnet", "invariance")


def load(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    return importlib.import_module(f"normkit.lab.experiments.{name}")
