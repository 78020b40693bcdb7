"""This machine's copy bandwidth, measured in the same run as the kernels it judges.

A norm must read its input and write its output at least once, so a plain copy of a large
buffer, ``dst.copy_(src)``, is the speed limit a memory-bound kernel can hope for. Its
bandwidth counts both directions, as the kernels' byte counts do:

.. math::
    \\text{copy GB/s} = \\frac{2 \\cdot \\text{nbytes}}{t_{\\text{median}}} \\cdot 10^{-9}

Measured in the same process and moment as the kernels, it absorbs what a quoted peak figure
cannot (other load on the machine, NUMA placement, turbo, a GPU's clocks), so "fraction of
copy bandwidth" compares like with like. The buffer is far larger than any cache: 256 MiB on
CPU, 1 GiB on GPU (``quick`` uses 64 MiB / 256 MiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from normkit.bench.timing import Timing, measure

CPU_BYTES = 256 * 2**20
CUDA_BYTES = 2**30
QUICK_CPU_BYTES = 64 * 2**20
QUICK_CUDA_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CopyBandwidth:
    nbytes: int  # size of one buffer
    timing: Timing

    @property
    def gbps(self) -> float:
        return 2 * self.nbytes / self.timing.median_s / 1e9

    def as_dict(self) -> dict:
        return {"gbps": self.gbps, "buffer_bytes": self.nbytes, **self.timing.as_dict()}


def default_nbytes(device: str, quick: bool = False) -> int:
    if device == "cuda":
        return QUICK_CUDA_BYTES if quick else CUDA_BYTES
    return QUICK_CPU_BYTES if quick else CPU_BYTES


def copy_bandwidth(device: str, nbytes: int, *, warmup: int = 3, repeats: int = 10) -> CopyBandwidth:
    """Median bandwidth of ``dst.copy_(src)`` for two ``nbytes`` float32 buffers on ``device``."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # written once here, so the timed copies hit no page faults
    timing = measure(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    del src, dst
    return CopyBandwidth(n * 4, timing)
