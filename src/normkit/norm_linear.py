r"""A norm followed by a Linear layer that does not keep the normalized activation for backward.

``F.linear(layer_norm(x), W, b)`` keeps ``y = layer_norm(x)`` alive until backward (the Linear
needs it for ``dW = dout^T y``) beside the ``x`` the norm keeps: two activations of ``x``'s size.
:func:`layer_norm_linear` / :func:`rms_norm_linear` (flash-attn's ``layer_norm_linear_fn``)
keep only ``x`` and the parameters and recompute ``y`` in backward, trading one more norm
forward for that memory:

.. math::
    \text{out} = y W^\top + c, \qquad y = \operatorname{norm}(x)

    dW = \text{dout}^\top y, \qquad dc = \textstyle\sum_\text{rows} \text{dout}, \qquad
    dy = \text{dout}\, W, \qquad (dx, dg, db) = \operatorname{norm\ backward}(dy)

The norm is :func:`normkit.layer_norm` / :func:`normkit.rms_norm`, so any backend runs it; its
gradient comes from autograd through a recomputed norm. Not one fused kernel: the norm and the
matrix product are separate launches, as in flash-attn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from normkit.errors import NormDeviceError, NormShapeError, NormTypeError
from normkit.functional import layer_norm, rms_norm
from normkit.reference import default_rms_eps, norm_backward_differentiable
from normkit.validation import as_normalized_shape, check_floating_tensor, check_residual

__all__ = ["layer_norm_linear", "rms_norm_linear"]


def _norm(x, weight, bias, shape, eps, is_rms, out_dtype=None):
    kw = {} if out_dtype is None or out_dtype == x.dtype else {"out_dtype": out_dtype}
    if is_rms:
        return rms_norm(x, shape, weight, eps, **kw)
    return layer_norm(x, shape, weight, bias, eps, **kw)


def _residual_sum(x: Tensor, residual, residual_in_fp32: bool) -> Tensor:
    """The norm's input ``s`` (flash-attn's residual stream): ``x + residual`` added in float32
    and rounded once to ``x``'s dtype, or kept in float32 with ``residual_in_fp32`` (required for
    a residual of another dtype); ``x`` itself without either. Differentiable (plain torch ops)."""
    if not isinstance(residual_in_fp32, bool):
        raise TypeError(f"residual_in_fp32 must be a bool, got {residual_in_fp32!r}")
    check_residual(residual, x, same_dtype=not residual_in_fp32)
    if residual is None and not residual_in_fp32:
        return x
    acc = torch.promote_types(x.dtype, torch.float32)
    s = x.to(acc) if residual is None else x.to(acc) + residual.to(acc)
    return s if residual_in_fp32 else s.to(x.dtype)


def _check_linear(x: Tensor, linear_weight, linear_bias) -> None:
    """``F.linear``'s requirements, said before the norm runs, with the expected values."""
    check_floating_tensor("input", x)
    check_floating_tensor("linear_weight", linear_weight)
    if linear_weight.dim() != 2 or x.dim() == 0 or linear_weight.shape[1] != x.shape[-1]:
        raise NormShapeError(
            f"linear_weight must have shape [out_features, {x.shape[-1] if x.dim() else '?'}] (the input's last "
            f"dim), got {list(linear_weight.shape)}"
        )
    if linear_weight.dtype != x.dtype:
        raise NormTypeError(f"linear_weight must have the input's dtype {x.dtype}, got {linear_weight.dtype}")
    if linear_weight.device != x.device:
        raise NormDeviceError(f"linear_weight is on {linear_weight.device} but input is on {x.device}")
    if linear_bias is None:
        return
    check_floating_tensor("linear_bias", linear_bias, what=" or None")
    if tuple(linear_bias.shape) != (linear_weight.shape[0],):
        raise NormShapeError(f"linear_bias must have shape [{linear_weight.shape[0]}], got {list(linear_bias.shape)}")
    if linear_bias.dtype != x.dtype:
        raise NormTypeError(f"linear_bias must have the input's dtype {x.dtype}, got {linear_bias.dtype}")
    if linear_bias.device != x.device:
        raise NormDeviceError(f"linear_bias is on {linear_bias.device} but input is on {x.device}")


class _NormLinear(torch.autograd.Function):
    """``F.linear(norm(x), W, c)`` saving ``(x, g, b, W)``, not ``norm(x)``."""

    @staticmethod
    def forward(x, norm_weight, norm_bias, linear_weight, linear_bias, shape, eps, is_rms, out_dtype):
        with torch.no_grad():
            y = _norm(x, norm_weight, norm_bias, shape, eps, is_rms, out_dtype)
        return F.linear(y, linear_weight, linear_bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, norm_weight, norm_bias, linear_weight, linear_bias, shape, eps, is_rms, out_dtype = inputs
        ctx.save_for_backward(x, norm_weight, norm_bias, linear_weight)
        ctx.shape, ctx.eps, ctx.is_rms, ctx.out_dtype = shape, eps, is_rms, out_dtype
        ctx.has_linear_bias = linear_bias is not None

    @staticmethod
    @once_differentiable  # double backward raises instead of returning wrong zeros
    def backward(ctx, dout):
        x, norm_weight, norm_bias, linear_weight = ctx.saved_tensors
        need_x, need_g, need_b, need_w, need_c = ctx.needs_input_grad[:5]
        norm_inputs = [
            None if t is None else t.detach().requires_grad_(need)
            for t, need in ((x, need_x), (norm_weight, need_g), (norm_bias, need_b))
        ]
        wanted = [t for t in norm_inputs if t is not None and t.requires_grad]
        compiling = torch.compiler.is_compiling()  # Dynamo cannot trace torch.autograd.grad
        with torch.enable_grad() if wanted and not compiling else torch.no_grad():
            y = _norm(*norm_inputs, ctx.shape, ctx.eps, ctx.is_rms, ctx.out_dtype)
        rows_out, rows_y = dout.reshape(-1, dout.shape[-1]), y.detach().reshape(-1, y.shape[-1])
        d_linear_weight = rows_out.t().mm(rows_y) if need_w else None
        d_linear_bias = rows_out.sum(0) if need_c and ctx.has_linear_bias else None
        if not wanted:
            return None, None, None, d_linear_weight, d_linear_bias, None, None, None, None
        dy = dout.matmul(linear_weight)
        if compiling:
            dx, dg, db = _norm_vjp(dy, x, norm_weight, norm_bias, ctx.shape, ctx.eps, ctx.is_rms)
        else:  # the backend's own backward, through the recomputed norm's graph
            grads = iter(torch.autograd.grad(y, wanted, dy))
            dx, dg, db = (next(grads) if t is not None and t.requires_grad else None for t in norm_inputs)
        dx, dg, db = (d if need else None for d, need in zip((dx, dg, db), (need_x, need_g, need_b)))
        return dx, dg, db, d_linear_weight, d_linear_bias, None, None, None, None


def _norm_vjp(dy, x, weight, bias, shape, eps, is_rms):
    """The norm's ``(dx, dweight, dbias)`` by :func:`normkit.reference.norm_backward_differentiable`
    (plain torch ops, which ``torch.compile`` traces) on the flattened ``(rows, N)`` view."""
    n = 1
    for d in as_normalized_shape(shape):
        n *= d
    eps = default_rms_eps(x.dtype) if eps is None else float(eps)
    w = None if weight is None else weight.reshape(n)
    dx, _, dw, db = norm_backward_differentiable(dy.reshape(-1, n), None, x.reshape(-1, n), w, eps, is_rms, None)
    dx = dx.to(x.dtype)  # dy has the output's dtype, which differs from x's with residual_in_fp32
    dw = None if weight is None else dw.to(weight.dtype).reshape(weight.shape)
    db = None if bias is None else db.to(bias.dtype).reshape(bias.shape)
    return dx.reshape(x.shape), dw, db


def layer_norm_linear(
    x: Tensor,
    normalized_shape,
    norm_weight,
    norm_bias,
    linear_weight: Tensor,
    linear_bias=None,
    eps: float = 1e-5,
    *,
    residual=None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
):
    r"""``F.linear(normkit.layer_norm(s, normalized_shape, norm_weight, norm_bias, eps),
    linear_weight, linear_bias)``, without saving the normalized activation for backward: it is
    recomputed there (flash-attn's ``layer_norm_linear_fn``). The Linear acts on the last dim;
    ``linear_weight`` (``[out_features, x.shape[-1]]``) and ``linear_bias`` have the input's
    dtype. Twice-differentiating raises (the backward is not differentiable); autocast is not
    applied inside.

    ``s = x + residual`` (added in float32, rounded once to ``x``'s dtype; kept in float32 with
    ``residual_in_fp32``, which a residual of another dtype needs), or ``x``; the normalized
    ``s`` is rounded to ``x``'s dtype before the Linear. With ``prenorm=True`` returns
    ``(out, s)``, the residual stream for the next block, as flash-attn does.
    """
    _check_linear(x, linear_weight, linear_bias)
    _check_prenorm(prenorm)
    s = _residual_sum(x, residual, residual_in_fp32)
    out = _NormLinear.apply(s, norm_weight, norm_bias, linear_weight, linear_bias, normalized_shape, eps, False, x.dtype)
    return (out, s) if prenorm else out


def rms_norm_linear(
    x: Tensor,
    normalized_shape,
    norm_weight,
    linear_weight: Tensor,
    linear_bias=None,
    eps=None,
    *,
    residual=None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
):
    """:func:`layer_norm_linear` for :func:`normkit.rms_norm` (``eps=None``: the machine epsilon
    of the compute dtype, as :func:`normkit.rms_norm`)."""
    _check_linear(x, linear_weight, linear_bias)
    _check_prenorm(prenorm)
    s = _residual_sum(x, residual, residual_in_fp32)
    out = _NormLinear.apply(s, norm_weight, None, linear_weight, linear_bias, normalized_shape, eps, True, x.dtype)
    return (out, s) if prenorm else out


def _check_prenorm(prenorm) -> None:
    if not isinstance(prenorm, bool):
        raise TypeError(f"prenorm must be a bool, got {prenorm!r}")
