r"""The public functional API: :func:`layer_norm` and :func:`rms_norm`.

Same first arguments as :func:`torch.nn.functional.layer_norm` / :func:`~torch.nn.functional.rms_norm`,
plus keyword-only fused options. Input is validated here, once; then the call is flattened to a
contiguous ``(rows, N)`` view and dispatched to a backend (:mod:`normkit.backends`). The exact
semantics are those of :mod:`normkit.reference`.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from normkit import ops
from normkit.backends import forced_backend, select_backend_name
from normkit.reference import default_rms_eps
from normkit.reference import rms_norm as _reference_rms_norm

__all__ = ["layer_norm", "rms_norm"]

ShapeLike = Union[int, Sequence[int], torch.Size]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _as_shape(normalized_shape: ShapeLike) -> Tuple[int, ...]:
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        shape: Tuple[int, ...] = (int(normalized_shape),)
    elif isinstance(normalized_shape, (Sequence, torch.Size)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in normalized_shape
    ):
        shape = tuple(int(d) for d in normalized_shape)
    else:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        )
    if len(shape) == 0:
        raise ValueError("normalized_shape must name at least one dimension, got ()")
    if any(d <= 0 for d in shape):
        raise ValueError(f"normalized_shape must have positive sizes (an empty normalized dimension cannot be normalized), got {list(shape)}")
    return shape


def _check_input(x: Tensor, shape: Tuple[int, ...]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"input must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(x.shape)}"
        )


def _check_param(name: str, p: Optional[Tensor], x: Tensor, shape: Tuple[int, ...]) -> None:
    if p is None:
        return
    if not isinstance(p, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    if tuple(p.shape) != shape:
        raise ValueError(
            f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
            f"{list(p.shape)} and normalized_shape = {list(shape)}"
        )
    if p.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype, got {p.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but input is on {x.device}; move them to one device")


def _check_residual(residual: Optional[Tensor], x: Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have the input's shape {list(x.shape)}, got {list(residual.shape)}"
        )
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the input's dtype {x.dtype}, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but input is on {x.device}")


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a real number, got {eps!r}")
    eps = float(eps)
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_dropout(dropout_p: float, training: bool) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number, got {dropout_p!r}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p) if training else 0.0


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
    shape = _as_shape(normalized_shape)
    _check_input(x, shape)
    _check_param("weight", weight, x, shape)
    _check_param("bias", bias, x, shape)
    _check_residual(residual, x)
    eps = _check_eps(eps)
    dropout_p = _check_dropout(dropout_p, training)
    if torch.onnx.is_in_onnx_export():
        # The custom op is opaque to ONNX exporters (both the TorchScript and the dynamo one set
        # this flag): export standard ops instead, see _onnx_norm.
        return _onnx_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)

    n = math.prod(shape)
    if _use_aten_for_tiny_call(x, weight, dropout_p, is_rms):
        return _aten_rms_norm(x, shape, weight, eps, residual, prenorm)
    rows = x.numel() // n
    if rows == 0:
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (y, torch.empty_like(y)) if prenorm else y

    x2 = x.reshape(rows, n).contiguous()
    r2 = None if residual is None else residual.reshape(rows, n).contiguous()
    w1 = None if weight is None else weight.reshape(n).contiguous()
    b1 = None if bias is None else bias.reshape(n).contiguous()
    backend = select_backend_name(x2, dropout_p)

    grad_needed = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, weight, bias)
    )
    run = ops.norm_forward if grad_needed or not ops.plain_eager(x2) else ops.norm_forward_no_grad
    y2, s2 = run(x2, r2, w1, b1, eps, is_rms, dropout_p, prenorm, backend)
    y = y2.view(x.shape)
    return (y, s2.view(x.shape)) if prenorm else y


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
        and ops.plain_eager(x)
        and forced_backend() is None
    )


def _aten_rms_norm(x, shape, weight, eps, residual, prenorm):
    s = x if residual is None else x + residual
    y = torch.nn.functional.rms_norm(s, shape, weight, eps)
    return (y, s) if prenorm else y


def _onnx_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p):
    """The op as ONNX exporters see it: the fused residual add (+ dropout) as separate ops, then
    ``F.layer_norm`` (exported as ``LayerNormalization``, opset >= 17) or, for RMS norm,
    ``F.rms_norm`` (the dynamo exporter writes ``RMSNormalization`` at opset >= 23, else a
    ``Pow/ReduceMean/Sqrt`` graph). The TorchScript exporter has no ``aten::rms_norm``, so under
    it (``torch.jit.is_tracing()``) RMS norm is the reference composite of plain ops."""
    s = torch.nn.functional.dropout(x, dropout_p, True) if dropout_p > 0.0 else x
    if residual is not None:
        s = s + residual
    w = None if weight is None else weight.to(x.dtype)
    if not is_rms:
        y = torch.nn.functional.layer_norm(s, shape, w, None if bias is None else bias.to(x.dtype), eps)
    elif torch.jit.is_tracing():
        y = _reference_rms_norm(s, shape, w, eps)
    else:
        y = torch.nn.functional.rms_norm(s, shape, w, eps)
    return (y, s) if prenorm else y


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
    if eps is None and isinstance(input, Tensor) and input.dtype in _FLOAT_DTYPES:
        eps = default_rms_eps(input.dtype)
    return _norm(input, normalized_shape, weight, None, eps, True, residual, prenorm, dropout_p, training)

