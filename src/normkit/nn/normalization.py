"""Drop-in ``LayerNorm`` and ``RMSNorm`` modules backed by normkit's kernels.

Each subclasses its ``torch.nn`` counterpart and overrides only ``forward``: the constructor,
parameter names, initialization, ``extra_repr`` and ``state_dict`` keys are torch's own, so
a state_dict loads both ways and ``isinstance(m, torch.nn.LayerNorm)`` still holds.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normkit import functional as F

__all__ = ["LayerNorm", "RMSNorm"]


def _torch_twin(module: torch.nn.Module, cls: type, **config) -> torch.nn.Module:
    """A ``cls`` (torch's module) sharing ``module``'s parameters, for TorchScript.

    ``torch.jit.script`` cannot compile normkit's ``forward`` (keyword-only fused options, and
    kernels launched from Python); it calls ``__prepare_scriptable__`` first, so scripting a
    model swaps each normkit norm for torch's, with the *same* parameter objects (training the
    scripted model trains them) and the same semantics up to rounding. The fused options are
    not available inside TorchScript; ``torch.jit.trace`` and ``torch.compile`` keep normkit.
    """
    twin = cls(**config, device="meta")
    for name, param in module.named_parameters(recurse=False):
        setattr(twin, name, param)
    return twin.train(module.training)


class LayerNorm(torch.nn.LayerNorm):
    r"""Layer normalization with an optional fused residual add, prenorm output and dropout.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} \cdot \gamma + \beta

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as
            :class:`torch.nn.LayerNorm` (``weight`` initialized to ones, ``bias`` to zeros).

    Shape:
        - Input: ``(*, *normalized_shape)``; residual (optional): same as input.
        - Output: same as input; with ``prenorm=True`` a tuple ``(y, s)``.

    Examples::

        >>> norm = normkit.nn.LayerNorm(512)
        >>> y = norm(torch.randn(8, 16, 512))
        >>> y, h = norm(branch_out, residual=h, prenorm=True)   # h + branch_out, normalized
    """

    def __prepare_scriptable__(self) -> torch.nn.LayerNorm:
        """TorchScript gets a ``torch.nn.LayerNorm`` sharing these parameters (see :func:`_torch_twin`)."""
        return _torch_twin(
            self,
            torch.nn.LayerNorm,
            normalized_shape=self.normalized_shape,
            eps=self.eps,
            elementwise_affine=self.elementwise_affine,
            bias=self.bias is not None,
        )

    def forward(
        self, input: Tensor, residual: Optional[Tensor] = None, *, prenorm: bool = False, dropout_p: float = 0.0
    ):
        """Normalize ``dropout(input) + residual``; ``dropout_p`` applies in training mode only."""
        return F.layer_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.bias,
            self.eps,
            residual=residual,
            prenorm=prenorm,
            dropout_p=dropout_p,
            training=self.training,
        )


class RMSNorm(torch.nn.RMSNorm):
    r"""RMS normalization with an optional fused residual add, prenorm output and dropout.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} \cdot \gamma

    Args:
        normalized_shape, eps, elementwise_affine, device, dtype: as :class:`torch.nn.RMSNorm`
            (``eps=None`` means the compute dtype's machine epsilon, as torch does; ``weight``
            initialized to ones).

    Shape and ``forward`` arguments as :class:`LayerNorm`.
    """

    def __prepare_scriptable__(self) -> torch.nn.RMSNorm:
        """TorchScript gets a ``torch.nn.RMSNorm`` sharing these parameters (see :func:`_torch_twin`)."""
        return _torch_twin(
            self,
            torch.nn.RMSNorm,
            normalized_shape=self.normalized_shape,
            eps=self.eps,
            elementwise_affine=self.elementwise_affine,
        )

    def forward(
        self, input: Tensor, residual: Optional[Tensor] = None, *, prenorm: bool = False, dropout_p: float = 0.0
    ):
        """Normalize ``dropout(input) + residual``; ``dropout_p`` applies in training mode only."""
        return F.rms_norm(
            input,
            self.normalized_shape,
            self.weight,
            self.eps,
            residual=residual,
            prenorm=prenorm,
            dropout_p=dropout_p,
            training=self.training,
        )
