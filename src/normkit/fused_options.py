r"""flash-attn's fused options: their checks and the plan of a call (where the normalized
dims are, the dtypes), for :func:`normkit.dispatch.fused_norm`, which runs the call in one
kernel (:mod:`normkit.contract`).

flash-attn's ``layer_norm_fn`` / ``rms_norm_fn`` (``flash_attn/ops/triton/layer_norm.py``) define
the semantics. :func:`normkit.layer_norm` and :func:`normkit.rms_norm` send a call here when it
uses ``residual_in_fp32``, ``x1``, ``weight1``/``bias1``, ``rowscale``, ``return_dropout_mask``,
``out_dtype``, ``out``/``out1``/``residual_out``, ``dim`` or (RMS norm) ``bias``:

.. math::
    s = \operatorname{drop}(\rho \odot x) + \operatorname{drop}(x_1) + r, \qquad
    y = \hat s \odot g + b, \qquad y_1 = \hat s \odot g_1 + b_1

with :math:`\hat s` the layer- or RMS-normalized :math:`s`, :math:`\rho` the per-row
``rowscale`` and independent dropout masks for :math:`x` and :math:`x_1`.

Precision follows normkit's rule (:mod:`normkit.reference`): the sum is formed in float32
(float64 when an input is float64), rounded once to the dtype it is stored in, and the norm
normalizes that stored sum, so the prenorm output is exactly the tensor that was normalized.
That dtype is the residual's (the input's without a residual), raised to at least float32 by
``residual_in_fp32``. flash-attn normalizes the unrounded float32 sum: identical when the
sum is stored in float32 (``residual_in_fp32``, a float32 residual stream), one rounding of the
sum apart when it is stored in 16 bits. ``y`` and ``y1`` are computed in float32 (float64) and
rounded once to ``out_dtype``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from normkit.errors import NormDeviceError, NormShapeError, NormTypeError
from normkit.reference import zero_centered_gain
from normkit.validation import (
    FLOAT_DTYPES,
    as_normalized_shape,
    check_bool,
    check_dropout,
    check_eps,
    check_floating_tensor,
    check_input,
    check_no_overlap,
    check_param,
    check_residual,
    check_zero_centered,
)

__all__ = ["FusedOptions", "Plan", "plan_call", "zero_centered_gains"]



@dataclass(frozen=True, eq=False)  # eq=False: never compare tensors elementwise
class FusedOptions:
    """The keyword-only options of :func:`normkit.layer_norm` / :func:`normkit.rms_norm` served
    here, by name (each default turns its option off; see those functions for the meaning)."""

    residual_in_fp32: bool = False
    x1: Optional[Tensor] = None
    weight1: Optional[Tensor] = None
    bias1: Optional[Tensor] = None
    rowscale: Optional[Tensor] = None
    return_dropout_mask: bool = False
    out_dtype: Optional[torch.dtype] = None
    out: Optional[Tensor] = None
    residual_out: Optional[Tensor] = None
    dim: Optional[int] = None
    out1: Optional[Tensor] = None  # y1's buffer (normkit's addition to flash-attn's out= / residual_out=)


def zero_centered_gains(zero_centered_weight, x: Tensor, weight, weight1):
    """``(1 + weight, 1 + weight1)`` as the kernels' gains (``weight1`` may be ``None``), after
    checking the flag: the ``zero_centered_weight=True`` path of ``layer_norm`` / ``rms_norm``."""
    check_zero_centered(zero_centered_weight, x, weight)
    weight = zero_centered_gain(weight, x.dtype)
    return weight, (None if weight1 is None else zero_centered_weight1(weight1, x))


def zero_centered_weight1(weight1: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """flash-attn's ``zero_centered_weight`` applies to the second gain too: ``1 + weight1``."""
    if weight1 is None:
        return None
    check_floating_tensor("weight1", weight1, what=" or None")
    return zero_centered_gain(weight1, x.dtype)


def _first_normalized_dim(dim, x: Tensor, shape: Tuple[int, ...]) -> int:
    """The (non-negative) first normalized dim: ``dim``, or the trailing dims when ``None``."""
    k = len(shape)
    if dim is None:
        check_input(x, shape)
        return x.dim() - k
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int or None, got {dim!r}")
    nd = x.dim()
    if not -nd <= dim < nd:
        raise NormShapeError(f"dim={dim} is out of range for an input with {nd} dims (expected {-nd} <= dim < {nd})")
    start = int(dim) % nd
    if start + k > nd or tuple(x.shape[start:start + k]) != shape:
        raise NormShapeError(
            f"Given normalized_shape={list(shape)} and dim={dim}, expected input dims "
            f"{start}..{start + k - 1} to be {list(shape)}, but got input of size {list(x.shape)}"
        )
    return start


def _check_like_input(name: str, t, x: Tensor, *, dtype: bool = True) -> None:
    """``t`` is a tensor of ``x``'s shape and device (and dtype, unless ``dtype=False``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != x.shape:
        raise NormShapeError(f"{name} must have the input's shape {list(x.shape)}, got {list(t.shape)}")
    if dtype and t.dtype != x.dtype:
        raise NormTypeError(f"{name} must have the input's dtype {x.dtype}, got {t.dtype}")
    if t.device != x.device:
        raise NormDeviceError(f"{name} is on {t.device} but input is on {x.device}")


def _check_buffer(name: str, t, shape, dtype: torch.dtype, x: Tensor) -> None:
    """An ``out=``-style buffer: a tensor of exactly the result's shape, dtype and device."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != shape:
        raise NormShapeError(f"{name} must have the result's shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise NormTypeError(f"{name} must have the result's dtype {dtype}, got {t.dtype}")
    if t.device != x.device:
        raise NormDeviceError(f"{name} is on {t.device} but input is on {x.device}")


@dataclass(frozen=True)
class Plan:
    """What a validated call computes: where the normalized dims are and the dtypes."""

    shape: Tuple[int, ...]
    start: int  # first normalized dim of the input
    eps: float
    dropout_p: float  # 0.0 when not training
    sum_dtype: torch.dtype  # the stored (prenorm) sum
    out_dtype: torch.dtype  # y and y1


def plan_call(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training, o: FusedOptions) -> Plan:
    """Check a call with fused options (every argument, once) and plan it."""
    shape = as_normalized_shape(normalized_shape)
    check_floating_tensor("input", x)
    residual_in_fp32 = check_bool("residual_in_fp32", o.residual_in_fp32)
    check_bool("return_dropout_mask", o.return_dropout_mask)
    check_bool("prenorm", prenorm)
    start = _first_normalized_dim(o.dim, x, shape)
    for name, p in (("weight", weight), ("bias", bias), ("weight1", o.weight1), ("bias1", o.bias1)):
        check_param(name, p, x, shape)
    if o.weight1 is not None and weight is None:
        raise ValueError(
            "weight1 is the second branch's gain of a parallel block (y1 = x_hat * weight1 + bias1) and needs "
            "the first branch's weight too, but got weight=None"
        )
    if o.bias1 is not None and o.weight1 is None:
        raise ValueError("bias1 is the second branch's bias and needs weight1, but got weight1=None")
    # A residual of another dtype (a float32 residual stream beside 16-bit branches) is taken only
    # with residual_in_fp32: without it a mixed pair is more often a bug, and the error stays.
    check_residual(residual, x, same_dtype=not residual_in_fp32)
    if o.x1 is not None:
        _check_like_input("x1", o.x1, x)
    lead = tuple(x.shape[:start]) + tuple(x.shape[start + len(shape):])
    if o.rowscale is not None:
        if o.x1 is not None:
            raise ValueError("rowscale cannot be combined with x1 (flash-attn refuses the pair too): scale x before the call")
        check_floating_tensor("rowscale", o.rowscale, what=" or None")
        if tuple(o.rowscale.shape) != lead:
            raise NormShapeError(
                f"rowscale must have the input's shape without the normalized dims, {list(lead)}, got {list(o.rowscale.shape)}"
            )
        if o.rowscale.device != x.device:
            raise NormDeviceError(f"rowscale is on {o.rowscale.device} but input is on {x.device}")
    if o.out_dtype is not None and o.out_dtype not in FLOAT_DTYPES:
        raise NormTypeError(f"out_dtype must be None or one of float16, bfloat16, float32, float64, got {o.out_dtype!r}")
    eps = check_eps(eps)
    p = check_dropout(dropout_p, training)

    base = x.dtype if residual is None else residual.dtype
    sum_dtype = torch.promote_types(base, torch.float32) if residual_in_fp32 else base
    out_dtype = x.dtype if o.out_dtype is None else o.out_dtype
    if o.out is not None:
        _check_buffer("out", o.out, x.shape, out_dtype, x)
    if o.out1 is not None:
        if o.weight1 is None:
            raise ValueError("out1= receives y1 = x_hat * weight1 + bias1, so it needs weight1, but got weight1=None")
        _check_buffer("out1", o.out1, x.shape, out_dtype, x)
    if o.residual_out is not None:
        if not prenorm:
            raise ValueError("residual_out= receives the prenorm sum, so it needs prenorm=True")
        _check_buffer("residual_out", o.residual_out, x.shape, sum_dtype, x)
    # a buffer that overlaps an input or the other buffer would return a result overwritten by
    # the other write (out=x with prenorm returns x itself as s; out=buf, residual_out=buf
    # returns s as y)
    reads = [("input", x), ("residual", residual), ("weight", weight), ("bias", bias), ("x1", o.x1),
             ("weight1", o.weight1), ("bias1", o.bias1), ("rowscale", o.rowscale)]
    check_no_overlap([("out", o.out), ("out1", o.out1), ("residual_out", o.residual_out)], reads)
    return Plan(shape, start, eps, p, sum_dtype, out_dtype)
