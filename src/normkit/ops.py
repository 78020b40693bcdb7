"""The normkit op: the kernel contract (:mod:`normkit.contract`) with autograd, once.

One ``torch.library`` custom op for forward and one for backward (``normkit::norm_fwd`` /
``normkit::norm_bwd``), naming the backend by a string argument, so ``torch.compile`` sees one
opaque node with a fake (meta) implementation whatever the backend; and one eager
``autograd.Function`` (:class:`_EagerNorm`) running the same forward and backward bodies,
because ``torch.library``'s dispatch and autograd wrapper cost more than the kernels on all but
large inputs. Both share one backward (:func:`_input_grads`): the backend's backward kernel,
or under ``create_graph=True`` (and for a vmap batch of gradients) the differentiable one,
:func:`normkit.reference.fused_backward`. Every option of a call (residual, ``x1``,
``rowscale``, dropout, ``weight1``/``bias1``, the sum's and the output's dtypes) travels in
the same two ops; the ops work on contiguous ``(M, N)`` tensors, validated and reshaped by
:mod:`normkit.dispatch`.

Dropout seeds are drawn *inside* the forward op and returned as a tensor, so a compiled graph
draws a fresh seed every call instead of baking one in, and backward regenerates the masks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from normkit import _torch_private as private
from normkit import reference
from normkit.backends import get_backend
from normkit.backends.base import into_buffers
from normkit.contract import ForwardOut, GradNeeds, GradsOut, KernelSpec, sum_is_input
from normkit.reference import compute_dtype

__all__ = ["KernelCall", "run", "plain_eager"]

#: The op's tensor inputs, in its schema's order (their gradients come back in this order).
INPUTS = ("x", "residual", "x1", "rowscale", "weight", "bias", "weight1", "bias1")


@dataclass(frozen=True)
class KernelCall:
    """The non-tensor arguments of one kernel call: the :class:`KernelSpec` and the name of
    the backend that runs it (chosen by :mod:`normkit.dispatch`)."""

    spec: KernelSpec
    backend: str

    def op_args(self) -> tuple:
        """The custom op's scalar arguments, in its schema's order."""
        s = self.spec
        return (s.is_rms, s.eps, s.dropout_p, s.sum_dtype, s.out_dtype, s.store_sum, s.store_mask, self.backend)


def _acc(x: Tensor, spec: KernelSpec) -> torch.dtype:
    return compute_dtype(torch.promote_types(x.dtype, spec.sum_dtype))


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def kernel_backend(name: str, x: Tensor, spec: KernelSpec):
    """The backend that runs a call: ``name``'s, unless its ``fused_supports`` refuses the call's
    dtypes (say a float64 sum on Triton), then the reference. Forward and backward ask it with
    the same input and spec, so both run the same backend (and dropout stream)."""
    backend = get_backend(name)
    return backend if backend.fused_supports(x, spec) else get_backend("reference")


def _forward_impl(x, residual, x1, rowscale, weight, bias, weight1, bias1, call: KernelCall):
    """The forward op's body: the backend's forward, padded to the op's fixed schema
    ``(y, y1, s, mean, rstd, mask, mask1, seed)`` (empty tensors for absent outputs; ``s`` is
    empty when it is ``x`` itself: an op may not return an alias of its input)."""
    spec = call.spec
    seed = reference.draw_dropout_seed(spec.dropout_p)
    res = kernel_backend(call.backend, x, spec).fused_forward(x, residual, x1, rowscale, weight, bias, weight1, bias1, spec, seed)
    return _padded(res, x, spec, seed)


def _padded(res: ForwardOut, x: Tensor, spec: KernelSpec, seed: int):
    def some(t, dtype=None):
        return _empty(x, dtype) if t is None else t

    s = None if res.s is x else res.s
    return (
        res.y,
        some(res.y1, spec.out_dtype),
        some(s, spec.sum_dtype),
        some(res.mean, _acc(x, spec)),
        res.rstd,
        some(res.mask, torch.bool),
        some(res.mask1, torch.bool),
        torch.tensor(seed, dtype=torch.int64),
    )


@torch.library.custom_op("normkit::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    x1: Optional[Tensor],
    rowscale: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    weight1: Optional[Tensor],
    bias1: Optional[Tensor],
    is_rms: bool,
    eps: float,
    dropout_p: float,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    store_sum: bool,
    store_mask: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    call = KernelCall(KernelSpec(is_rms, eps, dropout_p, sum_dtype, out_dtype, store_sum, store_mask), backend)
    return _forward_impl(x, residual, x1, rowscale, weight, bias, weight1, bias1, call)


@_norm_fwd.register_fake
def _norm_fwd_fake(x, residual, x1, rowscale, weight, bias, weight1, bias1, is_rms, eps, dropout_p, sum_dtype, out_dtype, store_sum, store_mask, backend):
    spec = KernelSpec(is_rms, eps, dropout_p, sum_dtype, out_dtype, store_sum, store_mask)
    rows = x.shape[0]
    acc = _acc(x, spec)
    masks = store_mask and dropout_p > 0.0
    formed = store_sum and not sum_is_input(x, residual, x1, rowscale, spec)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(x.shape, dtype=out_dtype) if weight1 is not None else _empty(x, out_dtype),
        x.new_empty(x.shape, dtype=sum_dtype) if formed else _empty(x, sum_dtype),
        _empty(x, acc) if is_rms else x.new_empty((rows,), dtype=acc),
        x.new_empty((rows,), dtype=acc),
        x.new_empty(x.shape, dtype=torch.bool) if masks else _empty(x, torch.bool),
        x.new_empty(x.shape, dtype=torch.bool) if masks and x1 is not None else _empty(x, torch.bool),
        torch.empty((), dtype=torch.int64),
    )


def _backward_impl(dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, seed, call: KernelCall, needs: GradNeeds, x_dtype, residual_dtype):
    """The backward op's body: the backend's backward kernel. Returns a :class:`GradsOut`."""
    spec = call.spec
    return get_backend(call.backend).fused_backward(
        dy, dy1, dsum, s, weight, weight1, rowscale, None if spec.is_rms else mean, rstd, spec, int(seed.item()), needs, x_dtype, residual_dtype
    )


@torch.library.custom_op("normkit::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Optional[Tensor],
    dy1: Optional[Tensor],
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    weight1: Optional[Tensor],
    rowscale: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    seed: Tensor,
    is_rms: bool,
    eps: float,
    dropout_p: float,
    sum_dtype: torch.dtype,
    out_dtype: torch.dtype,
    backend: str,
    needs: List[bool],
    x_dtype: torch.dtype,
    residual_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    call = KernelCall(KernelSpec(is_rms, eps, dropout_p, sum_dtype, out_dtype), backend)
    g = _backward_impl(dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, seed, call, GradNeeds(*needs), x_dtype, residual_dtype)
    # Custom ops return neither absent outputs nor aliases (dx is the residual's gradient
    # itself when nothing scales it): an empty tensor for the first, a copy for the second.
    acc = compute_dtype(torch.promote_types(s.dtype, x_dtype))
    placeholder = (x_dtype, x_dtype, residual_dtype, acc, acc, acc, acc)  # the fake's dtypes
    outs: List[Tensor] = []
    for t, dtype in zip(g, placeholder):
        if t is None:
            t = _empty(s, dtype)
        elif any(t is o for o in outs) or any(t is i for i in (dy, dy1, dsum, s)):
            t = t.clone()
        outs.append(t)
    return tuple(outs)


@_norm_bwd.register_fake
def _norm_bwd_fake(dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, seed, is_rms, eps, dropout_p, sum_dtype, out_dtype, backend, needs, x_dtype, residual_dtype):
    n = s.shape[-1]
    acc = compute_dtype(torch.promote_types(s.dtype, x_dtype))
    full = (x_dtype, x_dtype, residual_dtype)
    outs = [s.new_empty(s.shape, dtype=d) if need else _empty(s, d) for need, d in zip(needs[:3], full)]
    outs += [s.new_empty((n,), dtype=acc) if need else _empty(s, acc) for need in needs[3:]]
    return tuple(outs)


# --- autograd, shared by the custom op and the eager Function -----------------------------------


def _save_for_backward(ctx, inputs, call: KernelCall, output) -> None:
    """What backward needs: the normalized sum (``x`` itself when no sum is formed), the gains,
    ``rowscale``, the statistics and the seed; the dtypes of the inputs whose gradients it
    returns."""
    x, residual, x1, rowscale, weight, bias, weight1, bias1 = inputs
    _, _, s, mean, rstd, _, _, seed = output
    ctx.call = replace(call, backend=kernel_backend(call.backend, x, call.spec).name)  # the one forward ran
    ctx.formed = not sum_is_input(x, residual, x1, rowscale, call.spec)
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = x.dtype if residual is None else residual.dtype
    ctx.present = tuple(t is not None for t in inputs)
    ctx.param_dtypes = tuple(None if p is None else p.dtype for p in (weight, bias, weight1, bias1))
    ctx.save_for_backward(s if ctx.formed else x, weight, weight1, rowscale, mean, rstd, seed)


def _setup_context(ctx, inputs, output):
    *tensors, is_rms, eps, dropout_p, sum_dtype, out_dtype, store_sum, store_mask, backend = inputs
    spec = KernelSpec(is_rms, eps, dropout_p, sum_dtype, out_dtype, store_sum, store_mask)
    _save_for_backward(ctx, tensors, KernelCall(spec, backend), output)


def _keep_masks(call: KernelCall, s: Tensor, has_x1: bool, seed: Tensor):
    """The backend's own dropout masks of a call (for the differentiable backward): its forward
    run again with ``store_mask`` on an input of zeros, which draws the same masks from the seed."""
    if call.spec.dropout_p == 0.0:
        return None, None
    spec = replace(call.spec, store_sum=False, store_mask=True, sum_dtype=s.dtype, out_dtype=s.dtype)
    with torch.no_grad():
        zeros = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
        res = get_backend(call.backend).fused_forward(zeros, None, zeros if has_x1 else None, None, None, None, None, None, spec, int(seed.item()))
    return res.mask, res.mask1


def _input_grads(ctx, dy, dy1, dsum, *, traced: bool):
    """Gradients of the op's tensor inputs (:data:`INPUTS` order). Under ``create_graph=True``
    (autograd runs a backward with grad mode on only then), under a ``torch.func`` transform or
    for a vmap batch of gradients they are :func:`normkit.reference.fused_backward`'s torch ops,
    which autograd and vmap see through; otherwise the backend's backward kernel runs."""
    call: KernelCall = ctx.call
    s, weight, weight1, rowscale, mean, rstd, seed = ctx.saved_tensors
    present = ctx.present
    wanted = [n and p for n, p in zip(ctx.needs_input_grad[:8], present)]
    needs = GradNeeds(x=wanted[0], x1=wanted[2], residual=wanted[1], weight=wanted[4], bias=wanted[5], weight1=wanted[6], bias1=wanted[7])
    # Without a formed sum the sum output is a placeholder (x itself is returned as the prenorm
    # output, so its gradient reaches x directly): ignore what autograd passes for it.
    dsum = dsum if (ctx.formed and dsum is not None and dsum.numel() > 0) else None
    dy1 = dy1 if (present[6] and dy1 is not None and dy1.numel() > 0) else None
    if dy is None and dy1 is None and dsum is None:
        return (None,) * 8
    if dy is None and dy1 is None:  # only the prenorm output is used
        dy = torch.zeros(s.shape, dtype=call.spec.out_dtype, device=s.device)
    grads = (dy, dy1, dsum)
    if torch.is_grad_enabled() or private.functorch_transforms_active() or any(g is not None and private.is_batched(g) for g in grads):
        keep, keep1 = _keep_masks(call, s, present[2], seed)
        g = reference.fused_backward(
            dy, dy1, dsum, s, weight, weight1, rowscale, call.spec, needs, ctx.x_dtype, ctx.residual_dtype, keep, keep1
        )
    else:
        grads = tuple(None if t is None else t.contiguous() for t in grads)
        if traced:
            flags = [needs.x, needs.x1, needs.residual, needs.weight, needs.bias, needs.weight1, needs.bias1]
            spec = call.spec
            outs = _norm_bwd(*grads, s, weight, weight1, rowscale, mean, rstd, seed, spec.is_rms, spec.eps, spec.dropout_p,
                             spec.sum_dtype, spec.out_dtype, call.backend, flags, ctx.x_dtype, ctx.residual_dtype)
            g = GradsOut(*(o if f else None for o, f in zip(outs, flags)))
        else:
            g = _backward_impl(*grads, s, weight, weight1, rowscale, mean, rstd, seed, call, needs, ctx.x_dtype, ctx.residual_dtype)

    def cast(t, dtype):
        return None if t is None or dtype is None else t.to(dtype)

    # dx is the residual's gradient itself when nothing scales it; autograd would accumulate a
    # shared tensor twice (gradient accumulation), so the second one is a copy
    dx1 = g.dx1 if g.dx1 is None or g.dx1 is not g.dx else g.dx1.clone()
    dres = g.dresidual
    if dres is not None and (dres is g.dx or dres is g.dx1):
        dres = dres.clone()
    g = g._replace(dx1=dx1, dresidual=dres)

    w_dt, b_dt, w1_dt, b1_dt = ctx.param_dtypes
    return (g.dx, g.dresidual, g.dx1, None, cast(g.dweight, w_dt), cast(g.dbias, b_dt), cast(g.dweight1, w1_dt), cast(g.dbias1, b1_dt))


def _backward(ctx, dy, dy1, dsum, _dmean, _drstd, _dmask, _dmask1, _dseed):
    """The custom op's autograd: one gradient per op input (``None`` for the scalars)."""
    return _input_grads(ctx, dy, dy1, dsum, traced=True) + (None,) * 8


torch.library.register_autograd("normkit::norm_fwd", _backward, setup_context=_setup_context)


def plain_eager(x: Tensor) -> bool:
    """Whether a call on ``x`` runs eagerly on real tensors: not under ``torch.compile`` or
    ``torch.jit.trace``, no tracing or fake-tensor dispatch mode (``make_fx``,
    ``torch.export``, the ONNX dynamo exporter), and not a tensor subclass. Anything else
    must see the custom op."""
    return (
        type(x) is Tensor
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        # an active TorchDispatchMode (make_fx, export, FakeTensorMode): the kernels must not
        # run on real data pointers
        and not private.dispatch_mode_active()
    )


class _EagerNorm(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode: it calls the backend
    directly, skipping the op dispatcher and ``torch.library``'s autograd wrapper, which cost
    over 100 µs per forward+backward (more than the kernels on inputs up to ~1M elements).
    The custom ops stay what ``torch.compile`` sees. ``torch.func`` transforms and forward-mode
    AD never reach it (:func:`normkit.dispatch.route` sends them to the reference composite)."""

    # The ctx-in-forward style on purpose: with a separate ``setup_context`` torch binds the
    # arguments through ``inspect.signature`` on every call (~10 µs), and the transforms that
    # style exists for are routed to the reference composite before they reach this Function.
    @staticmethod
    def forward(ctx, x, residual, x1, rowscale, weight, bias, weight1, bias1, call):
        inputs = (x, residual, x1, rowscale, weight, bias, weight1, bias1)
        output = _forward_impl(*inputs, call)
        _save_for_backward(ctx, inputs, call, output)
        ctx.mark_non_differentiable(*output[3:])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused output
        return output

    @staticmethod
    def backward(ctx, dy, dy1, dsum, _dmean, _drstd, _dmask, _dmask1, _dseed):
        return _input_grads(ctx, dy, dy1, dsum, traced=False) + (None,)


def run(path: str, x: Tensor, residual, x1, rowscale, weight, bias, weight1, bias1, call: KernelCall,
        out: Optional[Tensor] = None, out1: Optional[Tensor] = None, residual_out: Optional[Tensor] = None) -> ForwardOut:
    """One kernel call on contiguous ``(M, N)`` tensors by ``path`` (a route of
    :func:`normkit.dispatch.route`): ``"op"`` the custom op (traced), ``"eager"`` the autograd
    Function, ``"eager_no_grad"`` the backend directly, which writes ``out`` / ``out1`` /
    ``residual_out`` itself; with autograd they are filled by ``copy_`` (a differentiable
    copy). ``s`` in the result is ``x`` itself when no sum is formed and ``spec.store_sum``."""
    spec = call.spec
    inputs = (x, residual, x1, rowscale, weight, bias, weight1, bias1)
    if path == "eager_no_grad":
        seed = reference.draw_dropout_seed(spec.dropout_p)
        return kernel_backend(call.backend, x, spec).fused_forward(*inputs, spec, seed, out, out1, residual_out)
    formed = not sum_is_input(x, residual, x1, rowscale, spec)
    if formed and not spec.store_sum:  # backward reads the normalized sum
        call = replace(call, spec=replace(spec, store_sum=True))
    if path == "op":
        y, y1, s, mean, rstd, mask, mask1, _ = _norm_fwd(*inputs, *call.op_args())
    else:
        y, y1, s, mean, rstd, mask, mask1, _ = _EagerNorm.apply(*inputs, call)
    masks = spec.store_mask and spec.dropout_p > 0.0
    res = ForwardOut(
        y,
        y1 if weight1 is not None else None,
        (s if formed else x) if spec.store_sum else None,
        None if spec.is_rms else mean,
        rstd,
        mask if masks else None,
        mask1 if masks and x1 is not None else None,
    )
    return into_buffers(res, out, out1, residual_out)
