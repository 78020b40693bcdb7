"""Output buffers for the CPU backends: ``torch.empty_like``, with large buffers advised to use
transparent huge pages (the C++ kernels do the same for their own outputs, in csrc/norm_cpu.cpp)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["empty_like"]


# Large outputs: ask for transparent huge pages before the kernel first touches them. A fresh
# 64 MiB tensor otherwise takes 16k page faults on first write, which on the project's VM cost
# ~5x the kernel itself (4096x4096 float32 layer norm: ~45 ms of faults vs ~8 ms of work).
# NumPy does the same for its own allocations >= 4 MiB.
_HUGE_MIN_BYTES = 4 << 20
_HUGE = 1 << 21  # the 2 MiB huge page of x86-64 and arm64
_MADV_HUGEPAGE = 14  # from <sys/mman.h>
_madvise = None


def _init_madvise():
    global _madvise
    _madvise = False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        fn.restype = ctypes.c_int
        _madvise = fn
    except (OSError, AttributeError):  # not Linux, or no THP: plain pages
        pass


def empty_like(t: Tensor) -> Tensor:
    """``torch.empty_like``, with large buffers advised to use transparent huge pages."""
    out = torch.empty_like(t)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_MIN_BYTES:
        if _madvise is None:
            _init_madvise()
        if _madvise:
            ptr = out.data_ptr()
            lo, hi = (ptr + _HUGE - 1) & ~(_HUGE - 1), (ptr + nbytes) & ~(_HUGE - 1)
            if hi > lo:
                _madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice only: failure leaves plain pages
    return out


