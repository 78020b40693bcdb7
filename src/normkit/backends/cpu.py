"""The ``"cpu"`` backend: normkit's compiled C++ kernels (``normkit._C``, built from
``src/normkit/csrc`` by ``make install`` / ``pip install --no-build-isolation``).

Float32, float64, bfloat16 and float16 CPU tensors. The old contract (:meth:`CpuBackend.forward` /
:meth:`CpuBackend.backward`) is served without dropout (dropout runs on the reference); the fused
contract (:mod:`normkit.contract`, :meth:`CpuBackend.fused_forward` /
:meth:`CpuBackend.fused_backward`, :file:`csrc/fused_cpu.cpp`) takes every option, dropout and its
masks included. The kernels (:file:`csrc/norm_cpu.cpp`, row math shared in :file:`csrc/row_math.h`)
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
unavailable: CPU calls run the reference composite (torch's own ops, :mod:`normkit.reference`),
and normkit says so once, on the first CPU call. A build made for another torch is not loaded (:func:`build_mismatch`).
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from normkit.backends.base import Backend
from normkit.contract import ForwardOut, GradNeeds, GradsOut, KernelSpec

__all__ = ["CpuBackend", "BACKEND", "extension", "DTYPES", "build_mismatch", "unavailable_reason"]

#: Input dtypes the compiled kernels handle.
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


REBUILD = (
    "rebuild it for this torch: `pip install --force-reinstall --no-deps --no-cache-dir normkit` "
    "(from a checkout: `make install`, or `pip install --no-build-isolation -e .`)"
)


def build_mismatch(built_version: Optional[str], built_abi: Optional[int], torch_version: str, abi: int) -> Optional[str]:
    """Why an extension built against torch ``built_version`` (C++11 ABI flag ``built_abi``)
    must not load into torch ``torch_version`` (``abi``), or ``None`` when it may. A C++
    extension is tied to the exact torch it was compiled against: another release may change
    the C++ API without an ``ImportError`` (a crash or wrong results instead)."""
    if built_version is None:
        return "normkit._C has no record of the torch it was built against"
    if built_version != torch_version:
        return f"normkit._C was built against torch {built_version}, but torch {torch_version} is running"
    if built_abi != abi:
        return f"normkit._C was built with _GLIBCXX_USE_CXX11_ABI={built_abi}, but torch uses {abi}"
    return None


def _load():
    """``(normkit._C or None, why not)``. The build record beside the extension is read before
    ``_C`` is imported, so a mismatched build is never loaded; ``_C``'s own compiled-in record is
    checked again after."""
    if os.environ.get("NORMKIT_NO_EXTENSION") == "1":
        return None, "disabled by NORMKIT_NO_EXTENSION=1"
    import importlib.util

    if importlib.util.find_spec("normkit._C") is None:
        return None, (
            "normkit._C is not built (no C++ compiler at install time, or an install that skipped it); "
            "build it with `make install` or `pip install --no-build-isolation -e .`"
        )
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    try:
        from normkit import _C_build_info as info
    except ImportError:
        reason = build_mismatch(None, None, torch.__version__, abi)
    else:
        reason = build_mismatch(info.TORCH_VERSION, info.CXX11_ABI, torch.__version__, abi)
    if reason is None:
        try:
            from normkit import _C
        except ImportError as exc:
            return None, f"normkit._C does not load ({exc}); {REBUILD}"
        reason = build_mismatch(getattr(_C, "BUILT_TORCH", None), getattr(_C, "BUILT_CXX11_ABI", None), torch.__version__, abi)
        if reason is None:
            return _C, None
    return None, f"{reason}; {REBUILD}"


#: The compiled module ``normkit._C``, or ``None`` when it is not built.
extension, _UNAVAILABLE = _load()
_warned = False


def unavailable_reason() -> Optional[str]:
    """Why the compiled kernels are not loaded, or ``None`` when they are."""
    return _UNAVAILABLE


def warn_once_if_missing() -> None:
    """One ``UserWarning`` per process when the compiled kernels are missing (asked on the
    first CPU call, not at import: GPU-only users need not hear it)."""
    global _warned
    if extension is None and not _warned:
        _warned = True
        warnings.warn(
            f"normkit: compiled CPU kernels unavailable: {_UNAVAILABLE}. Using torch's own ops "
            "(the reference composite; same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


class CpuBackend(Backend):
    name = "cpu"
    default_for = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        return _UNAVAILABLE

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return x.device.type == "cpu" and x.dtype in DTYPES

    def fused_supports(self, x: Tensor, spec: KernelSpec) -> bool:
        """The fused kernels (``normkit._C.fused_forward`` / ``fused_backward``,
        :file:`csrc/fused_cpu.cpp`) take every option of the contract, dropout included (their
        own hash stream), for CPU tensors of the four kernel dtypes."""
        return (
            extension is not None
            and x.device.type == "cpu"
            and x.dtype in DTYPES
            and spec.sum_dtype in DTYPES
            and spec.out_dtype in DTYPES
        )

    def fused_forward(self, x, residual, x1, rowscale, weight, bias, weight1, bias1, spec: KernelSpec, seed: int,
                      out=None, out1=None, residual_out=None) -> ForwardOut:
        y, y1, s, mean, rstd, mask, mask1 = extension.fused_forward(
            x, residual, x1, rowscale, weight, bias, weight1, bias1, float(spec.eps), bool(spec.is_rms),
            float(spec.dropout_p), int(seed), spec.sum_dtype, spec.out_dtype, bool(spec.store_sum),
            bool(spec.store_mask), out, out1, residual_out,
        )
        return ForwardOut(y, y1, s, mean, rstd, mask, mask1)

    def fused_backward(self, dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, spec: KernelSpec, seed: int,
                       needs: GradNeeds, x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype]) -> GradsOut:
        flags = (needs.x, needs.x1, needs.residual, needs.weight, needs.bias, needs.weight1, needs.bias1)
        grads = extension.fused_backward(
            dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, float(spec.eps), bool(spec.is_rms),
            float(spec.dropout_p), int(seed), tuple(bool(f) for f in flags), x_dtype,
            residual_dtype if needs.residual else None,
        )
        return GradsOut(*grads)

    def rnn_steps(self, x: Tensor):
        """The compiled LN-LSTM/GRU time loops (``normkit._C.lstm_forward`` ...) for float32."""
        return extension if x.device.type == "cpu" and x.dtype == torch.float32 else None


BACKEND = CpuBackend()
