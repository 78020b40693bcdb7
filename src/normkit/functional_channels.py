r"""Channels-first normalization for image tensors: :func:`layer_norm_2d` and :func:`layer_norm_chw`.

Two layer norms for ``(N, C, H, W)`` tensors, neither of which copies the input into another
layout:

* :func:`layer_norm_2d` normalizes each pixel's channel vector (statistics over ``C`` only, one
  mean/std per ``(n, h, w)``), as ConvNeXt's ``LayerNorm2d`` does::

      y[n, :, h, w] = (x[n, :, h, w] - mean) / sqrt(var + eps) * g + b

  It is the same as ``x.permute(0, 2, 3, 1) -> F.layer_norm(.., (C,)) -> permute back``, but
  the usual implementation of that pays two full-tensor copies (``permute(..).contiguous()``).
  Here a contiguous NCHW tensor is reduced over dim 1 directly (strided reductions, statistics
  in float32), and a ``channels_last`` tensor, whose ``permute(0, 2, 3, 1)`` view *is*
  contiguous, goes through :func:`normkit.layer_norm`'s kernels with no copy at all.

* :func:`layer_norm_chw` normalizes each sample over all of ``(C, H, W)`` with a per-channel
  gain and bias, i.e. ``torch.nn.GroupNorm(1, C)``::

      y[n] = (x[n] - mean(x[n])) / sqrt(var(x[n]) + eps) * g[:, None, None] + b[:, None, None]

  It runs as one :func:`normkit.layer_norm` call over the trailing dims, with the
  per-channel affine broadcast to the normalized shape (one sample's worth of memory, not a
  second pass over the batch); the gradient of the broadcast gain sums back to ``(C,)``.

The reference semantics of both are the composite in :func:`_layer_norm_dim1` /
``F.group_norm``; tests compare against ``permute -> F.layer_norm -> permute`` and
``torch.nn.GroupNorm(1, C)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normkit.dispatch import native_dim_call, native_norm_dim
from normkit.functional import layer_norm
from normkit.reference import compute_dtype, normalize
from normkit.validation import check_eps, check_floating_tensor

__all__ = ["layer_norm_2d", "layer_norm_chw"]


def _check_input(input: Tensor, min_dim: int, exact: bool, what: str) -> None:
    check_floating_tensor("input", input)
    if (input.dim() != min_dim) if exact else (input.dim() < min_dim):
        raise ValueError(f"{what}, got input of size {list(input.shape)} ({input.dim()}-D)")


def _check_param(name: str, p: Optional[Tensor], input: Tensor) -> None:
    if p is None:
        return
    check_floating_tensor(name, p, what=" or None")
    channels = input.shape[1]
    if tuple(p.shape) != (channels,):
        raise ValueError(
            f"Expected {name} of shape [C] = [{channels}] (the input's channel dim 1), but got {name} "
            f"of shape {list(p.shape)} for input of size {list(input.shape)}"
        )
    if p.device != input.device:
        raise ValueError(f"{name} is on {p.device} but input is on {input.device}; move them to one device")


def _sizes(shape) -> tuple:
    # plain ints: under the TorchScript tracer (ONNX export) sizes come back as tensors
    return tuple(int(d) for d in shape)


def _is_nhwc(x: Tensor) -> bool:
    """True when ``x`` (4-D) is laid out channels-last, so ``x.permute(0, 2, 3, 1)`` is contiguous."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _per_channel(p: Optional[Tensor]) -> Optional[Tensor]:
    """A ``(C,)`` gain or bias shaped to broadcast over ``(N, C, H, W)``."""
    return None if p is None else p[:, None, None]


def _layer_norm_dim1(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """Layer norm over dim 1 of an NCHW tensor by reductions over that dim (no layout change).

    Two-pass variance in the compute dtype (float32, float64 for float64 input), as
    :mod:`normkit.reference` does; differentiable by autograd.
    """
    y, _, _ = normalize(x.to(compute_dtype(x.dtype)), (1,), _per_channel(weight), _per_channel(bias), eps, False)
    return y.to(x.dtype)


def layer_norm_2d(
    input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-6
) -> Tensor:
    r"""Channels-first layer norm: normalize each pixel of an NCHW tensor over its ``C`` channels.

    .. math::
        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mu_{n,h,w}}{\sqrt{\sigma^2_{n,h,w} + \epsilon}}\, g + b,
        \qquad \mu_{n,h,w} = \tfrac1C \textstyle\sum_c x_{n,c,h,w}

    with the biased variance, statistics in float32 (float64 for float64 input).

    Args:
        input: ``(N, C, H, W)`` tensor, contiguous or ``channels_last`` (the output keeps the
            input's memory format and dtype).
        weight, bias: gain ``g`` and bias ``b`` of shape ``(C,)``, or ``None``.
        eps: added to the variance, ``>= 0`` (default ``1e-6``, as ConvNeXt).
    """
    _check_input(input, 4, True, "layer_norm_2d expects a 4-D (N, C, H, W) input")
    _check_param("weight", weight, input)
    _check_param("bias", bias, input)
    eps = check_eps(eps)
    if _is_nhwc(input):
        # The NHWC view is contiguous: rows of C channels, exactly what the kernels normalize.
        y = layer_norm(input.permute(0, 2, 3, 1), (int(input.shape[1]),), weight, bias, eps)
        return y.permute(0, 3, 1, 2)
    if native_dim_call(input, weight, bias, eps):  # the compiled strided kernel (CPU)
        return native_norm_dim(input, 1, 1, weight, bias, eps, False)
    return _layer_norm_dim1(input, weight, bias, eps)


def layer_norm_chw(
    input: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5
) -> Tensor:
    r"""Layer norm of each sample over ``(C, *)`` with a per-channel affine: ``GroupNorm(1, C)``.

    .. math::
        y_n = \frac{x_n - \mu_n}{\sqrt{\sigma^2_n + \epsilon}} \odot g_{[:, \text{None}, \dots]}
            + b_{[:, \text{None}, \dots]}, \qquad \mu_n = \operatorname{mean}_{c,h,w}(x_{n,c,h,w})

    Args:
        input: ``(N, C, *)`` tensor (``(N, C, H, W)`` typically; ``channels_last`` is read in
            place).
        weight, bias: per-channel gain and bias of shape ``(C,)``, or ``None``.
        eps: added to the variance, ``>= 0`` (default ``1e-5``, as :class:`torch.nn.GroupNorm`).
    """
    _check_input(input, 2, False, "layer_norm_chw expects an (N, C, *) input with at least 2 dims")
    _check_param("weight", weight, input)
    _check_param("bias", bias, input)
    eps = check_eps(eps)
    if _is_nhwc(input):
        # Same set of elements per sample in (H, W, C) order: normalize the contiguous NHWC view,
        # with the per-channel affine broadcast along the last dim.
        x = input.permute(0, 2, 3, 1)
        shape = _sizes(x.shape[1:])
        w = None if weight is None else weight.expand(shape)
        b = None if bias is None else bias.expand(shape)
        return layer_norm(x, shape, w, b, eps).permute(0, 3, 1, 2)
    shape = _sizes(input.shape[1:])
    per_channel = (shape[0],) + (1,) * (input.dim() - 2)
    w = None if weight is None else weight.reshape(per_channel).expand(shape)
    b = None if bias is None else bias.reshape(per_channel).expand(shape)
    return layer_norm(input, shape, w, b, eps)
