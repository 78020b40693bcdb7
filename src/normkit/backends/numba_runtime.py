"""The numba backend's runtime: how its kernels get threads (the kernels themselves are in
:mod:`normkit.backends.numba_kernels`, the launchers in :mod:`normkit.backends.numba`; output
buffers come from :mod:`normkit.backends.memory`)."""

from __future__ import annotations

import os
from typing import Optional

import numba
import torch

__all__ = ["Threads", "idle_numba_workers", "thread_budget"]


def thread_budget() -> int:
    """Threads a parallel kernel may use: torch's intra-op count, capped by numba's pool. With
    a budget of one the kernels run in the calling thread: a one-thread launch of numba's
    OpenMP pool leaves its other worker spinning, which doubled the process's CPU time for
    the same wall time (measured with ``torch.set_num_threads(1)``)."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


class Threads:
    """Run numba's pool with at most torch's thread count, handing out row chunks dynamically
    (one at a time: a core busy with another process then delays one chunk, not half the rows);
    the caller's numba settings are restored on exit. numba's settings are per calling thread,
    so each ``with`` gets its own instance (a shared one would let two Python threads restore
    each other's settings)."""

    __slots__ = ("numba", "saved", "saved_chunk")

    def __init__(self, numba_module):
        self.numba = numba_module
        self.saved = 0
        self.saved_chunk = 0

    def __enter__(self):
        want = thread_budget()
        self.saved = self.numba.get_num_threads()
        if want != self.saved:
            self.numba.set_num_threads(want)
        self.saved_chunk = self.numba.set_parallel_chunksize(1)
        return self

    def __exit__(self, *exc):
        self.numba.set_parallel_chunksize(self.saved_chunk)
        if self.numba.get_num_threads() != self.saved:
            self.numba.set_num_threads(self.saved)
        return False


def idle_numba_workers() -> Optional[str]:
    """Ask numba for its ``workqueue`` threading layer when the process has not launched a
    numba thread pool yet and the user did not choose one (``NUMBA_THREADING_LAYER``).

    Why: numba's default OpenMP pool keeps its workers spin-waiting after every parallel
    kernel, so after the first large normalization the process burns a second core for the rest
    of the run (measured: CPU time per training step doubled, wall time unchanged on an idle
    machine, worse on a shared one). ``workqueue`` workers sleep. Results do not change: the
    CPU backend's work split depends on the shape only. Returns the layer chosen, or ``None``.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return None
    try:
        from numba.np.ufunc import parallel
    except Exception:  # numba missing or broken: the CPU backend falls back anyway
        return None
    if getattr(parallel, "_is_initialized", True):
        return None
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"
