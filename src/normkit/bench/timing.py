"""One timer for every measurement: warm-up, then the median of repeated samples.

* CPU: :func:`time.perf_counter` around the call. A sample that would be shorter than
  ``min_sample_s`` repeats the call ``inner`` times and reports the mean, so timer resolution
  and Python overhead do not dominate tiny shapes.
* CUDA: CUDA events recorded on the current stream around one call, read after
  :func:`torch.cuda.synchronize`. Before each sample a buffer larger than the GPU's L2 cache
  is overwritten, so every sample reads its inputs from HBM (a cache-hot number would exceed
  the memory bandwidth the benchmark compares against).

Warm-up calls are never timed: they absorb ``torch.compile`` / Triton compilation,
allocator growth and first-touch page faults. The garbage collector is paused while timing.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of ``samples`` (each the mean of ``inner`` calls)."""

    median_s: float
    min_s: float
    max_s: float
    samples: int
    inner: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_s * 1e3, "min_ms": self.min_s * 1e3,
                "max_ms": self.max_s * 1e3, "samples": self.samples, "inner": self.inner}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class _L2Flusher:
    """Overwrites a buffer twice the L2 size (at least 256 MiB) on the GPU."""

    _buffers: dict = {}

    def __init__(self, device: str):
        self.buffer: Optional[torch.Tensor] = None
        if device == "cuda":
            idx = torch.cuda.current_device()
            if idx not in self._buffers:
                l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 0
                nbytes = max(2 * l2, 256 * 2**20)
                self._buffers[idx] = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda")
            self.buffer = self._buffers[idx]

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def measure(fn: Callable[[], object], device: str, *, warmup: int = 3, repeats: int = 10,
            min_sample_s: float = 1e-3) -> Timing:
    """Time ``fn()`` on ``device``; ``warmup`` untimed calls first (at least one)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        fn()
    synchronize(device)
    per_call = (time.perf_counter() - t0) / max(1, warmup)
    samples: List[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no gc.collect() here: with torch loaded it costs ~0.25 s a call
    try:
        if device == "cuda":
            inner = 1
            flush = _L2Flusher(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            for _ in range(repeats):
                flush()
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
        else:
            # per_call includes the warm-up's compilation, so it can only overestimate: inner
            # is at worst too small, never a long loop.
            inner = max(1, min(1000, math.ceil(min_sample_s / max(per_call, 1e-9))))
            if inner > 1:  # re-estimate from a post-warm-up call
                t1 = time.perf_counter()
                fn()
                inner = max(1, min(1000, math.ceil(min_sample_s / max(time.perf_counter() - t1, 1e-9))))
            for _ in range(repeats):
                t1 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t1) / inner)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), inner)
