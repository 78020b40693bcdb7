r"""The fused path of :class:`~normkit.nn.LayerNormLSTM` / :class:`~normkit.nn.LayerNormGRU`.

One layer, one direction, as one :class:`torch.autograd.Function` over the whole sequence:

1. Before the loop (autograd as usual): the input projections of *all* steps in one matrix
   product and one :func:`normkit.layer_norm` call, ``xg = LN(x W_ih^T; alpha_x, b)``,
   ``(N, G)`` with ``G = 4H`` (LSTM) or ``3H`` (GRU), normalized over all ``G`` units.
2. Forward loop, per step: the recurrent product ``a = h_{t-1} W_hh^T`` (torch, written into a
   preallocated ``(N, G)`` buffer) and one fused step — both layer norms, the gates and the cell
   update — that stores what backward needs (normalized ``a``, its ``rstd``, the gate
   activations, ...) into preallocated ``(N, ·)`` buffers. No autograd graph is recorded.
3. Backward through time by hand, per step: one fused step (gate derivatives and both
   layer-norm backwards) and the recurrent product ``dh_{t-1} = da_t W_hh``. The parameter
   gradients are reduced once after the loop: ``dW_hh = sum_t da_t^T h_{t-1}`` as a single
   ``(G, N) x (N, H)`` product, the gains and biases as column sums (float64 accumulators in
   the compiled loop).
4. Under ``create_graph=True`` (double backward: gradient penalties, Hessians) step 3 is not
   used: backward recomputes ``xg`` from the saved projection and reruns the sequence with the
   per-step reference equations (:func:`~normkit.nn.rnn.reference.lstm_recurrence_layer_ref`)
   on the function's saved inputs, differentiated by autograd, so the gradient it returns is
   itself differentiable and connected to ``xg``, the states and the parameters.

For float32 CPU tensors the whole loop (2 and 3) runs in C++ (``normkit._C.lstm_forward`` ...,
``csrc/rnn_cpu.cpp``), which computes exactly the quantities of the plain-torch ``*_step_torch``
functions below; those run the loop otherwise (other dtypes and devices, the ``reference``
backend, no compiled extension).
float16/bfloat16 layers run the recurrence in float32. Sequences use the packed layout
described in :mod:`normkit.nn.rnn.reference`; a dense ``(T, B)`` batch is ``batch_sizes = [B]*T``.

The layer-norm backward used in both steps, for ``y = x_hat * w (+ b)``, ``x_hat = (x - mean) * rstd``:

.. math::

    dx = \mathrm{rstd}\,\big(g - \bar g - \hat x\, \overline{g \hat x}\big), \qquad g = dy \odot w
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
import normkit
from normkit import _torch_private as private
from normkit.backends import select_backend
from normkit.nn.rnn.reference import gru_recurrence_layer_ref, layer_norm_ref, lstm_recurrence_layer_ref
from normkit.reference import normalized_gradient, statistics

__all__ = ["lstm_layer", "gru_layer"]


def _step_kernels(x: Tensor):
    """The compiled fused steps of the backend that runs ``x`` (the backend registry decides,
    so ``normkit.backends.use("reference")`` forces the plain-torch steps below), or ``None``."""
    return select_backend(x).rnn_steps(x)


def _offsets(batch_sizes: Sequence[int]) -> List[int]:
    offs, total = [], 0
    for bs in batch_sizes:
        offs.append(total)
        total += bs
    return offs


def _normalize_rows_(v: Tensor, eps: float) -> Tensor:
    """``v <- (v - mean) * rstd`` over the last dim, in place; returns ``rstd`` ``(rows,)``."""
    mean, rstd = statistics(v, (-1,), eps, False)
    v.sub_(mean).mul_(rstd)
    return rstd.squeeze(-1)


def _norm_backward(g: Tensor, x_hat: Tensor, rstd: Tensor) -> Tensor:
    return normalized_gradient(g, x_hat, rstd.unsqueeze(-1), False)


# --- plain-torch fused steps (csrc/rnn_cpu.cpp computes the same quantities into the same buffers)


def lstm_fwd_step_torch(off, bs, xg, a, rstd_a, gates, chat, rstd_c, tc, out, hprev, cprev,
                        h_state, c_state, w_h, w_c, b_c, eps):
    rows, H = slice(off, off + bs), h_state.shape[1]
    hprev[rows] = h_state[:bs]
    cprev[rows] = c_state[:bs]
    rstd_a[rows] = _normalize_rows_(a[rows], eps)
    g = gates[rows]
    torch.addcmul(xg[rows], a[rows], w_h, out=g)
    g[:, 2 * H : 3 * H].tanh_()
    g[:, : 2 * H].sigmoid_()
    g[:, 3 * H :].sigmoid_()
    c = g[:, H : 2 * H] * cprev[rows] + g[:, :H] * g[:, 2 * H : 3 * H]
    c_state[:bs] = c
    chat[rows] = c
    rstd_c[rows] = _normalize_rows_(chat[rows], eps)
    torch.tanh(torch.addcmul(b_c, chat[rows], w_c), out=tc[rows])
    torch.mul(g[:, 3 * H :], tc[rows], out=out[rows])
    h_state[:bs] = out[rows]


def lstm_bwd_step_torch(off, bs, dout, dh_state, dc_state, ahat, rstd_a, gates, chat, rstd_c, tc,
                        cprev, w_h, w_c, dxg, da, dchat, tmp):
    rows, H = slice(off, off + bs), dh_state.shape[1]
    g, t, dx = gates[rows], tc[rows], dxg[rows]
    si, sf, tg, so = g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]
    dh = dh_state[:bs] + dout[rows]
    dx[:, 3 * H :] = dh * t * so * (1 - so)
    dch = dh * so * (1 - t * t)
    dchat[rows] = dch
    dc = dc_state[:bs] + _norm_backward(dch * w_c, chat[rows], rstd_c[rows])
    dx[:, :H] = dc * tg * si * (1 - si)
    dx[:, H : 2 * H] = dc * cprev[rows] * sf * (1 - sf)
    dx[:, 2 * H : 3 * H] = dc * si * (1 - tg * tg)
    dc_state[:bs] = dc * sf
    da[rows] = _norm_backward(dx * w_h, ahat[rows], rstd_a[rows])


def gru_fwd_step_torch(off, bs, xg, a, rstd_a, gates, out, hprev, h_state, w_h, b_h, eps):
    rows, H = slice(off, off + bs), h_state.shape[1]
    hprev[rows] = h_state[:bs]
    rstd_a[rows] = _normalize_rows_(a[rows], eps)
    gh = torch.addcmul(b_h, a[rows], w_h)
    g, x = gates[rows], xg[rows]
    torch.sigmoid(x[:, : 2 * H] + gh[:, : 2 * H], out=g[:, : 2 * H])
    r, z = g[:, :H], g[:, H : 2 * H]
    n = torch.tanh(x[:, 2 * H :] + r * gh[:, 2 * H :])
    g[:, 2 * H :] = n
    out[rows] = (1 - z) * n + z * hprev[rows]
    h_state[:bs] = out[rows]


def gru_bwd_step_torch(off, bs, dout, dh_state, ahat, rstd_a, gates, hprev, w_h, b_h, dxg, dgh, da):
    rows, H = slice(off, off + bs), dh_state.shape[1]
    g, ah, dx, dg = gates[rows], ahat[rows], dxg[rows], dgh[rows]
    r, z, n = g[:, :H], g[:, H : 2 * H], g[:, 2 * H :]
    dh = dh_state[:bs] + dout[rows]
    dnp = dh * (1 - z) * (1 - n * n)
    dz = dh * (hprev[rows] - n) * z * (1 - z)
    dr = dnp * (ah[:, 2 * H :] * w_h[2 * H :] + b_h[2 * H :]) * r * (1 - r)
    dh_state[:bs] = dh * z
    dx[:, :H] = dr
    dx[:, H : 2 * H] = dz
    dx[:, 2 * H :] = dnp
    dg[:, : 2 * H] = dx[:, : 2 * H]
    dg[:, 2 * H :] = dnp * r
    da[rows] = _norm_backward(dg * w_h, ah, rstd_a[rows])


# --- the sequence functions


def _compiled_loop(kernels) -> bool:
    """Whether the backend gave compiled kernels (``normkit._C``: the whole time loop, the
    recurrent products and the fused steps, in C++); else the plain-torch steps run."""
    return kernels is not None and hasattr(kernels, "lstm_forward")


def _column_dot(u: Tensor, v: Optional[Tensor], kernels) -> Tensor:
    """``(u * v).sum(0)`` (``u.sum(0)`` when ``v`` is None): a gain or bias gradient over all rows."""
    if _compiled_loop(kernels):
        return kernels.column_dot(u, v)
    return (u * v).sum(0) if v is not None else u.sum(0)


def _steps(batch_sizes: Sequence[int], reverse: bool) -> List[Tuple[int, int]]:
    """``(off, bs)`` of every step in processing order."""
    pairs = list(zip(_offsets(batch_sizes), batch_sizes))
    return pairs[::-1] if reverse else pairs


class _Stepper:
    """Binds a plain-torch fused step to its buffers, so the time loop passes two ints."""

    def __init__(self, fn, buffers: Sequence, eps: Optional[float]):
        self.fn = fn
        self.args = tuple(buffers) + (() if eps is None else (eps,))

    def __call__(self, off: int, bs: int) -> None:
        self.fn(off, bs, *self.args)


def _composite_backward(*grads: Optional[Tensor]) -> bool:
    """Whether backward must be built from torch ops: under ``create_graph=True`` (the
    hand-written BPTT is not differentiable) or for a vmap batch of gradients
    (``is_grads_batched=True``: a BatchedTensor has no memory the loop could read)."""
    return torch.is_grad_enabled() or any(g is not None and private.is_batched(g) for g in grads)


def _differentiable_backward(ctx, recurrence_ref, n_states: int, n_params: int, grads: Sequence[Tensor]) -> tuple:
    """The backward of :class:`_LNLSTMSequence` / :class:`_LNGRUSequence` when
    :func:`_composite_backward` says so: under ``create_graph=True`` (autograd runs a backward
    with grad mode on exactly then) or for a vmap batch of gradients.

    The first saved tensors are the function's tensor inputs after ``xg``: ``(*states,
    *params, proj, ln_ih_w, b)``. ``xg`` itself is not saved (nothing else keeps it, and it is
    as large as the loop's own buffers); it is recomputed, ``LN(proj; ln_ih_w, b)`` by the
    reference, from ``proj``, which the input layer norm's autograd node keeps anyway, so the
    recomputed ``xg`` hangs off the same graph as the real one. The sequence is then rerun by
    ``recurrence_ref`` (the per-step reference equations) with autograd recording, and its
    vector-Jacobian product with ``grads`` is taken with ``create_graph=True``: functions of the
    inputs and of ``grads`` that autograd can differentiate again, the derivatives of the
    equations that the hand-written loop implements. ``proj``, ``ln_ih_w`` and ``b`` get no
    gradient here: theirs flows through ``xg``'s own node. Costs one recorded forward pass.
    """
    n_saved = n_states + n_params + 3
    saved = ctx.saved_tensors[:n_saved]
    states, params = saved[:n_states], saved[n_states : n_states + n_params]
    proj, ln_ih_w, b = saved[n_states + n_params :]
    batch_sizes, reverse, eps = ctx.meta[:3]
    with torch.enable_grad():
        xg = layer_norm_ref(proj, ln_ih_w, b, eps).to(states[0].dtype)
        outputs = recurrence_ref(xg, batch_sizes, *states, params, eps, reverse)
    inputs = (xg, *states, *params)
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t.requires_grad]
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
    result: List[Optional[Tensor]] = [None] * len(inputs)
    if wanted and pairs:
        got = torch.autograd.grad(
            [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
            create_graph=True, allow_unused=True,
        )
        for i, g in zip(wanted, got):
            result[i] = g
    return (*result, None, None, None, None, None, None)  # proj, ln_ih_w, b, batch_sizes, eps, reverse


class _LNLSTMSequence(torch.autograd.Function):
    """``(xg, h0, c0, w_hh, ln_hh_w, ln_c_w, ln_c_b) -> (out, h_n, c_n)`` for one packed sequence.

    ``proj, ln_ih_w, b`` (``xg = LN(proj; ln_ih_w, b)``) are inputs only so that the
    differentiable backward can recompute ``xg``; the forward does not read them."""

    @staticmethod
    def forward(ctx, xg, h0, c0, w_hh, ln_hh_w, ln_c_w, ln_c_b, proj, ln_ih_w, b, batch_sizes, eps, reverse):
        N, G = xg.shape
        H = G // 4
        kernels = _step_kernels(xg)
        b_c = ln_c_b if ln_c_b is not None else xg.new_zeros(H)
        ctx.meta = (batch_sizes, reverse, eps, kernels, ln_c_b is not None)
        inputs = (h0, c0, w_hh, ln_hh_w, ln_c_w, ln_c_b, proj, ln_ih_w, b)  # for the differentiable backward
        if _compiled_loop(kernels):
            out, h_state, c_state, *saved = kernels.lstm_forward(
                xg.contiguous(), h0, c0, w_hh.contiguous(), ln_hh_w.contiguous(), ln_c_w.contiguous(),
                b_c.contiguous(), _steps(batch_sizes, reverse), eps,
            )
            ctx.save_for_backward(*inputs, *saved)
            return out, h_state, c_state
        new = lambda *shape: xg.new_empty(shape)  # noqa: E731
        a, gates = new(N, G), new(N, G)
        rstd_a, rstd_c = new(N), new(N)
        chat, tc, out, hprev, cprev = (new(N, H) for _ in range(5))
        h_state, c_state = h0.contiguous().clone(), c0.contiguous().clone()
        w_t = w_hh.t()
        step = _Stepper(
            lstm_fwd_step_torch,
            (xg.contiguous(), a, rstd_a, gates, chat, rstd_c, tc, out, hprev, cprev, h_state, c_state,
             ln_hh_w.contiguous(), ln_c_w.contiguous(), b_c.contiguous()),
            eps,
        )
        for off, bs in _steps(batch_sizes, reverse):
            torch.mm(h_state[:bs], w_t, out=a[off : off + bs])
            step(off, bs)
        ctx.save_for_backward(*inputs, a, rstd_a, gates, chat, rstd_c, tc, hprev, cprev)
        return out, h_state, c_state

    @staticmethod
    def backward(ctx, dout, dh_n, dc_n):
        if _composite_backward(dout, dh_n, dc_n):
            return _differentiable_backward(ctx, lstm_recurrence_layer_ref, 2, 4, (dout, dh_n, dc_n))
        w_hh, ln_hh_w, ln_c_w = ctx.saved_tensors[2:5]
        ahat, rstd_a, gates, chat, rstd_c, tc, hprev, cprev = ctx.saved_tensors[9:]
        batch_sizes, reverse, _, kernels, has_c_bias = ctx.meta
        N, G = ahat.shape
        H = G // 4
        B = batch_sizes[0] if batch_sizes else 0
        dout = ahat.new_zeros(N, H) if dout is None else dout.contiguous()
        dh_state = ahat.new_zeros(B, H) if dh_n is None else dh_n.contiguous().clone()
        dc_state = ahat.new_zeros(B, H) if dc_n is None else dc_n.contiguous().clone()
        if _compiled_loop(kernels):
            dxg, dh_state, dc_state, da, dchat = kernels.lstm_backward(
                dout, dh_state, dc_state, w_hh.contiguous(), ln_hh_w.contiguous(), ln_c_w.contiguous(),
                ahat, rstd_a, gates, chat, rstd_c, tc, cprev, _steps(batch_sizes, not reverse),
            )
            return _lstm_param_grads(dxg, dh_state, dc_state, da, dchat, ahat, chat, hprev, kernels, has_c_bias)
        dxg, da, dchat, tmp = ahat.new_empty(N, G), ahat.new_empty(N, G), ahat.new_empty(N, H), ahat.new_empty(H)
        step = _Stepper(
            lstm_bwd_step_torch,
            (dout, dh_state, dc_state, ahat, rstd_a, gates, chat, rstd_c, tc, cprev,
             ln_hh_w.contiguous(), ln_c_w.contiguous(), dxg, da, dchat, tmp),
            None,
        )
        for off, bs in _steps(batch_sizes, not reverse):
            step(off, bs)
            torch.mm(da[off : off + bs], w_hh, out=dh_state[:bs])
        return _lstm_param_grads(dxg, dh_state, dc_state, da, dchat, ahat, chat, hprev, kernels, has_c_bias)


def _lstm_param_grads(dxg, dh_state, dc_state, da, dchat, ahat, chat, hprev, kernels, has_c_bias):
    """:class:`_LNLSTMSequence`'s gradients from the loop's results: the parameter gradients are
    reduced once over all steps."""
    dw_hh = da.t().mm(hprev)
    d_ln_hh_w = _column_dot(dxg, ahat, kernels)
    d_ln_c_w = _column_dot(dchat, chat, kernels)
    d_ln_c_b = _column_dot(dchat, None, kernels) if has_c_bias else None
    # proj, ln_ih_w, b: their gradients flow through xg's node; then batch_sizes, eps, reverse
    return dxg, dh_state, dc_state, dw_hh, d_ln_hh_w, d_ln_c_w, d_ln_c_b, None, None, None, None, None, None


class _LNGRUSequence(torch.autograd.Function):
    """``(xg, h0, w_hh, ln_hh_w, b_hh) -> (out, h_n)`` for one packed sequence; ``proj, ln_ih_w,
    b_ih`` as for :class:`_LNLSTMSequence`."""

    @staticmethod
    def forward(ctx, xg, h0, w_hh, ln_hh_w, b_hh, proj, ln_ih_w, b_ih, batch_sizes, eps, reverse):
        N, G = xg.shape
        H = G // 3
        kernels = _step_kernels(xg)
        b_h = b_hh if b_hh is not None else xg.new_zeros(G)
        ctx.meta = (batch_sizes, reverse, eps, kernels, b_hh is not None)
        inputs = (h0, w_hh, ln_hh_w, b_hh, proj, ln_ih_w, b_ih)  # for the differentiable backward
        if _compiled_loop(kernels):
            out, h_state, *saved = kernels.gru_forward(
                xg.contiguous(), h0, w_hh.contiguous(), ln_hh_w.contiguous(), b_h.contiguous(),
                _steps(batch_sizes, reverse), eps,
            )
            ctx.save_for_backward(*inputs, b_h, *saved)
            return out, h_state
        a, gates, rstd_a = xg.new_empty(N, G), xg.new_empty(N, G), xg.new_empty(N)
        out, hprev = xg.new_empty(N, H), xg.new_empty(N, H)
        h_state = h0.contiguous().clone()
        w_t = w_hh.t()
        step = _Stepper(
            gru_fwd_step_torch,
            (xg.contiguous(), a, rstd_a, gates, out, hprev, h_state, ln_hh_w.contiguous(), b_h.contiguous()),
            eps,
        )
        for off, bs in _steps(batch_sizes, reverse):
            torch.mm(h_state[:bs], w_t, out=a[off : off + bs])
            step(off, bs)
        ctx.save_for_backward(*inputs, b_h, a, rstd_a, gates, hprev)
        return out, h_state

    @staticmethod
    def backward(ctx, dout, dh_n):
        if _composite_backward(dout, dh_n):
            return _differentiable_backward(ctx, gru_recurrence_layer_ref, 1, 3, (dout, dh_n))
        w_hh, ln_hh_w = ctx.saved_tensors[1:3]
        b_h, ahat, rstd_a, gates, hprev = ctx.saved_tensors[7:]
        batch_sizes, reverse, _, kernels, has_bias = ctx.meta
        N, G = ahat.shape
        H = G // 3
        B = batch_sizes[0] if batch_sizes else 0
        dout = ahat.new_zeros(N, H) if dout is None else dout.contiguous()
        dh_state = ahat.new_zeros(B, H) if dh_n is None else dh_n.contiguous().clone()
        if _compiled_loop(kernels):
            dxg, dh_state, da, dgh = kernels.gru_backward(
                dout, dh_state, w_hh.contiguous(), ln_hh_w.contiguous(), b_h.contiguous(), ahat, rstd_a, gates,
                hprev, _steps(batch_sizes, not reverse),
            )
            return _gru_param_grads(dxg, dh_state, da, dgh, ahat, hprev, kernels, has_bias)
        dxg, dgh, da = ahat.new_empty(N, G), ahat.new_empty(N, G), ahat.new_empty(N, G)
        step = _Stepper(
            gru_bwd_step_torch,
            (dout, dh_state, ahat, rstd_a, gates, hprev, ln_hh_w.contiguous(), b_h.contiguous(), dxg, dgh, da),
            None,
        )
        for off, bs in _steps(batch_sizes, not reverse):
            step(off, bs)
            dh_state[:bs].addmm_(da[off : off + bs], w_hh)
        return _gru_param_grads(dxg, dh_state, da, dgh, ahat, hprev, kernels, has_bias)


def _gru_param_grads(dxg, dh_state, da, dgh, ahat, hprev, kernels, has_bias):
    dw_hh = da.t().mm(hprev)
    d_ln_hh_w = _column_dot(dgh, ahat, kernels)
    d_b_hh = _column_dot(dgh, None, kernels) if has_bias else None
    return dxg, dh_state, dw_hh, d_ln_hh_w, d_b_hh, None, None, None, None, None, None


# --- per-layer entry points (same signatures as the reference layers)


def _recurrence_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _input_projection(data: Tensor, w_ih: Tensor, ln_w: Tensor, b: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """``(proj, xg)``: ``proj = data W_ih^T`` and ``xg = LN(proj; ln_w, b)`` for all steps at once,
    ``xg`` as a contiguous ``(N, G)`` tensor."""
    proj = F.linear(data, w_ih)
    return proj, normkit.layer_norm(proj, (proj.shape[-1],), ln_w, b, eps).contiguous()


def lstm_layer(data: Tensor, batch_sizes: Sequence[int], h0: Tensor, c0: Tensor,
               params: Sequence[Optional[Tensor]], eps: float, reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused equivalent of :func:`normkit.nn.rnn.reference.lstm_layer_ref`."""
    w_ih, w_hh, b, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b = params
    if data.shape[0] == 0:  # empty batch: an empty output still attached to the graph, as torch's
        return F.linear(data, w_ih[: w_hh.shape[1]]), h0, c0
    proj, xg = _input_projection(data, w_ih, ln_ih_w, b, eps)
    acc = _recurrence_dtype(data.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    out, h_n, c_n = _LNLSTMSequence.apply(
        cast(xg), cast(h0), cast(c0), cast(w_hh), cast(ln_hh_w), cast(ln_c_w), cast(ln_c_b), proj, ln_ih_w, b,
        tuple(int(s) for s in batch_sizes), float(eps), bool(reverse),
    )
    return out.to(data.dtype), h_n.to(data.dtype), c_n.to(data.dtype)


def gru_layer(data: Tensor, batch_sizes: Sequence[int], h0: Tensor,
              params: Sequence[Optional[Tensor]], eps: float, reverse: bool = False) -> Tuple[Tensor, Tensor]:
    """Fused equivalent of :func:`normkit.nn.rnn.reference.gru_layer_ref`."""
    w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w = params
    if data.shape[0] == 0:  # empty batch: an empty output still attached to the graph, as torch's
        return F.linear(data, w_ih[: w_hh.shape[1]]), h0
    proj, xg = _input_projection(data, w_ih, ln_ih_w, b_ih, eps)
    acc = _recurrence_dtype(data.dtype)
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    out, h_n = _LNGRUSequence.apply(
        cast(xg), cast(h0), cast(w_hh), cast(ln_hh_w), cast(b_hh), proj, ln_ih_w, b_ih,
        tuple(int(s) for s in batch_sizes), float(eps), bool(reverse),
    )
    return out.to(data.dtype), h_n.to(data.dtype)
