r"""Channels-first normalization modules for image tensors: ``LayerNorm2d`` and ``LayerNormCHW``.

=================  ==================================================  =========================
module             statistics of an ``(N, C, H, W)`` input             affine
=================  ==================================================  =========================
``LayerNorm2d``    per pixel, over ``C`` (ConvNeXt)                    per channel ``(C,)``
``LayerNormCHW``   per sample, over ``(C, H, W)`` (``GroupNorm(1, C)``)  per channel ``(C,)``
=================  ==================================================  =========================

Neither copies the input into another layout; see :mod:`normkit.functional_channels`.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from normkit.functional import layer_norm
from normkit.functional_channels import layer_norm_2d, layer_norm_chw

__all__ = ["ChannelLayerNorm", "LayerNorm2d", "LayerNormCHW"]


class LayerNorm2d(torch.nn.Module):
    r"""Layer norm over the channels of each pixel of an NCHW tensor (ConvNeXt's ``LayerNorm2d``).

    .. math::
        y_{n,:,h,w} = \frac{x_{n,:,h,w} - \mathrm{E}_c[x_{n,c,h,w}]}
            {\sqrt{\mathrm{Var}_c[x_{n,c,h,w}] + \epsilon}} \cdot \gamma + \beta

    Equal to ``permute(0, 2, 3, 1) -> nn.LayerNorm(C) -> permute(0, 3, 1, 2)`` without the two
    layout copies. Parameters are named ``weight`` and ``bias`` (shape ``(C,)``), as in timm's
    ``LayerNorm2d``, so such state_dicts load directly. It deliberately does *not* subclass
    :class:`torch.nn.LayerNorm`: code that sees an ``nn.LayerNorm`` assumes it normalizes the
    last dim.

    Args:
        num_channels: ``C``.
        eps: added to the variance (default ``1e-6``, as ConvNeXt).
        elementwise_affine: learnable per-channel gain (ones) and bias (zeros).
        bias: with ``elementwise_affine``, whether to learn the bias too.
        device, dtype: factory arguments for the parameters.

    Shape:
        Input ``(N, C, H, W)`` (contiguous or ``channels_last``); output the same, with the
        input's memory format.

    Examples::

        >>> norm = normkit.nn.LayerNorm2d(96)
        >>> y = norm(torch.randn(8, 96, 56, 56))
    """

    __constants__ = ["num_channels", "eps", "elementwise_affine"]

    def __init__(self, num_channels: int, eps: float = 1e-6, elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral):
            raise TypeError(f"num_channels must be an int, got {num_channels!r}")
        if num_channels <= 0:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        factory = {"device": device, "dtype": dtype}
        self.num_channels = int(num_channels)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        def make(wanted: bool):
            return torch.nn.Parameter(torch.empty(self.num_channels, **factory)) if wanted else None

        self.register_parameter("weight", make(elementwise_affine))
        self.register_parameter("bias", make(elementwise_affine and bias))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm_2d(input, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class LayerNormCHW(torch.nn.GroupNorm):
    r"""Layer norm of each sample over ``(C, H, W)`` with a per-channel affine: ``GroupNorm(1, C)``.

    .. math::
        y_n = \frac{x_n - \mathrm{E}[x_n]}{\sqrt{\mathrm{Var}[x_n] + \epsilon}}
            \cdot \gamma_{c} + \beta_{c}

    the statistics taken over all of ``(C, H, W)`` for sample ``n``. A subclass of
    :class:`torch.nn.GroupNorm` with ``num_groups=1`` that overrides only ``forward``: same
    parameters, ``state_dict`` and ``repr`` as ``nn.GroupNorm(1, C)``, computed by one
    :func:`normkit.layer_norm` call (see :func:`normkit.functional_channels.layer_norm_chw`).

    Args:
        num_channels: ``C``.
        eps: added to the variance (default ``1e-5``, as :class:`torch.nn.GroupNorm`).
        affine: learnable per-channel gain (ones) and bias (zeros).
        device, dtype: factory arguments for the parameters.

    Shape:
        Input ``(N, C, *)``; output the same.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        if isinstance(num_channels, bool) or not isinstance(num_channels, numbers.Integral):
            raise TypeError(f"num_channels must be an int, got {num_channels!r}")
        if num_channels <= 0:
            raise ValueError(f"num_channels must be positive, got {num_channels}")
        super().__init__(1, int(num_channels), eps, affine, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm_chw(input, self.weight, self.bias, self.eps)


class ChannelLayerNorm(nn.Module):
    r"""Layer norm over the channel dim 1 of ``(N, C)`` or ``(N, C, L)`` input: what
    :func:`convert` puts in place of a ``BatchNorm1d`` (the two layouts it accepts).

    .. math::
        y_{n,:,l} = \frac{x_{n,:,l} - \mathrm{E}_c[x_{n,c,l}]}{\sqrt{\mathrm{Var}_c[x_{n,c,l}] + \epsilon}}
            \odot \gamma + \beta

    A ``LayerNorm(C)`` over the last dim would be right for ``(N, C)`` but would normalize
    over ``L`` for ``(N, C, L)`` — silently, when ``L == C``. Here the statistics are always
    taken over ``C``; a 3-D input is normalized as its ``(N, L, C)`` transpose by
    :func:`normkit.layer_norm` and returned contiguous, as ``BatchNorm1d`` returns it.
    Parameters ``weight`` and ``bias`` of shape ``(C,)`` (BatchNorm's names and shapes).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_features, self.eps, self.elementwise_affine = int(num_features), float(eps), bool(elementwise_affine)
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.ones(self.num_features, **factory)) if elementwise_affine else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(self.num_features, **factory)) if elementwise_affine and bias else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D input" if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"expected 2D or 3D input (got {got})")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected input with {self.num_features} channels in dim 1, got input of size {list(input.shape)}")
        if input.dim() == 2:
            return layer_norm(input, (self.num_features,), self.weight, self.bias, self.eps)
        y = layer_norm(input.transpose(1, 2), (self.num_features,), self.weight, self.bias, self.eps)
        return y.transpose(1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
