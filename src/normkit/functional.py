r"""The public functional API: :func:`layer_norm` and :func:`rms_norm`.

Same first arguments as :func:`torch.nn.functional.layer_norm` / :func:`~torch.nn.functional.rms_norm`,
plus keyword-only fused options. Input is validated here, once; then the call is flattened to a
contiguous ``(rows, N)`` view and dispatched to a backend (:mod:`normkit.backends`). The exact
semantics are those of :mod:`normkit.reference`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from normkit import ops, paths
from normkit.backends import forced_backend, select_backend_name
from normkit.reference import default_rms_eps
from normkit.validation import (
    FLOAT_DTYPES,
    as_normalized_shape,
    check_dropout,
    check_eps,
    check_input,
    check_param,
    check_residual,
)

__all__ = ["layer_norm", "rms_norm", "route"]

ShapeLike = Union[int, Sequence[int], torch.Size]

#: The paths a call can take, chosen by :func:`route`; each value says why it is taken.
ROUTES = {
    "dtensor": "a DTensor input: run the local shards, re-wrap with the input's placements",
    "onnx": "inside ONNX export: standard operators the exporter can write",
    "composite": "torch.func transform, forward-mode AD or an empty input: the reference "
    "composite, whose torch ops every autograd mode understands",
    "aten": "a tiny float32 CPU RMS call: PyTorch's own fused kernel costs less to launch",
    "op": "traced (torch.compile, export, make_fx, jit.trace, a tensor subclass): the "
    "normkit::norm_fwd custom op",
    "eager": "eager with gradients: the autograd Function calling the backend",
    "eager_no_grad": "eager without gradients: the backend directly",
}


def _in_forward_ad(tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent."""
    from torch.autograd import forward_ad

    if forward_ad._current_level < 0:  # no dual level is open: the cheap common case
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def route(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], is_rms: bool, dropout_p: float) -> str:
    """The one place that decides how a (validated) call runs: a key of :data:`ROUTES`.

    Order matters: a DTensor is unwrapped first (its local call is routed again); empty inputs
    take the composite; what traces gets the custom op, or standard ops under ONNX export;
    ``torch.func`` transforms and forward AD need ops they can transform, so they take the
    reference composite (same semantics, plain torch ops); then the fast paths.
    """
    tensors = (x, residual, weight, bias)
    if type(x) is not Tensor and _is_dtensor(x):
        return "dtensor"
    if x.numel() == 0:
        return "composite"
    # ONNX exporters trace (jit tracing, or torch.export's Dynamo and dispatch modes), so the
    # export flag is asked only when something traces: it costs more than the rest of this
    # function on a plain eager call.
    if torch.compiler.is_compiling():
        return "onnx" if torch.onnx.is_in_onnx_export() else "op"
    if torch._C._are_functorch_transforms_active() or _in_forward_ad(tensors):
        # (no public API tells whether a functorch transform is active; this one is cheap)
        return "composite"
    if not ops.plain_eager(x):
        return "onnx" if torch.onnx.is_in_onnx_export() else "op"
    if _use_aten_for_tiny_call(x, weight, dropout_p, is_rms):
        return "aten"
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "eager" if grad_needed else "eager_no_grad"


def _is_dtensor(x: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


def _norm(
    x: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    residual: Optional[Tensor],
    prenorm: bool,
    dropout_p: float,
    training: bool,
):
    shape = as_normalized_shape(normalized_shape)
    check_input(x, shape)
    check_param("weight", weight, x, shape)
    check_param("bias", bias, x, shape)
    check_residual(residual, x)
    eps = check_eps(eps)
    dropout_p = check_dropout(dropout_p, training)
    path = route(x, residual, weight, bias, is_rms, dropout_p)
    if path == "dtensor":
        from normkit.distributed import dtensor_norm

        return dtensor_norm(_norm, x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "onnx":
        return paths.onnx_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "composite":
        return paths.composite_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "aten":
        return paths.aten_rms_norm(x, shape, weight, eps, residual, prenorm)

    n = math.prod(shape)
    rows = x.numel() // n
    x2 = x.reshape(rows, n).contiguous()
    r2 = None if residual is None else residual.reshape(rows, n).contiguous()
    w1 = None if weight is None else weight.reshape(n).contiguous()
    b1 = None if bias is None else bias.reshape(n).contiguous()
    backend = select_backend_name(x2, dropout_p)
    call = ops.NormCall(eps, is_rms, dropout_p, prenorm, backend)
    if path == "eager_no_grad":
        y2, s2 = ops.norm_forward_no_grad(x2, r2, w1, b1, call)
    else:
        y2, s2 = ops.norm_forward(x2, r2, w1, b1, call, traced=path == "op")
    y = _layout_like_torch(y2.view(x.shape), x, is_rms)
    return (y, _layout_like_torch(s2.view(x.shape), x, is_rms)) if prenorm else y


def _layout_like_torch(out: Tensor, x: Tensor, is_rms: bool) -> Tensor:
    """torch's ``rms_norm`` is a composite of elementwise ops, so its output keeps the input's
    memory format (channels_last, a transposed view); its ``layer_norm`` returns a contiguous
    tensor. The kernels write contiguous rows; an RMS output is copied to the input's layout."""
    if not is_rms or x.is_contiguous():
        return out
    like = torch.empty_like(x)  # preserve_format: x's strides when x is dense
    return out if like.is_contiguous() else like.copy_(out)


#: CPU float32 RMS-norm calls of at most this many elements (256 KiB: L2-resident,
#: launch-bound) run ATen's fused kernel (see below).
ATEN_TINY_MAX_ELEMENTS = 1 << 16


def _use_aten_for_tiny_call(x: Tensor, weight: Optional[Tensor], dropout_p: float, is_rms: bool) -> bool:
    """Tiny float32 CPU RMS-norm calls (a few rows: the inference and small-RNN case) cost more
    in the Python launch of any kernel (~10-20 µs) than in the arithmetic; ATen's own fused
    kernel does them in 2-5 µs with the same semantics (float32 statistics; the residual sum
    rounded once, as ``x + residual`` is). Only when no backend is forced, so the backend
    tests and ``use_backend`` still run exactly what they name, and never while tracing.
    Not layer norm: ATen's CPU layer-norm statistics lose accuracy on rows with a large mean
    (error 0.45 against normkit's 0.016 at a 1e5 offset), forward and backward."""
    return (
        is_rms
        and x.device.type == "cpu"
        and x.dtype is torch.float32
        and x.numel() <= ATEN_TINY_MAX_ELEMENTS
        and dropout_p == 0.0
        and (weight is None or weight.dtype is torch.float32)
        and forced_backend() is None
    )


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
):
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} \cdot g + b

    with the biased variance, statistics in float32 (float64 for float64 input).

    Args:
        input: tensor of shape ``(*, *normalized_shape)``, float16/bfloat16/float32/float64.
        normalized_shape: the trailing dims to normalize over (an int or a sequence of ints).
        weight, bias: gain ``g`` and bias ``b`` of shape ``normalized_shape`` (any floating
            dtype; the output keeps the input's dtype), or ``None``.
        eps: added to the variance, ``>= 0``.
        residual: optional tensor like ``input``; the norm is applied to ``dropout(input) + residual``
            in one fused pass.
        prenorm: also return ``s = dropout(input) + residual`` (for pre-LN residual streams).
        dropout_p: dropout rate in ``[0, 1)`` applied to ``input`` before the add, when
            ``training`` is true.
        training: apply dropout (as :func:`torch.nn.functional.dropout`'s ``training``).

    Returns:
        ``y`` with the input's shape and dtype, or ``(y, s)`` if ``prenorm``.
    """
    return _norm(input, normalized_shape, weight, bias, eps, False, residual, prenorm, dropout_p, training)


def rms_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
):
    r"""RMS normalization (Zhang & Sennrich 2019) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} \cdot g

    ``eps=None`` uses the machine epsilon of the compute dtype (float32 for float16/bfloat16
    input), as :func:`torch.nn.functional.rms_norm` does.
    Other arguments and the return value as :func:`layer_norm`.
    """
    if eps is None and isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES:
        eps = default_rms_eps(input.dtype)
    return _norm(input, normalized_shape, weight, None, eps, True, residual, prenorm, dropout_p, training)

