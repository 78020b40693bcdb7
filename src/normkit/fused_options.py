r"""flash-attn's fused options, composed above the kernel contract so that every backend runs them.

flash-attn's ``layer_norm_fn`` / ``rms_norm_fn`` (``flash_attn/ops/triton/layer_norm.py``) define
the semantics. :func:`normkit.layer_norm` and :func:`normkit.rms_norm` send a call here when it
uses ``residual_in_fp32``, ``x1``, ``weight1``/``bias1``, ``rowscale``, ``return_dropout_mask``,
``out_dtype``, ``out``/``residual_out``, ``dim`` or (RMS norm) ``bias``:

.. math::
    s = \operatorname{drop}(\rho \odot x) + \operatorname{drop}(x_1) + r, \qquad
    y = \hat s \odot g + b, \qquad y_1 = \hat s \odot g_1 + b_1

with :math:`\hat s` the layer- or RMS-normalized :math:`s`, :math:`\rho` the per-row
``rowscale`` and independent dropout masks for :math:`x` and :math:`x_1`.

The design trade-off: nothing here is a new kernel. Each option is torch ops around one call of
the ordinary norm (two for ``weight1``: both normalize the same stored ``s``), so the options run
on the reference, ``cpu`` and Triton backends alike and autograd differentiates the
composition, but the extra terms of the sum, the second gain and the casts are separate passes
over memory where flash-attn makes one. When a call needs none of them (say ``weight1`` or
``out=`` with a plain residual) the residual add and dropout stay fused in the kernel.

Precision follows normkit's rule (:mod:`normkit.reference`): the sum is formed in float32
(float64 when an input is float64), rounded once to the dtype it is stored in, and the norm
normalizes that stored sum, so the prenorm output is exactly the tensor that was normalized.
That dtype is the residual's (the input's without a residual), raised to at least float32 by
``residual_in_fp32``. flash-attn normalizes the unrounded float32 sum: identical when the
sum is stored in float32 (``residual_in_fp32``, a float32 residual stream), one rounding of the
sum apart when it is stored in 16 bits.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from normkit.errors import NormDeviceError, NormShapeError, NormTypeError
from normkit.reference import compute_dtype
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
)

__all__ = ["FusedOptions", "fused_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


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


def zero_centered_gains(zero_centered_weight, x: Tensor, weight, weight1):
    """``(1 + weight, 1 + weight1)`` as the kernels' gains (``weight1`` may be ``None``), after
    checking the flag: the ``zero_centered_weight=True`` path of ``layer_norm`` / ``rms_norm``."""
    from normkit.reference import zero_centered_gain
    from normkit.validation import check_zero_centered

    check_zero_centered(zero_centered_weight, x, weight)
    weight = zero_centered_gain(weight, x.dtype)
    return weight, (None if weight1 is None else zero_centered_weight1(weight1, x))


def zero_centered_weight1(weight1: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """flash-attn's ``zero_centered_weight`` applies to the second gain too: ``1 + weight1``."""
    if weight1 is None:
        return None
    from normkit.reference import zero_centered_gain

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
class _Plan:
    """What a validated call computes: where dims move, the dtypes, which passes run here."""

    shape: Tuple[int, ...]
    start: int  # first normalized dim of the input
    eps: float
    dropout_p: float  # 0.0 when not training
    sum_dtype: torch.dtype  # the stored (prenorm) sum
    acc_dtype: torch.dtype  # the sum is formed in this dtype
    out_dtype: torch.dtype  # y and y1
    sum_here: bool  # form the sum (and dropout) with torch ops, not in the kernel
    wide: bool  # normalize the sum in float32 (float64), round once to out_dtype


def _validate(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training, o: FusedOptions) -> _Plan:
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
    acc_dtype = compute_dtype(torch.promote_types(x.dtype, base))
    out_dtype = x.dtype if o.out_dtype is None else o.out_dtype
    if o.out is not None:
        _check_buffer("out", o.out, x.shape, out_dtype, x)
    if o.residual_out is not None:
        if not prenorm:
            raise ValueError("residual_out= receives the prenorm sum, so it needs prenorm=True")
        _check_buffer("residual_out", o.residual_out, x.shape, sum_dtype, x)
    # y and s are computed first and then copied into the buffers, so a buffer that overlaps an
    # input or the other buffer would return a result overwritten by the other copy (out=x with
    # prenorm returns x itself as s; out=buf, residual_out=buf returns s as y)
    reads = [("input", x), ("residual", residual), ("weight", weight), ("bias", bias), ("x1", o.x1),
             ("weight1", o.weight1), ("bias1", o.bias1), ("rowscale", o.rowscale)]
    check_no_overlap("out", o.out, reads + [("residual_out", o.residual_out)])
    check_no_overlap("residual_out", o.residual_out, reads)
    wide = out_dtype != sum_dtype or (is_rms and bias is not None and sum_dtype in _LOW_PRECISION)
    sum_here = (
        (wide and sum_dtype != acc_dtype)  # a 16-bit sum to widen: formed here, then copied
        or o.x1 is not None
        or o.rowscale is not None
        or o.return_dropout_mask
        or sum_dtype != x.dtype
        or base != x.dtype
    )
    return _Plan(shape, start, eps, p, sum_dtype, acc_dtype, out_dtype, sum_here, wide)


def _keep_mask(x: Tensor, p: float) -> Tensor:
    """A fresh dropout keep mask (``True`` with probability ``1 - p``) from torch's default
    generator of ``x``'s device, so ``torch.manual_seed`` reproduces it."""
    return torch.rand(x.shape, device=x.device) >= p


def _sum(x: Tensor, x1: Optional[Tensor], residual: Optional[Tensor], rowscale: Optional[Tensor], plan: _Plan):
    """``(s, mask, mask1)``: the sum in ``plan.acc_dtype``, rounded once to ``plan.sum_dtype``;
    rowscale before dropout, as flash-attn's kernel orders them."""
    p = plan.dropout_p
    if x1 is None and residual is None and rowscale is None and p == 0.0:
        return x.to(plan.sum_dtype), None, None
    acc = plan.acc_dtype
    t = x.to(acc)
    if rowscale is not None:
        t = t * rowscale.to(acc).reshape(rowscale.shape + (1,) * len(plan.shape))
    mask = mask1 = None
    if p > 0.0:
        mask = _keep_mask(x, p)
        t = t * mask.to(acc) * (1.0 / (1.0 - p))
    if x1 is not None:
        t1 = x1.to(acc)
        if p > 0.0:
            mask1 = _keep_mask(x1, p)
            t1 = t1 * mask1.to(acc) * (1.0 / (1.0 - p))
        t = t + t1
    if residual is not None:
        t = t + residual.to(acc)
    return t.to(plan.sum_dtype), mask, mask1


def _normalized(src, w, b, is_rms, plan: _Plan, input_dtype, llama, residual=None, want_sum=False, dropout_p=0.0):
    """``(y, s)``: one normkit norm of ``src`` (+ ``residual``, with dropout in the kernel) with
    gain ``w`` and shift ``b``, ``y`` rounded once to ``plan.out_dtype``. The kernel contract has
    no RMS bias: it is added to the kernel's float32 (float64) output here; ``"llama"`` rounds
    ``x_hat`` to the input dtype before the gain, as :func:`normkit.rms_norm` documents."""
    from normkit.functional import _norm

    kernel_w = None if llama else w
    kernel_b = None if is_rms or llama else b
    out = _norm(src, plan.shape, kernel_w, kernel_b, plan.eps, is_rms, residual, want_sum, dropout_p, True)
    y, s = out if want_sum else (out, None)
    if llama:
        y = y.to(input_dtype)
        if w is not None:
            y = w * y
        if b is not None:
            y = y + b
        y = y.to(input_dtype)
    elif is_rms and b is not None:
        y = y + b.to(y.dtype)
    return y.to(plan.out_dtype), s


def _only_dim(o: FusedOptions, residual, prenorm: bool, plan: _Plan, llama: bool) -> bool:
    """Whether ``dim=`` (and ``out=``) is all a call asks beyond a plain norm."""
    return (
        residual is None
        and not prenorm
        and plan.dropout_p == 0.0
        and not llama
        and o.x1 is None
        and o.weight1 is None
        and o.rowscale is None
        and not o.return_dropout_mask
        and o.out_dtype is None
        and not o.residual_in_fp32
    )


def _kernel_writes_out(x, residual, weight, bias, is_rms, prenorm, plan: _Plan, llama: bool, o: FusedOptions) -> bool:
    """``out=`` (with or without a residual) on the native route without gradients: the C++
    kernel writes ``y`` straight into ``out`` (``normkit._C.forward(..., out)``), one pass over
    memory like the allocating call, instead of computing ``y`` and copying it. Returns whether
    it ran; any other call composes as below."""
    from normkit import functional

    if not (
        not prenorm
        and plan.dropout_p == 0.0
        and not llama
        and not (is_rms and bias is not None)
        and o.x1 is None
        and o.weight1 is None
        and o.rowscale is None
        and not o.return_dropout_mask
        and (o.out_dtype is None or o.out_dtype == x.dtype)
        and not o.residual_in_fp32
        and o.out.is_contiguous()
        and type(o.out) is Tensor
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, residual, weight, bias, o.out)))
        and functional.native_call(x, plan.shape, weight, bias, plan.eps, residual, 0.0, False)
    ):
        return False
    n = math.prod(plan.shape)  # native_call accepted: x is contiguous and not empty
    rows = x.numel() // n
    flat = lambda t: None if t is None else t.reshape(n)  # noqa: E731
    functional._cpu.extension.forward(
        x.view(rows, n), None if residual is None else residual.view(rows, n), flat(weight), flat(bias), plan.eps,
        is_rms, False, o.out.view(rows, n),
    )
    return True


def fused_norm(
    x: Tensor,
    normalized_shape,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    residual: Optional[Tensor],
    prenorm: bool,
    dropout_p: float,
    training: bool,
    options: FusedOptions,
    casting_mode: str = "gemma",
):
    """:func:`normkit.layer_norm` / :func:`normkit.rms_norm` with :class:`FusedOptions`: validate,
    move the normalized dims last (``dim=``), form the sum, normalize (twice for ``weight1``),
    move back, fill ``out=`` buffers. Returns flash-attn's tuple: ``y``, then ``y1`` (with
    ``weight1``), ``s`` (with ``prenorm``), ``mask, mask1`` (with ``return_dropout_mask``)."""
    o = options
    plan = _validate(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training, o)
    llama = is_rms and casting_mode == "llama"
    k, nd = len(plan.shape), x.dim()
    moved = plan.start != nd - k
    src_dims, dst_dims = tuple(range(plan.start, plan.start + k)), tuple(range(nd - k, nd))

    def to_last(t):
        return t if t is None or not moved else t.movedim(src_dims, dst_dims)

    def back(t):
        return t if t is None or not moved else t.movedim(dst_dims, src_dims)

    if o.out is not None and not moved and _kernel_writes_out(x, residual, weight, bias, is_rms, prenorm, plan, llama, o):
        return o.out
    if moved and _only_dim(o, residual, prenorm, plan, llama):
        from normkit.functional import native_norm_dim

        y = native_norm_dim(x, plan.start, k, weight, bias, plan.eps, is_rms)  # no permute, no copy
        if y is not None:
            return o.out.copy_(y) if o.out is not None else y
    xm, rm = to_last(x), to_last(residual)
    mask = mask1 = None
    y1 = None
    if plan.sum_here:
        s, mask, mask1 = _sum(xm, to_last(o.x1), rm, o.rowscale, plan)
        src = s.to(plan.acc_dtype) if plan.wide else s
        y, _ = _normalized(src, weight, bias, is_rms, plan, x.dtype, llama)
        if o.weight1 is not None:
            y1, _ = _normalized(src, o.weight1, o.bias1, is_rms, plan, x.dtype, llama)
    else:  # the residual add and dropout stay fused in the kernel
        want_sum = prenorm or o.weight1 is not None
        y, s = _normalized(xm, weight, bias, is_rms, plan, x.dtype, llama, rm, want_sum, plan.dropout_p)
        if o.weight1 is not None:  # normalizes the stored sum: the same x_hat, the same mask
            y1, _ = _normalized(s, o.weight1, o.bias1, is_rms, plan, x.dtype, llama)

    y, y1 = back(y), back(y1)
    if o.out is not None:
        y = o.out.copy_(y)
    results: List[Optional[Tensor]] = [y]
    if o.weight1 is not None:
        results.append(y1)
    if prenorm:
        s = back(s)
        if o.residual_out is not None:
            s = o.residual_out.copy_(s)
        results.append(s)
    if o.return_dropout_mask:
        results += [back(mask), back(mask1)]
    return results[0] if len(results) == 1 else tuple(results)
