r"""Where a norm call goes: :func:`route`, the one function that chooses the path of every call
(plain or with fused options), and the code that runs the path it chose.

:func:`normkit.layer_norm` / :func:`normkit.rms_norm` hand a call here: :func:`norm` for a plain
call (``residual``, ``prenorm``, ``dropout_p`` at most), :func:`fused_norm` for one with
flash-attn's options (:mod:`normkit.fused_options` validates those and plans the dtypes). Both
ask :func:`route` once, after validation, and run the answer: the compiled C++ call
(``native``, ``native_dim``), the kernel contract through :mod:`normkit.ops` (``op``,
``eager``, ``eager_no_grad``), or a path without normkit's kernels (:mod:`normkit.paths`,
:mod:`normkit.distributed`). A plain call asks the ``native`` question first, in C++ and before
validation (:func:`_native_preconditions` + ``normkit._C.try_norm``), since that check is all
such a call may cost and it accepts only valid calls; so does a call with fused options and no
gradients (``normkit._C.try_fused``: the kernel contract's fused forward, as ``eager_no_grad``
would run it).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from normkit import _torch_private as private
from normkit import compile_policy, ops, paths
from normkit.backends import ENV_VAR as _ENV_VAR
from normkit.backends import _forced, select_backend_name
from normkit.backends import cpu as _cpu
from normkit.contract import KernelSpec
from normkit.distributed import dtensor_norm
from normkit.errors import UnsupportedModeError
from normkit.fused_options import FusedOptions, plan_call
from normkit.validation import (
    FLOAT_DTYPES,
    as_normalized_shape,
    check_bool,
    check_dropout,
    check_eps,
    check_input,
    check_param,
    check_residual,
    kernel_eps,
)

__all__ = ["ROUTES", "route", "native_call", "native_norm_dim", "norm", "fused_norm"]

# os.environ.get costs ~1.4 us on a miss; the shim reads CPython's dict behind it (~50 ns)
_environ_get, _ENV_KEY = private.environ_getter(_ENV_VAR)

#: The paths a call can take, chosen by :func:`route`; each value says why it is taken.
ROUTES = {
    "native": "a plain eager call on contiguous CPU tensors: the compiled kernels and their "
    "autograd node, all in C++ (normkit._C.norm), launched straight from here; with dropout "
    "only without gradients, then the fused kernel, its seed drawn in C++ (normkit._C.try_norm); "
    "a call with fused options on such tensors without gradients, asked first in C++ "
    "(normkit._C.try_fused)",
    "native_dim": "dim= (or layer_norm_2d) on CPU without other options: normkit._C.norm_dim "
    "normalizes the middle dims in place of a permute (see native_norm_dim)",
    "dtensor": "a DTensor input: run the local shards, re-wrap with the input's placements",
    "onnx": "inside ONNX export: standard operators the exporter can write",
    "composite": "torch.func transform, forward-mode AD, an empty input, an eps the kernels do "
    "not take (negative, inf, NaN), a rowscale that requires grad, or torch.compile where "
    "normkit.compile_policy decomposes (CPU, no dropout): the reference composite, whose torch "
    "ops every autograd mode understands, inductor fuses, and which computes what the formula "
    "gives for any eps, as torch does",
    "op": "traced (torch.compile where compile_policy keeps the op, export, make_fx, jit.trace, "
    "a tensor subclass): the normkit::norm_fwd custom op",
    "eager": "eager with gradients: the autograd Function calling the backend's kernels",
    "eager_no_grad": "eager without gradients: the backend's kernels directly (out= buffers "
    "written by the kernel)",
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
    *,
    others: Tuple[Optional[Tensor], ...] = (),
    options: bool = False,
    moved_dims: bool = False,
) -> str:
    """The one place that decides how a (validated) call runs: a key of :data:`ROUTES`.

    ``others`` are the option tensors (``x1``, ``rowscale``, ``weight1``, ``bias1``), ``options``
    says the call uses a fused option beyond ``residual``/``prenorm``/``dropout_p`` (then the
    plain ``native`` call cannot serve it), ``moved_dims`` that ``dim=`` names other than the
    trailing dims. Order matters: a plain eager call on contiguous CPU tensors goes to the
    compiled call (:func:`native_call`); a DTensor is unwrapped first (its local call is routed
    again); empty inputs take the composite; what traces gets the custom op (or, under
    ``torch.compile``, the composite where :mod:`normkit.compile_policy` measured it faster),
    or standard ops under ONNX export; ``torch.func`` transforms and forward AD need ops they can transform, so
    they take the reference composite (same semantics, plain torch ops); then the kernels.
    """
    tensors = (x, residual, weight, bias) + tuple(others)
    shape = tuple(x.shape[-1:] if weight is None else weight.shape) if shape is None else shape
    plain = not options and not moved_dims
    if plain and native_call(x, shape, weight, bias, eps, residual, dropout_p, True):
        return "native"
    if type(x) is not Tensor and _is_dtensor(x):
        return "dtensor"
    rowscale_grad = options and len(others) > 1 and others[1] is not None and others[1].requires_grad
    if x.numel() == 0 or not kernel_eps(eps) or rowscale_grad:
        return "composite"
    # ONNX exporters trace (jit tracing, or torch.export's Dynamo and dispatch modes), so the
    # export flag is asked only when something traces: it costs more than the rest of this
    # function on a plain eager call.
    if torch.compiler.is_compiling():  # Dynamo: the custom op or torch ops inductor fuses, by measurement
        return "onnx" if torch.onnx.is_in_onnx_export() else compile_policy.traced_route(x, dropout_p)
    if private.functorch_transforms_active() or _in_forward_ad(tensors):
        return "composite"
    if not ops.plain_eager(x):
        return "onnx" if torch.onnx.is_in_onnx_export() else "op"
    if moved_dims and not options and residual is None and dropout_p == 0.0 and native_dim_call(x, weight, bias, eps):
        return "native_dim"
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return "eager" if grad_needed else "eager_no_grad"


def _is_dtensor(x: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(x, DTensor)


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


def native_dim_call(x: Tensor, weight, bias, eps: float) -> bool:
    """Whether ``normkit._C.norm_dim`` serves a (validated) ``dim=`` call: the ``native``
    preconditions, a CPU input of a kernel dtype, CPU parameters, an eps the kernels take."""
    return (
        _native_preconditions()
        and kernel_eps(eps)
        and type(x) is Tensor
        and x.is_cpu
        and x.dtype in _cpu.DTYPES
        and all(p is None or (p.is_cpu and p.dtype in FLOAT_DTYPES) for p in (weight, bias))
        and not torch.jit.is_tracing()
        and not private.dispatch_mode_active()
    )


def native_norm_dim(x: Tensor, start: int, k: int, weight, bias, eps: float, is_rms: bool) -> Tensor:
    """The ``"native_dim"`` route: a norm over dims ``[start, start + k)`` of a (validated) CPU
    input by ``normkit._C.norm_dim``, which reads the strided columns where they are instead of
    moving them last (a permute and a copy there and back)."""
    return _cpu.extension.norm_dim(x, start, k, weight, bias, float(eps), bool(is_rms))


# --- plain calls ---------------------------------------------------------------------------------


def norm(
    x: Tensor,
    normalized_shape,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    residual: Optional[Tensor],
    prenorm: bool,
    dropout_p: float,
    training: bool,
    out: Optional[Tensor] = None,
    residual_out: Optional[Tensor] = None,
):
    """A plain call: ``y``, or ``(y, s)`` with ``prenorm``; ``out`` / ``residual_out`` receive
    them (:func:`fused_norm` serves the buffers the native call does not take)."""
    if _native_preconditions():  # route "native" (see native_call), checked and run in one C++ call
        res = _cpu.extension.try_norm(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm,
                                      dropout_p if training else 0.0, out, residual_out)
        if res is not None:
            return res
    if out is not None or residual_out is not None:
        return fused_norm(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training,
                          FusedOptions(out=out, residual_out=residual_out))
    # Two inputs the kernels do not take, handed over before validation (which refuses them
    # for the fused options): each nested component runs here again; complex RMS norm is torch's.
    if isinstance(x, Tensor) and residual is None and not prenorm and not (dropout_p and training):
        if x.is_nested:
            return paths.nested_norm(norm, x, normalized_shape, weight, bias, eps, is_rms, None, False, 0.0, training)
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
        return _native(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
    if path == "dtensor":
        return dtensor_norm(norm, x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p)
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
    spec = KernelSpec(is_rms, eps, dropout_p, x.dtype, x.dtype, store_sum=prenorm)
    res = ops.run(path, x2, r2, None, None, w1, b1, None, None, ops.KernelCall(spec, select_backend_name(x2, dropout_p)))
    y = _in_layout(res.y.view(x.shape), layout)
    if not prenorm:
        return y
    return y, (x if res.s is x2 else _in_layout(res.s.view(x.shape), layout))


def _native(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p=0.0):
    if dropout_p > 0.0:  # no gradients (route): the C++ call that draws the seed and runs the fused kernel
        res = _cpu.extension.try_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, None, None)
        if res is None:  # route asked _C.accepts, which applies try_norm's rule: not reached
            raise RuntimeError("normkit internal error: the native route refused a dropout call it accepted")
        return res
    n = shape if type(shape) is int else math.prod(shape)
    out = _cpu.extension.norm(x, n, weight, bias, eps, is_rms, residual, prenorm)
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


# --- calls with fused options --------------------------------------------------------------------


def fused_norm(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training, o: FusedOptions, casting_mode: str = "gemma"):
    """A call with flash-attn's options (:mod:`normkit.fused_options`): validated and planned
    there, routed here, run in one kernel call. Returns flash-attn's tuple: ``y``, then ``y1``
    (with ``weight1``), ``s`` (with ``prenorm``), ``mask, mask1`` (with
    ``return_dropout_mask``)."""
    if _native_preconditions():  # route "native" of an option call, checked and run in one C++ call
        res = _cpu.extension.try_fused(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm,
                                       dropout_p if training else 0.0, o.residual_in_fp32, o.x1, o.weight1, o.bias1,
                                       o.rowscale, o.return_dropout_mask, o.out_dtype, o.out, o.out1, o.residual_out,
                                       o.dim, is_rms and casting_mode == "llama")
        if res is not None:
            return res
    plan = plan_call(x, normalized_shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p, training, o)
    llama = is_rms and casting_mode == "llama"
    k, nd = len(plan.shape), x.dim()
    moved = plan.start != nd - k
    others = (o.x1, o.rowscale, o.weight1, o.bias1)
    uses_options = (
        llama or o.x1 is not None or o.rowscale is not None or o.weight1 is not None or o.return_dropout_mask
        or plan.sum_dtype != x.dtype or plan.out_dtype != x.dtype or (is_rms and bias is not None)
        or o.out1 is not None or o.residual_out is not None or (o.out is not None and not moved)
    )
    path = route(x, residual, weight, bias, is_rms, plan.dropout_p, plan.shape, plan.eps, others=others, options=uses_options, moved_dims=moved)
    if path == "native":  # a plain call after all (dim= naming the trailing dims, say), validated
        return _native(x, plan.shape, weight, bias, plan.eps, is_rms, residual, prenorm, plan.dropout_p)
    if path == "native_dim":  # no residual, dropout or buffer but out= (route): s is x itself
        y = native_norm_dim(x, plan.start, k, weight, bias, plan.eps, is_rms)  # no permute, no copy
        y = o.out.copy_(y) if o.out is not None else y
        return (y, x) if prenorm else y
    if path == "dtensor":
        raise UnsupportedModeError(
            "the fused options (x1, weight1, rowscale, out=, dim=, out_dtype, ...) are not implemented for DTensor "
            "inputs; call normkit.layer_norm / rms_norm on the DTensor without them"
        )
    src_dims, dst_dims = tuple(range(plan.start, plan.start + k)), tuple(range(nd - k, nd))

    def to_last(t):
        return t if t is None or not moved else t.movedim(src_dims, dst_dims)

    def back(t):
        return t if t is None or not moved else t.movedim(dst_dims, src_dims)

    n = math.prod(plan.shape)
    xm = to_last(x)
    rows = xm.numel() // n if n else 0

    def flat(t):
        return None if t is None else to_last(t).reshape(rows, n).contiguous()

    def param(p):
        return None if p is None else p.reshape(n).contiguous()

    kernel_w, kernel_b = (None, None) if llama else (weight, bias)
    kernel_w1, kernel_b1 = (None, None) if llama else (o.weight1, o.bias1)
    has_y1 = o.weight1 is not None
    x2 = flat(x)
    spec = KernelSpec(
        is_rms, plan.eps, plan.dropout_p, plan.sum_dtype,
        x.dtype if llama else plan.out_dtype,
        store_sum=prenorm, store_mask=o.return_dropout_mask,
    )
    rowscale = None if o.rowscale is None else o.rowscale.reshape(rows).contiguous()
    buffers = [None, None, None]  # out, out1, residual_out as handed to the kernel
    if path in ("composite", "onnx"):
        res = paths.fused_composite(x2, flat(residual), flat(o.x1), rowscale, param(kernel_w), param(kernel_b),
                                    param(kernel_w1), param(kernel_b1), spec)
    else:
        # out= / out1= / residual_out= are written by the kernel without autograd when they are
        # contiguous and in the kernel's own layout; otherwise the result is copied into them
        # below (with autograd: a differentiable copy)
        direct = path == "eager_no_grad" and not moved and not llama
        buffers = [b.view(rows, n) if direct and b is not None and b.is_contiguous() and type(b) is Tensor else None
                   for b in (o.out, o.out1, o.residual_out)]
        backend = select_backend_name(x2, plan.dropout_p)
        res = ops.run(path, x2, flat(residual), flat(o.x1), rowscale, param(kernel_w), param(kernel_b), param(kernel_w1),
                      param(kernel_b1), ops.KernelCall(spec, backend), *buffers)
    shape_last = xm.shape
    y = res.y.view(shape_last)
    y1 = None if res.y1 is None else res.y1.view(shape_last)
    if llama:  # the kernel ran without gains: y is x_hat in the input dtype
        y, y1 = _llama_affine(y, weight, bias, x.dtype), (_llama_affine(y, o.weight1, o.bias1, x.dtype) if has_y1 else None)
        if plan.out_dtype != x.dtype:
            y, y1 = y.to(plan.out_dtype), (None if y1 is None else y1.to(plan.out_dtype))
    y, y1 = back(y), back(y1)
    if o.out is not None:  # the kernel wrote it, or it is filled here
        y = o.out if buffers[0] is not None else o.out.copy_(y)
    if o.out1 is not None:
        y1 = o.out1 if buffers[1] is not None else o.out1.copy_(y1)
    results: List[Optional[Tensor]] = [y]
    if has_y1:
        results.append(y1)
    if prenorm:
        s = x if res.s is x2 else back(res.s.view(shape_last))
        if o.residual_out is not None:
            s = o.residual_out if buffers[2] is not None else o.residual_out.copy_(s)
        results.append(s)
    if o.return_dropout_mask:
        results += [back(_mask_view(res.mask, shape_last)), back(_mask_view(res.mask1, shape_last))]
    return results[0] if len(results) == 1 else tuple(results)


def _mask_view(mask, shape):
    return None if mask is None else mask.view(shape)


def _llama_affine(x_hat: Tensor, w, b, dtype: torch.dtype) -> Tensor:
    """``casting_mode="llama"``: ``x_hat`` (the kernel's output without a gain, already in the
    input dtype) times the gain, plus the bias, rounded to the input dtype, as
    :func:`normkit.rms_norm` documents."""
    y = x_hat
    if w is not None:
        y = w * y
    if b is not None:
        y = y + b
    return y.to(dtype)
