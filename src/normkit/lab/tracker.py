"""Progress reporting for the lab: one bar for an experiment's runs, one for the current run's steps.

Experiments see only :class:`Tracker`; with ``console=None`` (tests) nothing is drawn.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["SilentTracker", "Tracker"]


class Tracker:
    """Wraps a :class:`rich.progress.Progress`; ``Tracker(None)`` is silent."""

    def __init__(self, console: Optional[Console]):
        self.console = console
        self._progress = (
            Progress(
                TextColumn("{task.description:<44}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            if console is not None
            else None
        )
        self._runs = None

    def __enter__(self) -> "Tracker":
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def experiment(self, name: str, total_runs: int) -> None:
        """Start the runs bar of experiment ``name`` (replacing the previous experiment's)."""
        if self._progress is None:
            return
        if self._runs is not None:
            self._progress.remove_task(self._runs)
        self._runs = self._progress.add_task(f"[bold]{name}[/] runs", total=total_runs)

    @contextlib.contextmanager
    def run(self, label: str, steps: int) -> Iterator[Callable[[int], None]]:
        """A run of ``steps`` steps; yields ``tick(n=1)`` to call as steps complete."""
        if self._progress is None:
            yield lambda n=1: None
            return
        task = self._progress.add_task(f"  {label}", total=max(steps, 1))
        try:
            yield lambda n=1: self._progress.advance(task, n)
        finally:
            self._progress.remove_task(task)
            if self._runs is not None:
                self._progress.advance(self._runs)

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)


class SilentTracker:
    """A tracker that draws nothing: for runs whose progress nobody watches (estimates, tests)."""

    def experiment(self, *a):
        pass

    def run(self, *a):
        import contextlib

        return contextlib.nullcontext(lambda n=1: None)

    def log(self, *a):
        pass
