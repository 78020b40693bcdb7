r"""The public functional API: :func:`layer_norm` and :func:`rms_norm`.

Same first arguments as :func:`torch.nn.functional.layer_norm` / :func:`~torch.nn.functional.rms_norm`,
plus keyword-only fused options. Input is validated here, once; then the call is flattened to a
contiguous ``(rows, N)`` view and dispatched to a backend (:mod:`normkit.backends`). The exact
semantics are those of :mod:`normkit.reference`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from torch.autograd import forward_ad as _forward_ad

from normkit import _torch_private as private
from normkit import compile_policy, ops, paths
from normkit.backends import _forced, select_backend_name
from normkit.backends import ENV_VAR as _ENV_VAR
from normkit.backends import cpu as _cpu
from normkit.reference import default_rms_eps
from normkit.validation import (
    FLOAT_DTYPES,
    as_normalized_shape,
    check_dropout,
    check_bool,
    check_eps,
    check_input,
    check_param,
    check_residual,
    kernel_eps,
)

__all__ = ["layer_norm", "rms_norm", "route", "native_call"]

# os.environ.get costs ~1.4 us on a miss; the shim reads CPython's dict behind it (~50 ns)
_environ_get, _ENV_KEY = private.environ_getter(_ENV_VAR)

ShapeLike = Union[int, Sequence[int], torch.Size]

#: The paths a call can take, chosen by :func:`route`; each value says why it is taken.
ROUTES = {
    "dtensor": "a DTensor input: run the local shards, re-wrap with the input's placements",
    "onnx": "inside ONNX export: standard operators the exporter can write",
    "composite": "torch.func transform, forward-mode AD, an empty input or an eps the kernels do "
    "not take (negative, inf, NaN): the reference composite, whose torch ops every autograd mode "
    "understands and which computes what the formula gives for any eps, as torch does; and "
    "torch.compile where normkit.compile_policy decomposes (inductor fuses the torch ops)",
    "native": "a plain eager call on contiguous CPU tensors: the compiled kernels and their "
    "autograd node, all in C++ (normkit._C.norm), launched straight from here",
    "native_dim": "dim= (or layer_norm_2d) on CPU: normkit._C.norm_dim normalizes the middle dims "
    "in place of a permute (see native_norm_dim)",
    "op": "traced (torch.compile where normkit.compile_policy keeps the op, export, make_fx, "
    "jit.trace, a tensor subclass): the normkit::norm_fwd custom op",
    "eager": "eager with gradients: the autograd Function calling the backend",
    "eager_no_grad": "eager without gradients: the backend directly",
}


def _in_forward_ad(tensors) -> bool:
    """Whether any of ``tensors`` carries a forward-mode AD tangent."""
    if private.forward_ad_level() < 0:  # no dual level is open: the cheap common case
        return False
    return any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def route(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    is_rms: bool,
    dropout_p: float,
    shape: Optional[Tuple[int, ...]] = None,
    eps: float = 1e-5,
) -> str:
    """The one place that decides how a (validated) call runs: a key of :data:`ROUTES`.

    Order matters: a plain eager call on contiguous CPU tensors goes to the compiled kernels
    (:func:`native_call` says when; :func:`_norm` asks it before validating, since it accepts
    only valid calls, and the check is what such a call costs); a DTensor is unwrapped first
    (its local call is routed again); empty inputs
    take the composite; what traces gets the custom op, or standard ops under ONNX export, or
    under ``torch.compile`` what :func:`normkit.compile_policy.traced_route` says;
    ``torch.func`` transforms and forward AD need ops they can transform, so they take the
    reference composite (same semantics, plain torch ops); then the fast paths.
    """
    tensors = (x, residual, weight, bias)
    shape = tuple(x.shape[-1:] if weight is None else weight.shape) if shape is None else shape
    if native_call(x, shape, weight, bias, eps, residual, dropout_p, True):
        return "native"
    if type(x) is not Tensor and _is_dtensor(x):
        return "dtensor"
    if x.numel() == 0 or not kernel_eps(eps):
        return "composite"
    # ONNX exporters trace (jit tracing, or torch.export's Dynamo and dispatch modes), so the
    # export flag is asked only when something traces: it costs more than the rest of this
    # function on a plain eager call.
    if torch.compiler.is_compiling():
        return "onnx" if torch.onnx.is_in_onnx_export() else compile_policy.traced_route(x, dropout_p)
    if private.functorch_transforms_active() or _in_forward_ad(tensors):
        return "composite"
    if not ops.plain_eager(x):
        return "onnx" if torch.onnx.is_in_onnx_export() else "op"
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
    if _native_preconditions():  # route "native" (see native_call), checked and run in one C++ call
        out = _cpu.extension.try_norm(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p if training else 0.0)
        if out is not None:
            return out
    if isinstance(x, Tensor) and residual is None and not prenorm and not (dropout_p and training):
        if x.is_nested:
            return paths.nested_norm(_norm, x, normalized_shape, weight, bias, eps, is_rms, None, False, 0.0, training)
        if x.is_complex() and is_rms:
            return paths.complex_rms_norm(x, normalized_shape, weight, eps)
    shape = as_normalized_shape(normalized_shape)
    check_input(x, shape)
    check_param("weight", weight, x, shape)
    check_param("bias", bias, x, shape)
    check_residual(residual, x)
    check_bool("prenorm", prenorm)
    eps = check_eps(eps)
    dropout_p = check_dropout(dropout_p, training)
    path = route(x, residual, weight, bias, is_rms, dropout_p, shape, eps)
    if path == "native":  # valid now (eps made a float, a list shape a tuple, ...)
        return _native(x, shape, weight, bias, eps, is_rms, residual, prenorm)
    if path == "dtensor":
        from normkit.distributed import dtensor_norm

        return dtensor_norm(_norm, x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "onnx":
        return paths.onnx_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "composite":
        return paths.composite_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)

    n = math.prod(shape)
    rows = x.numel() // n
    layout = _rms_layout(x) if is_rms else None
    x_in = _GradInLayout.apply(x, layout) if layout is not None and path == "eager" else x
    x2 = x_in.reshape(rows, n).contiguous()
    r2 = None if residual is None else residual.reshape(rows, n).contiguous()
    w1 = None if weight is None else weight.reshape(n).contiguous()
    b1 = None if bias is None else bias.reshape(n).contiguous()
    backend = select_backend_name(x2, dropout_p)
    call = ops.NormCall(eps, is_rms, dropout_p, prenorm, backend)
    if path == "eager_no_grad":
        y2, s2 = ops.norm_forward_no_grad(x2, r2, w1, b1, call)
    else:
        y2, s2 = ops.norm_forward(x2, r2, w1, b1, call, traced=path == "op")
    y = _in_layout(y2.view(x.shape), layout)
    return (y, _in_layout(s2.view(x.shape), layout)) if prenorm else y


def _native(x, shape, weight, bias, eps, is_rms, residual, prenorm):
    n = shape if type(shape) is int else math.prod(shape)
    out = _cpu.extension.norm(x, n, weight, bias, eps, is_rms, residual)
    if not prenorm:
        return out[0]
    return out[0], (out[1] if residual is not None else x)


def _rms_layout(x: Tensor) -> Optional[Tuple[int, ...]]:
    """The strides torch's ``rms_norm`` gives its output and its input gradient for ``x``, or
    ``None`` when they are contiguous. torch's ``rms_norm`` is a composite of elementwise ops,
    so both keep a dense input's memory format (channels_last, a transposed view); its
    ``layer_norm`` returns contiguous tensors. The kernels write contiguous rows."""
    if x.is_contiguous():
        return None
    like = torch.empty_like(x)  # preserve_format: x's strides when x is dense
    return None if like.is_contiguous() else like.stride()


def _in_layout(t: Tensor, strides: Optional[Tuple[int, ...]]) -> Tensor:
    """``t`` copied into a tensor of ``strides`` (one pass), or ``t`` itself for ``None``."""
    if strides is None or t.stride() == strides:
        return t
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


class _GradInLayout(torch.autograd.Function):
    """The identity on ``x``; backward returns the gradient with ``strides``
    (:func:`_rms_layout`), as torch's composite ``rms_norm`` does."""

    @staticmethod
    def forward(ctx, x, strides):
        ctx.strides = strides
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _in_layout(g, ctx.strides), None


def _native_preconditions() -> bool:
    """What only Python knows about a "native" call: the compiled kernels are built, nothing
    compiles or transforms it (``torch.compile`` must see the custom op, ``torch.func`` and
    forward AD the reference composite), and no backend but ``"cpu"`` is forced. The rest
    (tensor types, dtypes, shapes, layout, eps, dropout, dispatch modes, jit tracing) is
    checked in C++ by ``normkit._C.try_norm`` / ``accepts``."""
    return (
        _cpu.extension is not None
        and not torch.compiler.is_compiling()
        and private.forward_ad_level() < 0
        and not private.functorch_transforms_active()
        and (_forced.get() or _environ_get(_ENV_KEY)) in (None, "cpu", b"cpu")
    )


def native_norm_dim(x: Tensor, start: int, k: int, weight, bias, eps: float, is_rms: bool) -> Optional[Tensor]:
    """The ``"native_dim"`` route: a norm over dims ``[start, start + k)`` of a (validated) CPU
    input by ``normkit._C.norm_dim``, which reads the strided columns where they are instead of
    moving them last (a permute and a copy there and back); ``None`` when the call is not one it
    serves (then the caller moves the dims). Same preconditions as the ``"native"`` route; the
    input is made contiguous if it is not."""
    if not (
        _native_preconditions()
        and kernel_eps(eps)
        and type(x) is Tensor
        and x.is_cpu
        and x.dtype in _cpu.DTYPES
        and all(p is None or (p.is_cpu and p.dtype in FLOAT_DTYPES) for p in (weight, bias))
        and not torch.jit.is_tracing()
        and not private.dispatch_mode_active()
    ):
        return None
    return _cpu.extension.norm_dim(x, start, k, weight, bias, float(eps), bool(is_rms))


def native_call(x, normalized_shape, weight, bias, eps, residual, dropout_p, training) -> bool:
    """Whether a call takes the ``"native"`` route (the compiled CPU kernels with their C++
    autograd node, ``normkit._C.norm``): :func:`_native_preconditions`, then the C++ checks.
    They accept only valid calls: anything else is validated, and refused with a clear error,
    on the general path."""
    if _cpu.extension is None and type(x) is Tensor and x.is_cpu:
        _cpu.warn_once_if_missing()
    return _native_preconditions() and _cpu.extension.accepts(
        x, normalized_shape, weight, bias, eps, residual, dropout_p if training else 0.0
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
    zero_centered_weight: bool = False,
    residual_in_fp32: bool = False,
    x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    bias1: Optional[Tensor] = None,
    rowscale: Optional[Tensor] = None,
    return_dropout_mask: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
    residual_out: Optional[Tensor] = None,
    dim: Optional[int] = None,
):
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} \cdot g + b,
        \qquad g = \begin{cases} 1 + w & \text{zero\_centered\_weight} \\ w & \text{else} \end{cases}

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
        zero_centered_weight: scale by ``1 + weight`` instead of ``weight`` (Gemma's gain,
            flash-attn's ``zero_centered_weight``, Liger's ``offset=1.0``): a weight initialized
            to zeros is the identity gain, and weight decay pulls the gain towards 1, not 0.
            The gain is ``1.0 + weight.float()`` (in float64 for float64 input), as Gemma
            computes it; gradients reach ``weight`` through that sum. Needs a ``weight``.
            With ``weight1`` the second gain is ``1 + weight1`` too (as in flash-attn).

    The options below are flash-attn's (``layer_norm_fn``), with its semantics. They are
    composed from torch ops around normkit's norm (:mod:`normkit.fused_options`), so they run
    on every backend; where flash-attn makes one pass they add passes (noted per option).

    Args:
        residual_in_fp32: keep the residual stream in float32: the sum ``s`` is formed in
            float32 and stored (the prenorm output) in float32 (float64 stays float64) even for
            16-bit ``input``, and the norm normalizes that float32 sum, not a 16-bit rounding
            of it. It also admits a ``residual`` of another dtype than ``input`` (say a float32
            stream beside bfloat16 branches; without this flag that raises): the sum is formed
            in float32 and stored in the residual's dtype, at least float32. (flash-attn
            stores it in a given residual's dtype even when that is 16-bit.)
        x1: a second branch output of ``input``'s shape and dtype, added into the sum with its
            own dropout mask: ``s = dropout(input) + dropout(x1) + residual``.
        weight1, bias1: a second gain and bias (parallel blocks, GPT-J / PaLM) applied to the
            same normalized ``s``: ``y1 = s_hat * weight1 + bias1``; ``weight1`` needs
            ``weight``. Two norm calls over the stored ``s`` (one in flash-attn).
        rowscale: a per-row scale of shape ``input.shape`` without the normalized dims,
            applied to ``input`` before dropout and the add (``x * rowscale[..., None]``);
            not with ``x1`` (flash-attn refuses the pair too).
        return_dropout_mask: also return the boolean keep masks of ``input`` and ``x1``
            (``None`` where no dropout ran or there is no ``x1``). Dropout is then drawn
            here from torch's default generator and applied in float32 before a norm call
            without dropout, so the masks are exactly the ones used.
        out_dtype: the dtype of ``y`` (and ``y1``), default the input's: ``y`` is computed in
            float32 (float64 for float64 input) and rounded once to ``out_dtype``. For
            float32 input that is a cast of the kernel's result; for 16-bit input the norm
            runs on a float32 copy of the (rounded) sum, one extra pass.
        out, residual_out: buffers of the result's shape, dtype and device, returned. Without
            gradients on the compiled CPU kernels, ``out`` (with or without ``residual``, no
            other option) is written by the kernel itself; otherwise ``y`` and the prenorm sum
            are computed, then copied into them (``copy_``, an extra pass).
            ``residual_out`` needs ``prenorm=True``. A buffer may not share memory with an
            input or with the other buffer (:class:`~normkit.errors.NormOverlapError`): the
            copies would overwrite what the call returns.
        dim: the first normalized dim (default ``input.dim() - len(normalized_shape)``): with
            ``x`` of shape ``(N, C, H, W)``, ``layer_norm(x, (C,), w, b, dim=1)`` normalizes
            over channels. The dims are moved last (``movedim``), normalized (which copies the
            input to that layout today) and moved back: the outputs are views in the input's
            dim order.

    Returns:
        ``y`` with the input's shape and dtype, or ``(y, s)`` if ``prenorm``. With the options,
        flash-attn's tuple: ``y``, then ``y1`` (with ``weight1``), ``s`` (with ``prenorm``),
        ``mask, mask1`` (with ``return_dropout_mask``).
    """
    if zero_centered_weight is not False:  # imported here: the default path pays nothing
        from normkit.fused_options import zero_centered_gains

        weight, weight1 = zero_centered_gains(zero_centered_weight, input, weight, weight1)
    if not (x1 is weight1 is bias1 is rowscale is out_dtype is out is residual_out is dim is None) or (
        residual_in_fp32 is not False or return_dropout_mask is not False
    ):
        from normkit.fused_options import FusedOptions, fused_norm

        options = FusedOptions(residual_in_fp32, x1, weight1, bias1, rowscale, return_dropout_mask, out_dtype, out, residual_out, dim)
        return fused_norm(input, normalized_shape, weight, bias, eps, False, residual, prenorm, dropout_p, training, options)
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
    zero_centered_weight: bool = False,
    casting_mode: str = "gemma",
    bias: Optional[Tensor] = None,
    residual_in_fp32: bool = False,
    x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    bias1: Optional[Tensor] = None,
    rowscale: Optional[Tensor] = None,
    return_dropout_mask: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
    residual_out: Optional[Tensor] = None,
    dim: Optional[int] = None,
):
    r"""RMS normalization (Zhang & Sennrich 2019) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} \cdot g

    ``eps=None`` uses the machine epsilon of the compute dtype (float32 for float16/bfloat16
    input), as :func:`torch.nn.functional.rms_norm` does.

    ``casting_mode`` says where a float16/bfloat16 result is rounded (Liger-Kernel's names;
    for float32 and float64 input the three modes compute the same thing):

    - ``"gemma"`` (the default, and normkit's semantics since 0.1; Hugging Face
      ``GemmaRMSNorm``, ``torch.nn.functional.rms_norm`` on CPU): statistics, normalization and
      gain in float32, the output rounded once, ``(x_hat * g.float()).to(dtype)``.
    - ``"llama"`` (Hugging Face ``LlamaRMSNorm``, Liger's default): ``x_hat`` is rounded to the
      input dtype, then multiplied by the gain, ``(g * x_hat.to(dtype)).to(dtype)``. The
      kernel runs without the gain and the product is a second elementwise pass. With a gain
      of the input's dtype this is Hugging Face's formula; with a float32 gain Hugging Face
      returns float32, normkit rounds the product to the input dtype (as Liger does).
    - ``"none"``: Liger computes everything in the input dtype. normkit never takes statistics
      in 16 bits (a bfloat16 sum of squares keeps 8 bits), so ``"none"`` is accepted for
      Liger compatibility and computes exactly as ``"gemma"``.

    ``zero_centered_weight=True`` (Gemma) uses the gain ``g = 1 + weight``, formed in float32
    in every mode.

    ``bias`` (keyword-only; flash-attn's ``rms_norm_fn`` has one) shifts the output,
    ``y = x_hat * g + bias``, added to the norm's float32 (float64) result and rounded once
    (for 16-bit input the norm then runs on a float32 copy of the sum: an extra pass). With
    ``casting_mode="llama"`` the bias is added after the gain, ``(g * x_hat.to(dtype) + bias)``,
    then rounded. ``residual_in_fp32``, ``x1``, ``weight1``/``bias1``, ``rowscale``,
    ``return_dropout_mask``, ``out_dtype``, ``out``/``residual_out`` and ``dim`` as in
    :func:`layer_norm` (``bias1`` is the RMS bias of the second branch). Other arguments and
    the return value as :func:`layer_norm`.
    """
    if eps is None and isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES:
        eps = default_rms_eps(input.dtype)
    if zero_centered_weight is not False:  # imported here: the default path pays nothing
        from normkit.fused_options import zero_centered_gains

        weight, weight1 = zero_centered_gains(zero_centered_weight, input, weight, weight1)
    if not (bias is x1 is weight1 is bias1 is rowscale is out_dtype is out is residual_out is dim is None) or (
        residual_in_fp32 is not False or return_dropout_mask is not False
    ):
        from normkit.fused_options import FusedOptions, fused_norm
        from normkit.validation import check_casting_mode

        options = FusedOptions(residual_in_fp32, x1, weight1, bias1, rowscale, return_dropout_mask, out_dtype, out, residual_out, dim)
        mode = check_casting_mode(casting_mode)
        return fused_norm(input, normalized_shape, weight, bias, eps, True, residual, prenorm, dropout_p, training, options, mode)
    if casting_mode != "gemma":
        from normkit.validation import check_casting_mode

        if check_casting_mode(casting_mode) == "llama" and weight is not None:
            shape = as_normalized_shape(normalized_shape)
            check_input(input, shape)
            check_param("weight", weight, input, shape)  # _norm below never sees the weight
            out = _norm(input, shape, None, None, eps, True, residual, prenorm, dropout_p, training)
            y = (weight * (out[0] if prenorm else out)).to(input.dtype)
            return (y, out[1]) if prenorm else y
    return _norm(input, normalized_shape, weight, None, eps, True, residual, prenorm, dropout_p, training)

