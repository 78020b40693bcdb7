"""The normkit op: one ``torch.library`` custom op for forward and one for backward, with autograd.

Every backend runs behind the same two ops (``normkit::norm_fwd`` / ``normkit::norm_bwd``),
named by a string argument, so ``torch.compile(fullgraph=True)`` sees one opaque node with a
fake (meta) implementation whatever the backend, and autograd is wired once. The ops work on
contiguous 2-D ``(M, N)`` tensors; :mod:`normkit.functional` validates and reshapes.

Eager calls on plain tensors skip the op dispatcher: :class:`_EagerNorm` runs the same
forward/backward bodies (``_forward_impl``/``_backward_impl``) as an ``autograd.Function``,
because ``torch.library``'s dispatch and autograd wrapper cost more than the kernels on all
but large inputs. Whatever traces (compile, export, ``make_fx``, ``jit.trace``) sees the op.

Dropout seeds are drawn *inside* the forward op and returned as a tensor, so a compiled graph
draws a fresh seed every call instead of baking one in, and backward regenerates the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from normkit import _torch_private as private
from normkit.backends import get_backend
from normkit import reference
from normkit.reference import compute_dtype

__all__ = ["NormCall", "norm_forward", "norm_forward_no_grad", "plain_eager"]

@dataclass(frozen=True)
class NormCall:
    """The non-tensor arguments of one norm call, as validated by :mod:`normkit.functional`.

    Attributes:
        eps: added to the variance (to the mean square for RMS norm).
        is_rms: RMS norm (no centering, no bias) instead of layer norm.
        dropout_p: dropout rate applied to ``x`` before the residual add (0 outside training).
        prenorm: also return the normalized sum ``s``.
        backend: name of the backend that runs the kernels.
    """

    eps: float
    is_rms: bool
    dropout_p: float
    prenorm: bool
    backend: str

    def stores_sum(self, residual: Optional[Tensor]) -> bool:
        """The normalized input differs from ``x`` (and is kept for backward) with a residual
        or dropout."""
        return residual is not None or self.dropout_p > 0.0

    def op_args(self) -> tuple:
        """The custom op's scalar arguments, in its schema's order."""
        return (self.eps, self.is_rms, self.dropout_p, self.prenorm, self.backend)


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _forward_impl(x, residual, weight, bias, call: NormCall):
    """The forward op's body: the backend's forward, outputs padded to the op's fixed schema
    ``(y, s, mean, rstd, seed)``."""
    seed = reference.draw_dropout_seed(call.dropout_p)
    store_sum = call.stores_sum(residual)
    y, s, mean, rstd = get_backend(call.backend).forward(
        x, residual, weight, bias, call.eps, call.is_rms, call.dropout_p, seed, store_sum
    )
    stat = compute_dtype(x.dtype)
    return (
        y,
        s if store_sum else _empty(x),
        _empty(x, stat) if mean is None else mean,
        rstd,
        torch.tensor(seed, dtype=torch.int64),
    )


@torch.library.custom_op("normkit::norm_fwd", mutates_args=())
def _norm_fwd(
    x: Tensor,
    residual: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    is_rms: bool,
    dropout_p: float,
    prenorm: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, residual, weight, bias, NormCall(eps, is_rms, dropout_p, prenorm, backend))


@_norm_fwd.register_fake
def _norm_fwd_fake(x, residual, weight, bias, eps, is_rms, dropout_p, prenorm, backend):
    rows = x.shape[0]
    stat = compute_dtype(x.dtype)
    return (
        torch.empty_like(x),
        torch.empty_like(x) if NormCall(eps, is_rms, dropout_p, prenorm, backend).stores_sum(residual) else _empty(x),
        x.new_empty((0,) if is_rms else (rows,), dtype=stat),
        x.new_empty((rows,), dtype=stat),
        torch.empty((), dtype=torch.int64),
    )


def _backward_impl(dy, dsum, s, weight, mean, rstd, seed, is_rms, dropout_p, backend, need_dres):
    """The backward op's body: the backend's backward, outputs padded to the op's schema."""
    dx, dres, dw, db = get_backend(backend).backward(
        dy,
        dsum,
        s,
        weight,
        None if is_rms else mean,
        rstd,
        is_rms,
        dropout_p,
        int(seed.item()),
    )
    # Custom ops may not return aliases of each other; dx is ds itself without dropout. Copy
    # it only when the residual's gradient is wanted (a full extra pass over memory).
    if not need_dres:
        dres = _empty(dy)
    elif dres is dx:
        dres = get_backend(backend).empty_like(dx).copy_(dx)
    return dx, dres, dw, db


@torch.library.custom_op("normkit::norm_bwd", mutates_args=())
def _norm_bwd(
    dy: Tensor,
    dsum: Optional[Tensor],
    s: Tensor,
    weight: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    seed: Tensor,
    is_rms: bool,
    dropout_p: float,
    backend: str,
    need_dres: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(dy, dsum, s, weight, mean, rstd, seed, is_rms, dropout_p, backend, need_dres)


@_norm_bwd.register_fake
def _norm_bwd_fake(dy, dsum, s, weight, mean, rstd, seed, is_rms, dropout_p, backend, need_dres):
    n = dy.shape[-1]
    acc = compute_dtype(s.dtype)
    dres = torch.empty_like(dy) if need_dres else _empty(dy)
    return torch.empty_like(dy), dres, dy.new_empty((n,), dtype=acc), dy.new_empty((n,), dtype=acc)


def _save_for_backward(ctx, x, residual, weight, bias, call: NormCall, output) -> None:
    """What backward needs, for the custom op's and the eager Function's autograd alike."""
    _, s, mean, rstd, seed = output
    ctx.call = call
    ctx.store_sum = call.stores_sum(residual)
    ctx.has_residual = residual is not None
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(s if ctx.store_sum else x, weight, mean, rstd, seed)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, *scalars = inputs
    _save_for_backward(ctx, x, residual, weight, bias, NormCall(*scalars), output)


def _input_grads(ctx, dy, dsum, norm_bwd=None):
    """Gradients of ``(x, residual, weight, bias)``. Under ``create_graph=True`` (autograd runs
    a backward with grad mode on only then) they are built from differentiable torch ops, so
    they can be differentiated again; otherwise the backend's kernels run."""
    call: NormCall = ctx.call
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if dy is None:  # the eager Function does not materialize the gradient of an unused y
        dy = torch.zeros_like(s)
    # Without residual and dropout the sum output is a placeholder (x itself is returned as the
    # prenorm output, so its gradient reaches x directly): ignore what autograd passes for it.
    # With them, the sum is a real output whose gradient adds to ds; it arrives even with
    # prenorm=False when a double backward differentiates through the saved sum.
    dsum = dsum.contiguous() if (ctx.store_sum and dsum is not None) else None
    needs = ctx.needs_input_grad
    need_dres = bool(ctx.has_residual and needs[1])
    if torch.is_grad_enabled() or private.functorch_transforms_active() or any(
        g is not None and private.is_batched(g) for g in (dy, dsum)
    ):
        # create_graph=True, or a batched backward (is_grads_batched, vmap over vjp): the
        # gradients as torch ops, which autograd and vmap can see through
        dx, dres, dw, db = _differentiable_backward(call, dy, dsum, s, weight, mean, rstd, seed)
    else:
        dx, dres, dw, db = (norm_bwd or _norm_bwd)(
            dy.contiguous(), dsum, s, weight, mean, rstd, seed, call.is_rms, call.dropout_p, call.backend, need_dres
        )
    return (
        dx if needs[0] else None,
        dres if need_dres else None,
        dw.to(ctx.weight_dtype) if ctx.weight_dtype is not None and needs[2] else None,
        db.to(ctx.bias_dtype) if ctx.bias_dtype is not None and needs[3] else None,
    )


def _backward(ctx, dy, dsum, _dmean, _drstd, _dseed):
    """The custom op's autograd: one gradient per op input (``None`` for the scalars)."""
    return _input_grads(ctx, dy, dsum) + (None,) * 5


def _differentiable_backward(call: NormCall, dy, dsum, s, weight, mean, rstd, seed):
    """The backward as composite torch ops (:func:`normkit.reference.norm_backward_differentiable`),
    for double backward on every backend. ``s`` is the saved sum (an output of this op, so a
    second differentiation flows back through this op to x and the residual) or x itself.
    The dropout mask is the backend's own: its backward applied to ``dy = 0, dsum = 1`` returns
    exactly ``mask / (1 - p)``, whatever random stream the backend uses."""
    keep_scale = None
    if call.dropout_p > 0.0:
        with torch.no_grad():
            keep_scale, _, _, _ = get_backend(call.backend).backward(
                torch.zeros_like(s),
                torch.ones_like(s),
                s.detach(),
                None,
                None if call.is_rms else mean,
                rstd,
                call.is_rms,
                call.dropout_p,
                int(seed.item()),
            )
    return reference.norm_backward_differentiable(dy, dsum, s, weight, call.eps, call.is_rms, keep_scale)


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
    The custom ops stay what ``torch.compile`` sees. Its backward is differentiable under
    ``create_graph=True``; ``torch.func`` transforms and forward-mode AD never reach it
    (:func:`normkit.functional.route` sends them to the reference composite)."""

    # The ctx-in-forward style on purpose: with a separate ``setup_context`` torch binds the
    # arguments through ``inspect.signature`` on every call (~10 µs), and the transforms that
    # style exists for are routed to the reference composite before they reach this Function.
    @staticmethod
    def forward(ctx, x, residual, weight, bias, call):
        output = _forward_impl(x, residual, weight, bias, call)
        _save_for_backward(ctx, x, residual, weight, bias, call, output)
        ctx.mark_non_differentiable(*output[2:])
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused sum output
        return output

    @staticmethod
    def backward(ctx, dy, dsum, _dmean, _drstd, _dseed):
        return _input_grads(ctx, dy, dsum, norm_bwd=_backward_impl) + (None,)


def _prenorm_outputs(x, residual, y, s, call: NormCall) -> Tuple[Tensor, Optional[Tensor]]:
    if not call.prenorm:
        return y, None
    return y, (s if call.stores_sum(residual) else x)


def norm_forward(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], call: NormCall, *, traced: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``(y, s)`` on contiguous ``(M, N)`` tensors, differentiable: through the custom op
    when ``traced`` (the caller's route said so), else through the eager autograd Function;
    ``s`` is the normalized input when ``call.prenorm`` (``x`` itself without residual and
    dropout), else ``None``."""
    if traced:
        y, s, _, _, _ = _norm_fwd(x, residual, weight, bias, *call.op_args())
    else:
        y, s, _, _, _ = _EagerNorm.apply(x, residual, weight, bias, call)
    return _prenorm_outputs(x, residual, y, s, call)


def norm_forward_no_grad(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], call: NormCall) -> Tuple[Tensor, Optional[Tensor]]:
    """Same as :func:`norm_forward` when nothing needs a gradient, calling the backend
    directly: skips the dispatcher and autograd bookkeeping that dominate small inference
    calls. Not for use under ``torch.compile`` (the custom op is what the compiler sees)."""
    store_sum = call.stores_sum(residual) and call.prenorm
    y, s, _, _ = get_backend(call.backend).forward(
        x, residual, weight, bias, call.eps, call.is_rms, call.dropout_p, reference.draw_dropout_seed(call.dropout_p), store_sum
    )
    return _prenorm_outputs(x, residual, y, s, call)
