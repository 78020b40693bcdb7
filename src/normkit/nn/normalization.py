"""Drop-in ``LayerNorm`` and ``RMSNorm`` modules backed by normkit's kernels.

Each subclasses its ``torch.nn`` counterpart and overrides ``forward``: the constructor
arguments, parameter names, initialization, ``extra_repr`` and ``state_dict`` keys are torch's
own, so a state_dict loads both ways and ``isinstance(m, torch.nn.LayerNorm)`` still holds.
The keyword-only options torch lacks (``zero_centered_weight``, RMS norm's ``casting_mode``)
add to the constructor and, when not at their defaults, to ``extra_repr``; they are not state
(the state_dict keys stay torch's), so a state_dict records a zero-centred weight ``w``, not
the gain ``1 + w``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normkit import functional as F
from normkit.nn._script import ScriptLayerNorm, ScriptRMSNorm
from normkit.validation import check_casting_mode

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


class _ZeroCenteredGain:
    """What a norm module with ``zero_centered_weight`` (gain ``1 + weight``) adds to torch's:
    the weight initialized to zeros (an initial gain of 1) and the flag in ``extra_repr``. Mixed
    in before the torch class, so ``super()`` is torch's."""

    zero_centered_weight = False  # class default: a module pickled before the option existed

    def _use_zero_centered_weight(self, zero_centered_weight: bool) -> None:
        if zero_centered_weight:
            self.zero_centered_weight = True
            self.reset_parameters()  # torch's __init__ ran it before the flag was set

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.zero_centered_weight and self.weight is not None:
            torch.nn.init.zeros_(self.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", zero_centered_weight=True" if self.zero_centered_weight else "")


def _check_zero_centered(zero_centered_weight, elementwise_affine: bool) -> None:
    if not isinstance(zero_centered_weight, bool):
        raise TypeError(f"zero_centered_weight must be a bool, got {zero_centered_weight!r}")
    if zero_centered_weight and not elementwise_affine:
        raise ValueError(
            "zero_centered_weight=True scales by (1 + weight), so it needs elementwise_affine=True "
            "(without a weight the gain is 1 already)"
        )


class LayerNorm(_ZeroCenteredGain, torch.nn.LayerNorm):
    r"""Layer normalization with an optional fused residual add, prenorm output and dropout.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} \cdot \gamma + \beta

    Args:
        normalized_shape, eps, elementwise_affine, bias, device, dtype: as
            :class:`torch.nn.LayerNorm` (``weight`` initialized to ones, ``bias`` to zeros).
        zero_centered_weight: scale by ``1 + weight`` (Gemma's gain; see
            :func:`normkit.layer_norm`); ``weight`` is then initialized to zeros, so the
            initial gain is 1.

    Shape:
        - Input: ``(*, *normalized_shape)``; residual (optional): same as input.
        - Output: same as input; with ``prenorm=True`` a tuple ``(y, s)``.

    Examples::

        >>> norm = normkit.nn.LayerNorm(512)
        >>> y = norm(torch.randn(8, 16, 512))
        >>> y, h = norm(branch_out, residual=h, prenorm=True)   # h + branch_out, normalized
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        zero_centered_weight: bool = False,
    ) -> None:
        _check_zero_centered(zero_centered_weight, elementwise_affine)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._use_zero_centered_weight(zero_centered_weight)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """TorchScript gets a ``torch.nn.LayerNorm`` sharing these parameters (see :func:`_torch_twin`);
        a zero-centred one gets :class:`~normkit.nn._script.ScriptLayerNorm` (torch has no such gain)."""
        if self.zero_centered_weight:
            return ScriptLayerNorm(self)
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
            zero_centered_weight=self.zero_centered_weight,
        )


class RMSNorm(_ZeroCenteredGain, torch.nn.RMSNorm):
    r"""RMS normalization with an optional fused residual add, prenorm output and dropout.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} \cdot \gamma

    Args:
        normalized_shape, eps, elementwise_affine, device, dtype: as :class:`torch.nn.RMSNorm`
            (``eps=None`` means the compute dtype's machine epsilon, as torch does; ``weight``
            initialized to ones).
        zero_centered_weight: scale by ``1 + weight`` (Gemma's ``GemmaRMSNorm``); ``weight`` is
            then initialized to zeros, so the initial gain is 1.
        casting_mode: ``"gemma"`` (default: one rounding at the end), ``"llama"`` (``x_hat``
            rounded to the input dtype before the gain, as Hugging Face ``LlamaRMSNorm``) or
            ``"none"`` (as ``"gemma"``); see :func:`normkit.rms_norm`.

    Shape and ``forward`` arguments as :class:`LayerNorm`.

    Examples::

        >>> norm = normkit.nn.RMSNorm(2048, eps=1e-6, zero_centered_weight=True)  # GemmaRMSNorm
        >>> norm = normkit.nn.RMSNorm(4096, eps=1e-6, casting_mode="llama")        # LlamaRMSNorm
    """

    casting_mode = "gemma"  # class default: a module pickled before the option existed

    def __init__(
        self,
        normalized_shape,
        eps: Optional[float] = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        zero_centered_weight: bool = False,
        casting_mode: str = "gemma",
    ) -> None:
        _check_zero_centered(zero_centered_weight, elementwise_affine)
        casting_mode = check_casting_mode(casting_mode)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        if casting_mode != "gemma":
            self.casting_mode = casting_mode
        self._use_zero_centered_weight(zero_centered_weight)

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        if self.casting_mode != "gemma":
            extra += f", casting_mode={self.casting_mode!r}"
        return extra

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """TorchScript gets a ``torch.nn.RMSNorm`` sharing these parameters (see :func:`_torch_twin`);
        a zero-centred gain or ``casting_mode="llama"`` (which torch's module cannot express) gets
        :class:`~normkit.nn._script.ScriptRMSNorm`."""
        if self.weight is not None and (self.zero_centered_weight or self.casting_mode == "llama"):
            return ScriptRMSNorm(self)
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
            zero_centered_weight=self.zero_centered_weight,
            casting_mode=self.casting_mode,
        )
