r"""Reference semantics of every normkit op, in plain PyTorch.

This module *defines* what normkit computes. Every fast backend (C++ on CPU, Triton on GPU)
is tested against it, and it is the fallback for anything a fast backend does not support
(and for every CPU call when the C++ extension is not built). It imports no kernel code.

For one row :math:`s \in \mathbb{R}^N` (the trailing ``normalized_shape`` elements of the input,
``N = prod(normalized_shape)``), with gain :math:`g` and bias :math:`b`:

.. math::

    \text{layer norm:}\quad y = \frac{s - \mu}{\sqrt{\sigma^2 + \epsilon}}\, g + b,
        \qquad \mu = \tfrac1N \textstyle\sum_i s_i,\quad \sigma^2 = \tfrac1N \sum_i (s_i - \mu)^2

    \text{RMS norm:}\quad y = \frac{s}{\sqrt{\tfrac1N \sum_i s_i^2 + \epsilon}}\, g

The fused variants normalize :math:`s = \operatorname{drop}(x) + r` where :math:`r` is the
residual and :math:`\operatorname{drop}(x) = x \odot m / (1 - p)` with a keep mask
:math:`m \sim \text{Bernoulli}(1 - p)` (training only). With ``prenorm=True`` the sum ``s`` is
returned too, for the residual stream of pre-LN transformer blocks.

The sum is added in float32 and rounded once to the input dtype *before* it is normalized, just
as the unfused ``layer_norm(x + r)`` rounds ``x + r``. So the prenorm output is exactly the
tensor that was normalized, and the backward pass, which reads the stored ``s``, differentiates
at the same point the forward evaluated. (Normalizing the unrounded sum while storing a rounded
one would make ``s - mean`` inconsistent in backward: for bf16 the error is amplified by
``rstd`` and is unbounded for a near-constant row.)

Precision: the sum, the statistics and the normalization are computed in float32 (float64 for
float64 input) whatever the input dtype; the variance uses the two-pass formula
:math:`\tfrac1N\sum(s-\mu)^2`, which stays exact at large means where
:math:`E[s^2] - E[s]^2` cancels catastrophically. Outputs have the input's dtype; gradients of
the gain and bias have the parameters' dtype.

Backward, with :math:`r = 1/\sqrt{\sigma^2 + \epsilon}`, :math:`\hat s = (s - \mu)\, r`
(:math:`\mu = 0` for RMS norm) and :math:`\hat g = dy \odot g`:

.. math::

    ds = r\,\big(\hat g - \overline{\hat g} - \hat s\, \overline{\hat g \hat s}\big)
        \quad\text{(RMS norm: drop the } \overline{\hat g} \text{ term)}

    dg = \textstyle\sum_\text{rows} dy \odot \hat s, \qquad db = \sum_\text{rows} dy,
    \qquad dr = ds + d s_\text{prenorm}, \qquad dx = dr \odot m / (1 - p)

where :math:`\overline{\,\cdot\,}` is the mean over the row.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from normkit.contract import ForwardOut, GradsOut, sum_is_input

ShapeLike = Union[int, Sequence[int], torch.Size]

__all__ = [
    "compute_dtype",
    "draw_dropout_seed",
    "dropout_keep_mask",
    "layer_norm",
    "rms_norm",
    "norm_forward",
    "norm_backward",
    "norm_backward_differentiable",
    "normalize",
    "normalized_gradient",
    "statistics",
    "zero_centered_gain",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and accumulations use: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zero_centered_gain(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The gain ``1 + weight`` of a zero-centred norm (Gemma; Liger's ``offset=1.0``, flash-attn's
    ``zero_centered_weight``) for an input of ``dtype``, computed as Gemma does,
    ``1.0 + weight.float()`` (in float64 for float64 input). The sum must not be taken in a
    16-bit weight dtype: near 1 bfloat16 steps by 2**-7, so a learned offset of 0.003 would vanish.
    Gradients reach ``weight`` through the sum (autograd casts them back to its dtype)."""
    return 1.0 + weight.to(compute_dtype(dtype))


def fused_keep_masks(seed: int, x: Tensor, x1: Optional[Tensor], dropout_p: float):
    """The reference dropout streams of the fused contract: ``(keep, keep1)`` boolean masks of
    ``x``'s shape (``None`` without dropout; ``keep1`` only with ``x1``), stream 0 seeded by
    ``seed``, stream 1 by ``seed + 2**31`` (seeds are below ``2**31``, so the streams of all
    calls are distinct)."""
    if dropout_p == 0.0:
        return None, None
    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
    keep1 = None if x1 is None else dropout_keep_mask(seed + 2**31, x.shape, dropout_p, x.device)
    return keep, keep1


def draw_dropout_seed(dropout_p: float) -> int:
    """A seed for one call's dropout mask (0 without dropout), drawn from torch's default
    generator, so ``torch.manual_seed`` makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_p > 0.0 else 0


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: torch.device) -> Tensor:
    """The reference dropout mask: ``True`` where an element is kept (probability ``1 - p``).

    A pure function of ``(seed, shape, p, device)``, so the backward pass regenerates the mask
    from the seed instead of storing it.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return torch.rand(tuple(shape), generator=generator, device=device) >= p


def _dropped_sum(
    x: Tensor, residual: Optional[Tensor], keep_mask: Optional[Tensor], dropout_p: float
) -> Tensor:
    """``drop(x) + residual``, added in the compute dtype, rounded once to ``x.dtype`` (the
    values the norm sees and the prenorm output returns), returned in the compute dtype."""
    acc = compute_dtype(x.dtype)
    s = x.to(acc)
    if keep_mask is not None:
        s = s * keep_mask.to(acc) * (1.0 / (1.0 - dropout_p))
    if residual is not None:
        s = s + residual.to(acc)
    return s.to(x.dtype).to(acc)


def statistics(s: Tensor, dims: Tuple[int, ...], eps: float, is_rms: bool):
    """Row mean (``None`` for RMS norm) and reciprocal std of ``s`` over ``dims`` (kept as
    size-1 dims), in ``s``'s dtype. Every torch-side layer norm in normkit (this module, the
    LN-LSTM/GRU steps, the channels-first norms) takes its statistics from here."""
    if is_rms:
        return None, torch.rsqrt(s.square().mean(dims, keepdim=True) + eps)
    mean = s.mean(dims, keepdim=True)
    # One refinement step (the corrected two-pass algorithm of Chan, Golub & LeVeque 1983):
    # the rounded mean of a constant row is off by a few ulps, and rstd (up to 1/sqrt(eps))
    # would amplify that residue into outputs of +-0.06 at eps = 1e-12; the mean of the
    # residues s - mean is exact for such a row, so the refined mean is the constant itself.
    mean = mean + (s - mean).mean(dims, keepdim=True)
    var = (s - mean).square().mean(dims, keepdim=True)  # two-pass: exact at large means
    return mean, torch.rsqrt(var + eps)


def normalize(
    s: Tensor,
    dims: Tuple[int, ...],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
):
    """``(y, mean, rstd)``: ``s`` normalized over ``dims`` by :func:`statistics`, then scaled
    by ``weight`` and shifted by ``bias`` (each broadcast against ``s``), in ``s``'s dtype."""
    mean, rstd = statistics(s, dims, eps, is_rms)
    s_hat = (s if mean is None else s - mean) * rstd
    y = s_hat
    if weight is not None:
        y = y * weight.to(s.dtype)
    if bias is not None:
        y = y + bias.to(s.dtype)
    return y, mean, rstd


def _norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    residual: Optional[Tensor],
    prenorm: bool,
    keep_mask: Optional[Tensor],
    dropout_p: float,
):
    ndim = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-ndim, 0))
    s = _dropped_sum(x, residual, keep_mask, dropout_p)
    y, _, _ = normalize(s, dims, weight, bias, eps, is_rms)
    y = y.to(x.dtype)
    return (y, s.to(x.dtype)) if prenorm else y


def layer_norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
):
    """Layer norm over the trailing ``normalized_shape`` dims of ``drop(x) + residual``.

    Composite PyTorch ops, differentiable by autograd (gradcheck-able in float64). Assumes
    valid input: :func:`normkit.layer_norm` validates and then dispatches here or to a kernel.
    ``keep_mask`` (bool, shape of ``x``) applies dropout with rate ``dropout_p``. Returns ``y``,
    or ``(y, s)`` with ``prenorm=True``.
    """
    return _norm(x, normalized_shape, weight, bias, eps, False, residual, prenorm, keep_mask, dropout_p)


def rms_norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    keep_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
):
    """RMS norm (Zhang & Sennrich 2019) over the trailing dims; arguments as :func:`layer_norm`.

    ``eps=None`` means the machine epsilon of the compute dtype (float32 for float16/bfloat16,
    else the input's), exactly as :func:`torch.nn.functional.rms_norm` does.
    """
    if eps is None:
        eps = default_rms_eps(x.dtype)
    return _norm(x, normalized_shape, weight, None, eps, True, residual, prenorm, keep_mask, dropout_p)


# --- The kernel contract: 2-D (rows, N) forward and backward, as every backend implements them.


def norm_forward(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    keep_mask: Optional[Tensor],
    dropout_p: float,
    store_sum: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]:
    """Forward on a contiguous ``(M, N)`` input.

    Returns ``(y, s, mean, rstd)``: ``y`` in ``x.dtype``; ``s = drop(x) + residual`` in
    ``x.dtype`` when ``store_sum`` else ``None``; ``mean`` (``None`` for RMS norm) and ``rstd``
    of shape ``(M,)`` in the compute dtype.
    """
    s = _dropped_sum(x, residual, keep_mask, dropout_p)
    y, mean, rstd = normalize(s, (-1,), weight, bias, eps, is_rms)
    return (
        y.to(x.dtype),
        s.to(x.dtype) if store_sum else None,
        None if mean is None else mean.squeeze(-1),
        rstd.squeeze(-1),
    )


def norm_backward(
    dy: Tensor,
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    is_rms: bool,
    keep_mask: Optional[Tensor],
    dropout_p: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward on ``(M, N)`` tensors, by the formulas in the module docstring.

    ``s`` is the normalized input (``x`` itself when there is no residual and no dropout),
    ``dsum`` the gradient of the prenorm output (or ``None``). Returns ``(dx, ds, dweight,
    dbias)``: ``dx`` and ``ds`` (the gradient of the residual) in ``dy.dtype``; ``dweight =
    sum_rows(dy * s_hat)`` and ``dbias = sum_rows(dy)``, shape ``(N,)``, in the compute dtype.
    """
    acc = compute_dtype(s.dtype)
    rstd = rstd.to(acc).unsqueeze(-1)
    s32 = s.to(acc)
    s_hat = (s32 if mean is None else s32 - mean.to(acc).unsqueeze(-1)) * rstd
    scale = None if keep_mask is None else keep_mask.to(acc) * (1.0 / (1.0 - dropout_p))
    return _backward_formula(dy, dsum, s_hat, rstd, weight, is_rms, scale)


def norm_backward_differentiable(
    dy: Tensor,
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    eps: float,
    is_rms: bool,
    keep_scale: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`norm_backward` as a function of ``(dy, dsum, s, weight)`` that autograd can
    differentiate again (double backward: gradient penalties, Hessian-vector products).

    The row statistics are recomputed from ``s`` with differentiable ops instead of read from
    the forward's saved ``mean``/``rstd`` (constants to autograd), so the second derivative
    includes their dependence on ``s``. ``keep_scale`` is ``mask / (1 - p)`` (a constant), or
    ``None`` without dropout.
    """
    s32 = s.to(compute_dtype(s.dtype))
    mean, rstd = statistics(s32, (-1,), eps, is_rms)
    s_hat = (s32 if mean is None else s32 - mean) * rstd
    return _backward_formula(dy, dsum, s_hat, rstd, weight, is_rms, keep_scale)


def normalized_gradient(g_hat: Tensor, s_hat: Tensor, rstd: Tensor, is_rms: bool) -> Tensor:
    """The gradient reaching the normalized input from ``g_hat = dy * g`` (last dim):
    ``rstd * (g_hat - mean(g_hat) - s_hat * mean(g_hat * s_hat))``, without the
    ``mean(g_hat)`` term for RMS norm. ``rstd`` broadcasts against the rows (``(M, 1)``)."""
    inner = g_hat - s_hat * (g_hat * s_hat).mean(-1, keepdim=True)
    if not is_rms:
        inner = inner - g_hat.mean(-1, keepdim=True)
    return inner * rstd


def _backward_formula(dy, dsum, s_hat, rstd, weight, is_rms, keep_scale):
    """The backward of the module docstring from ``s_hat`` and ``rstd`` (``(M, 1)``), in the
    dtype of ``s_hat``; ``dx`` and ``ds`` are returned in ``dy.dtype``."""
    acc = s_hat.dtype
    dy32 = dy.to(acc)
    g_hat = dy32 if weight is None else dy32 * weight.to(acc)
    ds = normalized_gradient(g_hat, s_hat, rstd, is_rms)
    if dsum is not None:
        ds = ds + dsum.to(acc)
    dx = ds if keep_scale is None else ds * keep_scale.to(acc)
    return dx.to(dy.dtype), ds.to(dy.dtype), (dy32 * s_hat).sum(0), dy32.sum(0)


# --- The fused kernel contract (normkit.contract): every option, one forward, one backward.


def fused_forward(
    x: Tensor,
    residual: Optional[Tensor],
    x1: Optional[Tensor],
    rowscale: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    weight1: Optional[Tensor],
    bias1: Optional[Tensor],
    spec,
    keep: Optional[Tensor] = None,
    keep1: Optional[Tensor] = None,
):
    """The contract's forward (:mod:`normkit.contract`, whose docstring has the math)
    on ``(M, N)`` tensors, as torch ops that autograd differentiates: ``keep``/``keep1`` are
    the boolean keep masks of ``x`` and ``x1`` (``None`` without dropout). Returns a
    :class:`~normkit.contract.ForwardOut`; the masks in it are ``keep``/``keep1``
    when ``spec.store_mask``."""
    p = spec.dropout_p
    if sum_is_input(x, residual, x1, rowscale, spec):
        s = x
    else:
        acc = compute_dtype(x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype))
        t = x.to(acc)
        if rowscale is not None:
            t = t * rowscale.to(acc).unsqueeze(-1)
        if keep is not None:
            t = t * keep.to(acc) * (1.0 / (1.0 - p))
        if x1 is not None:
            t1 = x1.to(acc)
            if keep1 is not None:
                t1 = t1 * keep1.to(acc) * (1.0 / (1.0 - p))
            t = t + t1
        if residual is not None:
            t = t + residual.to(acc)
        s = t.to(spec.sum_dtype)
    acc = compute_dtype(torch.promote_types(s.dtype, x.dtype))
    s_acc = s.to(acc)
    mean, rstd = statistics(s_acc, (-1,), spec.eps, spec.is_rms)
    s_hat = (s_acc if mean is None else s_acc - mean) * rstd

    def affine(w, b):
        y = s_hat if w is None else s_hat * w.to(acc)
        return (y if b is None else y + b.to(acc)).to(spec.out_dtype)

    masks = spec.store_mask and p > 0.0
    return ForwardOut(
        affine(weight, bias),
        None if weight1 is None else affine(weight1, bias1),
        s if spec.store_sum else None,
        None if mean is None else mean.squeeze(-1),
        rstd.squeeze(-1),
        keep if masks else None,
        keep1 if masks and x1 is not None else None,
    )


def fused_backward(
    dy: Optional[Tensor],
    dy1: Optional[Tensor],
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    weight1: Optional[Tensor],
    rowscale: Optional[Tensor],
    spec,
    needs,
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
    keep: Optional[Tensor] = None,
    keep1: Optional[Tensor] = None,
    stats: Optional[Tuple[Optional[Tensor], Tensor]] = None,
):
    """The contract's backward (the formulas of :mod:`normkit.contract`) as torch ops
    from the saved sum ``s``. With ``stats=None`` the row statistics are recomputed from ``s``
    with differentiable ops, so under ``create_graph=True`` this is every backend's
    differentiable backward (double backward: the second derivative includes the statistics'
    dependence on ``s``); ``stats = (mean, rstd)`` as the forward saved them (``(M,)``) gives
    the first-order reference of the kernels. Returns a
    :class:`~normkit.contract.GradsOut` with ``None`` where ``needs`` says so."""
    acc = compute_dtype(torch.promote_types(s.dtype, x_dtype))
    s_acc = s.to(acc)
    if stats is None:
        mean, rstd = statistics(s_acc, (-1,), spec.eps, spec.is_rms)
    else:
        mean = None if spec.is_rms or stats[0] is None else stats[0].to(acc).unsqueeze(-1)
        rstd = stats[1].to(acc).unsqueeze(-1)
    s_hat = (s_acc if mean is None else s_acc - mean) * rstd
    dy_acc = None if dy is None else dy.to(acc)
    dy1_acc = None if dy1 is None else dy1.to(acc)
    g = torch.zeros_like(s_hat)
    if dy_acc is not None:
        g = g + (dy_acc if weight is None else dy_acc * weight.to(acc))
    if dy1_acc is not None:
        g = g + dy1_acc * weight1.to(acc)
    ds = normalized_gradient(g, s_hat, rstd, spec.is_rms)
    if dsum is not None:
        ds = ds + dsum.to(acc)
    scale = 1.0 / (1.0 - spec.dropout_p) if spec.dropout_p > 0.0 else 1.0
    dx = dx1 = None
    if needs.x:
        dx = ds if rowscale is None else ds * rowscale.to(acc).unsqueeze(-1)
        if keep is not None:
            dx = dx * keep.to(acc) * scale
        dx = dx.to(x_dtype)
    if needs.x1:
        dx1 = (ds if keep1 is None else ds * keep1.to(acc) * scale).to(x_dtype)

    def total(t):
        return torch.zeros(s.shape[-1], dtype=acc, device=s.device) if t is None else t.sum(0)

    return GradsOut(
        dx,
        dx1,
        ds.to(residual_dtype) if needs.residual else None,
        total(None if dy_acc is None else dy_acc * s_hat) if needs.weight else None,
        total(dy_acc) if needs.bias else None,
        total(None if dy1_acc is None else dy1_acc * s_hat) if needs.weight1 else None,
        total(dy1_acc) if needs.bias1 else None,
    )


def default_rms_eps(dtype: torch.dtype) -> float:
    """``torch.nn.functional.rms_norm``'s default epsilon for input ``dtype``.

    PyTorch documents ``torch.finfo(x.dtype).eps`` but uses the epsilon of the dtype it computes
    in (float32 for float16/bfloat16 input); normkit matches what PyTorch does.
    """
    return float(torch.finfo(compute_dtype(dtype)).eps)

