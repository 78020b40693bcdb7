r"""Dynamic Tanh (DyT; Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization").

An elementwise stand-in for a layer norm: no statistics, a learned scalar ``alpha`` squashes
the input, a per-feature gain and bias follow. Plain torch ops, not a normkit kernel: the
formula reads each element once with no reduction, so ``torch.compile`` can fuse it into one
pass by itself (eager runs three to four elementwise passes).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normkit.reference import compute_dtype
from normkit.validation import ShapeLike, as_normalized_shape, check_input, check_param

__all__ = ["DyT"]


class DyT(torch.nn.Module):
    r"""Dynamic Tanh over the trailing ``normalized_shape`` dims.

    .. math::
        y = \gamma \odot \tanh(\alpha x) + \beta

    with a learned scalar :math:`\alpha` and per-feature :math:`\gamma`, :math:`\beta` of shape
    ``normalized_shape``. Computed in float32 for float16/bfloat16 input (float64 for float64)
    and rounded once to the input dtype, as normkit's norms are; gradients of the parameters
    keep the parameters' dtype.

    Args:
        normalized_shape: the trailing dims ``weight`` and ``bias`` cover (an int or a sequence
            of ints), as for :class:`torch.nn.LayerNorm`.
        alpha_init: initial :math:`\alpha` (the paper's 0.5; it suggests smaller values for
            wider or deeper LLMs).
        elementwise_affine: learn ``weight`` (initialized to ones) and, with ``bias``, ``bias``
            (zeros). ``False``: ``y = tanh(alpha x)``.
        bias: learn ``bias`` (only with ``elementwise_affine``).
        device, dtype: of the parameters.

    Attributes:
        alpha: the scalar :math:`\alpha`, a parameter of shape ``()``.
        weight, bias: :math:`\gamma` and :math:`\beta`, or ``None``.

    Shape:
        - Input: ``(*, *normalized_shape)``.
        - Output: same as the input, in the input's dtype.

    Examples::

        >>> dyt = normkit.nn.DyT(512)
        >>> y = dyt(torch.randn(8, 16, 512))
        >>> normkit.convert(model, to="dyt")        # every LayerNorm/RMSNorm becomes a DyT
    """

    def __init__(
        self,
        normalized_shape: ShapeLike,
        alpha_init: float = 0.5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.normalized_shape = as_normalized_shape(normalized_shape)
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)):
            raise TypeError(f"alpha_init must be a real number, got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        self.elementwise_affine = elementwise_affine
        self.alpha = torch.nn.Parameter(torch.empty((), **factory_kwargs))
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            if bias:
                self.bias = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        check_input(input, self.normalized_shape)
        check_param("weight", self.weight, input, self.normalized_shape)
        check_param("bias", self.bias, input, self.normalized_shape)
        return dyt(input, self.alpha, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, alpha_init={self.alpha_init}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


def dyt(x: Tensor, alpha: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``weight * tanh(alpha * x) + bias`` in the compute dtype, rounded once to ``x.dtype``
    (``weight``/``bias`` broadcast over the trailing dims; assumes checked input)."""
    acc = compute_dtype(x.dtype)
    y = torch.tanh(alpha.to(acc) * x.to(acc))
    if weight is not None:
        y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
