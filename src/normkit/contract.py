r"""The one kernel contract: a call of layer norm / RMS norm with every fused option, as each
backend's one forward and one backward kernel take it.

flash-attn's design (``layer_norm_fwd`` with ``HAS_RESIDUAL``, ``HAS_X1``, ``HAS_W1``,
``HAS_ROWSCALE``, ``STORE_DROPOUT_MASK``) done once: the scalar options are a frozen
:class:`KernelSpec`, the tensors are passed by name, and every option a tensor or flag turns on
is a compile-time switch of the kernel (C++ template argument, ``tl.constexpr``), so a call pays
for the options it uses and for nothing else, in one pass over memory.

On contiguous ``(M, N)`` tensors (rows of the flattened input), with ``Acc`` the compute dtype
(float64 if ``x`` or ``residual`` is float64, else float32), ``p = spec.dropout_p`` and keep
masks ``k, k1`` (``True`` with probability ``1 - p``, drawn from ``seed``: stream 0 for ``x``,
stream 1 for ``x1``; each backend its own random stream, a pure function of
``(seed, stream, M, N, p)`` so backward regenerates them):

.. math::
    t = \operatorname{Acc}(x)\,\rho_i\, k/(1-p) + \operatorname{Acc}(x_1)\, k_1/(1-p)
        + \operatorname{Acc}(r), \qquad s = \operatorname{round}_{S}(t)

    \hat s = (s - \mu)\,\sigma^{-1} \ \text{(statistics of the stored } s
        \text{ in Acc, as } \mathtt{reference.statistics}),
    \qquad y = \operatorname{round}_{O}(\hat s\, w + b), \qquad
    y_1 = \operatorname{round}_{O}(\hat s\, w_1 + b_1)

with ``S = spec.sum_dtype``, ``O = spec.out_dtype``, each missing term dropped (``w = 1``,
``b = 0``), the products in the order written (``x * rowscale`` first, then the dropout scale).
When nothing forms a sum (no ``residual``, ``x1``, ``rowscale``, dropout, and ``S`` is ``x``'s
dtype) ``s`` *is* ``x``: nothing is written and ``x`` is returned as ``s``. RMS norm has
``mu = 0`` and takes a bias like layer norm.

Backward, with ``g = dy\, w + dy_1\, w_1`` in Acc (a missing ``dy``/``dy1`` is zero):

.. math::
    ds = \sigma^{-1}\big(g - \bar g - \hat s\, \overline{g \hat s}\big) + d s_\text{prenorm}
    \quad (\text{RMS: no } \bar g),\qquad
    d r = \operatorname{round}_{R}(ds),\quad
    dx = \operatorname{round}_{T}(ds\, \rho_i\, k/(1-p)),\quad
    dx_1 = \operatorname{round}_{T}(ds\, k_1/(1-p))

    dw = \textstyle\sum_\text{rows} dy\, \hat s,\quad db = \sum_\text{rows} dy,\quad
    dw_1 = \sum_\text{rows} dy_1 \hat s,\quad db_1 = \sum_\text{rows} dy_1 \quad (\text{Acc}, (N,))

and a kernel computes (and allocates) only the gradients :class:`GradNeeds` asks for.
``rowscale`` is a constant to the kernels (flash-attn's too); a call whose ``rowscale``
requires grad takes the reference composite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["KernelSpec", "ForwardOut", "GradNeeds", "GradsOut", "sum_is_input"]


@dataclass(frozen=True)
class KernelSpec:
    """The scalar options of one kernel call (the tensors are passed by name beside it).

    Attributes:
        is_rms: RMS norm (no centering) instead of layer norm.
        eps: added to the variance (the mean square for RMS norm), a finite float >= 0.
        dropout_p: dropout rate on ``x`` and ``x1`` (0.0 outside training).
        sum_dtype: the dtype ``s`` is stored in (the residual's, raised to float32 by
            ``residual_in_fp32``; the input's without a residual).
        out_dtype: the dtype of ``y`` and ``y1``.
        store_sum: return ``s`` (prenorm, ``residual_out=``, or kept for backward).
        store_mask: return the boolean keep masks (``return_dropout_mask``).
    """

    is_rms: bool
    eps: float
    dropout_p: float
    sum_dtype: torch.dtype
    out_dtype: torch.dtype
    store_sum: bool = False
    store_mask: bool = False


class ForwardOut(NamedTuple):
    """What a forward kernel returns: ``y`` (``out`` when given); ``y1`` with ``weight1``;
    ``s`` when ``spec.store_sum`` (``residual_out`` when given, ``x`` itself when no sum is
    formed: :func:`sum_is_input`); ``mean`` (``None`` for RMS norm) and ``rstd``, ``(M,)`` in
    Acc; the keep masks (bool ``(M, N)``) with ``spec.store_mask`` and dropout (``mask1`` only
    with ``x1``)."""

    y: Tensor
    y1: Optional[Tensor]
    s: Optional[Tensor]
    mean: Optional[Tensor]
    rstd: Tensor
    mask: Optional[Tensor]
    mask1: Optional[Tensor]


@dataclass(frozen=True)
class GradNeeds:
    """Which gradients a backward kernel computes; the rest it neither computes nor allocates
    (a frozen gain, no residual, an RMS norm without bias)."""

    x: bool = True
    x1: bool = False
    residual: bool = False
    weight: bool = False
    bias: bool = False
    weight1: bool = False
    bias1: bool = False


class GradsOut(NamedTuple):
    """A backward kernel's result: ``None`` for each gradient :class:`GradNeeds` did not ask
    for. ``dx``/``dx1`` in ``x``'s dtype, ``dresidual`` in the residual's, the parameter
    gradients ``(N,)`` in Acc (the caller casts them to the parameters' dtypes)."""

    dx: Optional[Tensor]
    dx1: Optional[Tensor]
    dresidual: Optional[Tensor]
    dweight: Optional[Tensor]
    dbias: Optional[Tensor]
    dweight1: Optional[Tensor]
    dbias1: Optional[Tensor]


def sum_is_input(x: Tensor, residual, x1, rowscale, spec: KernelSpec) -> bool:
    """Whether no sum is formed, so ``s`` is ``x`` itself (see the module docstring)."""
    return residual is None and x1 is None and rowscale is None and spec.dropout_p == 0.0 and spec.sum_dtype == x.dtype
