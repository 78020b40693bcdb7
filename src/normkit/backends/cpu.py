"""The ``"cpu"`` backend: normkit's compiled C++ kernels (``normkit._C``, built from
``src/normkit/csrc`` by ``make install`` / ``pip install --no-build-isolation``).

Float32, float64, bfloat16 and float16 CPU tensors without dropout (dropout runs on the
reference). The kernels (:file:`csrc/norm_cpu.cpp`, row math shared in :file:`csrc/row_math.h`)
implement :mod:`normkit.reference` exactly: float32 statistics (float64 for float64 input) by
the corrected two-pass algorithm, blocked vectorized sums, the residual sum rounded once to the
input dtype. Rows are spread over torch's intra-op threads (``torch.set_num_threads`` is the
knob) in chunks fixed by the shape, so results are bit-identical for any thread count; each hot
loop is compiled for AVX-512, AVX2 and baseline x86-64 and the loader picks what the CPU has.

Besides this backend's :meth:`CpuBackend.forward` / :meth:`CpuBackend.backward` (what the
custom op and the autograd Function call), the extension has ``norm``: the whole eager call,
autograd node included, in C++. :func:`normkit.functional.route` sends plain eager CPU calls
there (route ``"native"``), so a call costs what a native torch op costs.

Without the extension (no compiler at install time, ``NORMKIT_NO_EXTENSION=1``) this backend is
unavailable, the numba backend (:mod:`normkit.backends.numba`) is the CPU default, and normkit
says so once, on the first CPU call.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from normkit.backends.base import Backend, BackwardResult, ForwardResult

__all__ = ["CpuBackend", "BACKEND", "extension", "DTYPES"]

#: Input dtypes the compiled kernels handle.
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _load():
    if os.environ.get("NORMKIT_NO_EXTENSION") == "1":
        return None, "disabled by NORMKIT_NO_EXTENSION=1"
    try:
        from normkit import _C
    except ImportError as exc:
        return None, (
            f"normkit._C is not built ({exc}); build it with `make install` or "
            "`pip install --no-build-isolation -e .` (needs a C++ compiler)"
        )
    return _C, None


#: The compiled module ``normkit._C``, or ``None`` when it is not built.
extension, _UNAVAILABLE = _load()
_warned = False


def warn_once_if_missing() -> None:
    """One ``UserWarning`` per process when the compiled kernels are missing (asked on the
    first CPU call, not at import: GPU-only users need not hear it)."""
    global _warned
    if extension is None and not _warned:
        _warned = True
        warnings.warn(
            f"normkit: compiled CPU kernels unavailable: {_UNAVAILABLE}. Using the numba kernels "
            "(same results, slower launches).",
            RuntimeWarning,
            stacklevel=3,
        )


class CpuBackend(Backend):
    name = "cpu"
    default_for = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        return _UNAVAILABLE

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return x.device.type == "cpu" and x.dtype in DTYPES and dropout_p == 0.0

    def rnn_steps(self, x: Tensor):
        """The compiled LN-LSTM/GRU time loops (``normkit._C.lstm_forward`` ...) for float32."""
        return extension if x.device.type == "cpu" and x.dtype == torch.float32 else None

    def forward(self, x, residual, weight, bias, eps, is_rms, dropout_p, seed, store_sum) -> ForwardResult:
        if dropout_p != 0.0:
            raise ValueError(f"the cpu backend does not implement dropout (got dropout_p={dropout_p}); supports() says so")
        y, s, mean, rstd = extension.forward(x, residual, weight, bias, float(eps), bool(is_rms), bool(store_sum))
        if store_sum and residual is None:
            s = x  # no residual, no dropout: the normalized input is x itself
        return y, (s if store_sum else None), (None if is_rms else mean), rstd

    def backward(self, dy, dsum, s, weight, mean, rstd, is_rms, dropout_p, seed) -> BackwardResult:
        if dropout_p != 0.0:
            raise ValueError(f"the cpu backend does not implement dropout (got dropout_p={dropout_p})")
        if not is_rms and mean is None:
            raise ValueError("layer norm backward needs the row means saved by forward, got mean=None")
        dx, dw, db = extension.backward(dy.contiguous(), None if dsum is None else dsum.contiguous(), s.contiguous(), weight, mean, rstd, bool(is_rms))
        # Without dropout the residual's gradient is dx itself; ops.py copies it only if wanted.
        return dx, dx, dw, db

    def empty_like(self, t: Tensor) -> Tensor:
        from normkit.backends.memory import empty_like

        return empty_like(t)


BACKEND = CpuBackend()
