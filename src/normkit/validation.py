"""Input checks shared by every public normkit function: done once, at the edge.

Each check raises an error naming the argument, with the expected and the actual value. The
error types are :mod:`normkit.errors`' (``ValueError``/``TypeError`` that are also
``RuntimeError`` where torch raises ``RuntimeError`` for the same mistake).
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from normkit.errors import NormDeviceError, NormOverlapError, NormShapeError, NormTypeError

__all__ = [
    "CASTING_MODES",
    "FLOAT_DTYPES",
    "as_normalized_shape",
    "check_bool",
    "check_casting_mode",
    "check_dropout",
    "check_eps",
    "check_floating_tensor",
    "check_no_overlap",
    "check_param",
    "check_residual",
    "check_zero_centered",
]

ShapeLike = Union[int, Sequence[int], torch.Size]
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_int(d) -> Optional[int]:
    """``d`` as an int if it is one: a Python/NumPy integer, a ``SymInt``, or a 0-dim integer
    tensor (what sizes are under ``torch.jit.trace``); else ``None``."""
    if isinstance(d, bool):
        return None
    if isinstance(d, (numbers.Integral, torch.SymInt)):
        return d if isinstance(d, torch.SymInt) else int(d)
    if isinstance(d, Tensor) and d.dim() == 0 and not d.is_floating_point() and not d.is_complex() and d.dtype != torch.bool:
        return int(d)
    return None


def as_normalized_shape(normalized_shape: ShapeLike) -> Tuple[int, ...]:
    """``normalized_shape`` as a tuple of non-negative ints (torch accepts a size-0 dim; the
    output is then empty)."""
    if (  # the common form, checked without ABC isinstance tests (this runs on every call)
        type(normalized_shape) in (tuple, list, torch.Size)
        and normalized_shape
        and all(type(d) is int and d >= 0 for d in normalized_shape)
    ):
        return tuple(normalized_shape)
    single = _as_int(normalized_shape)
    if single is not None:
        shape: Tuple[int, ...] = (single,)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and all(_as_int(d) is not None for d in normalized_shape):
        shape = tuple(_as_int(d) for d in normalized_shape)
    else:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}")
    if len(shape) == 0:
        raise NormShapeError("normalized_shape must name at least one dimension, got ()")
    if any(d < 0 for d in shape):
        raise NormShapeError(f"normalized_shape must have non-negative sizes, got {list(shape)}")
    return shape


def check_floating_tensor(name: str, t, *, what: str = "") -> None:
    """``t`` is a tensor of a floating dtype normkit computes in."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{what}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise NormTypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}")


def check_input(x: Tensor, shape: Tuple[int, ...]) -> None:
    """``x`` is a floating tensor whose trailing dims are ``shape``."""
    check_floating_tensor("input", x)
    if x.is_nested:
        raise NormTypeError(
            "a nested tensor input is supported by the plain calls only (layer_norm / rms_norm "
            "with weight, bias, eps over trailing regular dims), not with fused options; "
            "unbind it (nested.unbind()) and call per component"
        )
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        raise NormShapeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(x.shape)}"
        )


def check_param(name: str, p: Optional[Tensor], x: Tensor, shape: Tuple[int, ...]) -> None:
    """A gain or bias: ``None``, or a floating tensor of ``shape`` on ``x``'s device."""
    if p is None:
        return
    check_floating_tensor(name, p, what=" or None")
    if tuple(p.shape) != shape:
        raise NormShapeError(
            f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
            f"{list(p.shape)} and normalized_shape = {list(shape)}"
        )
    if p.device != x.device:
        raise NormDeviceError(f"{name} is on {p.device} but input is on {x.device}; move them to one device")


def check_residual(residual: Optional[Tensor], x: Tensor, *, same_dtype: bool = True) -> None:
    """The fused residual: ``None``, or a tensor of ``x``'s shape, dtype and device (any
    floating dtype with ``same_dtype=False``: the ``residual_in_fp32`` path)."""
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise NormShapeError(f"residual must have the input's shape {list(x.shape)}, got {list(residual.shape)}")
    if not same_dtype:
        check_floating_tensor("residual", residual, what=" or None")
    elif residual.dtype != x.dtype:
        raise NormTypeError(
            f"residual must have the input's dtype {x.dtype}, got {residual.dtype} (pass "
            "residual_in_fp32=True to add a residual of another dtype, in float32)"
        )
    if residual.device != x.device:
        raise NormDeviceError(f"residual is on {residual.device} but input is on {x.device}")


def check_eps(eps) -> float:
    """``eps`` as a float. Like torch, any real value is accepted (negative, 0, inf and NaN
    included: the result is what the formula gives), and so is a 0-dim real tensor."""
    if isinstance(eps, Tensor) and eps.dim() == 0 and eps.is_floating_point():
        return float(eps)
    if isinstance(eps, torch.SymFloat):
        return float(eps)  # specializes a symbolic eps under torch.compile(dynamic=True)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    return float(eps)


def check_bool(name: str, value) -> bool:
    """A flag: exactly ``True`` or ``False``, as torch's bool arguments (``1``, ``None``, ``0.0``
    and strings are refused: a truthy object is more often a misplaced argument)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def kernel_eps(eps: float) -> bool:
    """Whether the compiled kernels take ``eps``: finite and ``>= 0`` (NaN fails both). Other
    values are valid (the formula's result, as torch gives) and run on the reference composite."""
    return 0.0 <= eps < float("inf")


def check_dropout(dropout_p, training: bool) -> float:
    """The dropout rate actually applied: ``dropout_p`` in ``[0, 1)`` when training, else 0."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {dropout_p!r}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:  # NaN fails this too
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return p if training else 0.0


#: The ``casting_mode`` values of :func:`normkit.rms_norm`, named as Liger-Kernel names them.
CASTING_MODES = ("gemma", "llama", "none")


def check_casting_mode(casting_mode) -> str:
    """``casting_mode`` is one of :data:`CASTING_MODES`."""
    if not isinstance(casting_mode, str) or casting_mode not in CASTING_MODES:
        allowed = ", ".join(repr(m) for m in CASTING_MODES)
        raise ValueError(f"casting_mode must be one of {allowed}, got {casting_mode!r}")
    return casting_mode


def check_zero_centered(zero_centered_weight, x, weight) -> None:
    """``zero_centered_weight`` is a bool and, when true, there is a floating ``weight`` to add 1 to
    (and a floating input, whose dtype sets the gain's)."""
    if not isinstance(zero_centered_weight, bool):
        raise TypeError(f"zero_centered_weight must be a bool, got {zero_centered_weight!r}")
    if not zero_centered_weight:
        return
    if weight is None:
        raise ValueError(
            "zero_centered_weight=True scales by (1 + weight), so it needs a weight, but got weight=None "
            "(without a weight the gain is 1 already: leave zero_centered_weight=False)"
        )
    check_floating_tensor("input", x)
    check_floating_tensor("weight", weight, what=" or None")


def _byte_extent(t: Tensor) -> Optional[Tuple[int, int]]:
    """The ``[first, last + 1)`` bytes ``t``'s elements span in memory, or ``None`` when ``t``
    is empty or has no data to point at (a fake or meta tensor, under tracing)."""
    if t.is_meta or t.numel() == 0:
        return None
    try:
        base = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # FakeTensor, functional tensors
        return None
    if t.is_contiguous():  # the common case, without a walk over the dims
        return base, base + t.nbytes
    lo = hi = 0
    for n, st in zip(t.shape, t.stride()):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    size = t.element_size()
    return base + lo * size, base + (hi + 1) * size


def check_no_overlap(buffers, reads) -> None:
    """No buffer (an ``out=``-style tensor the call writes) of ``buffers`` shares memory with
    any of ``reads`` (the inputs it is computed from) or with a later buffer of ``buffers``;
    each a ``(name, tensor or None)`` pair. Tested on the byte ranges the tensors span (public
    APIs only), so two interleaved views of one storage (``t[::2]`` and ``t[1::2]``) count as
    overlapping: conservative, as ATen's ``at::assert_no_overlap`` is for views it cannot
    decide. Each tensor's extent is taken once: this runs on every call with a buffer."""
    given = [(name, b) for name, b in buffers if b is not None]
    if not given or torch.compiler.is_compiling():
        return
    spans = [(name, t, _byte_extent(t)) for name, t in given]
    spans += [(name, t, _byte_extent(t)) for name, t in reads if t is not None]
    for i, (name, buffer, span) in enumerate(spans[:len(given)]):
        if span is None:
            continue
        for other_name, t, other in spans[i + 1:]:
            if other is not None and span[0] < other[1] and other[0] < span[1] and t.device == buffer.device:
                raise NormOverlapError(
                    f"{name} shares memory with {other_name}: the call would overwrite what it reads or returns; "
                    f"pass a separate buffer (or leave {name}=None and copy the result)"
                )
