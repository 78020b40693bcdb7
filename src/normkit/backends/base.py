"""The backend contract: what a kernel implementation must provide to plug into normkit.

A backend implements the one kernel contract of :mod:`normkit.contract`:
:meth:`Backend.fused_forward` and :meth:`Backend.fused_backward` on contiguous 2-D ``(M, N)``
views, every fused option a switch of one forward and one backward kernel, with exactly the
semantics of :func:`normkit.reference.fused_forward` / :func:`normkit.reference.fused_backward`
(the defaults here run those, so a backend is correct for whatever it does not implement).
Validation, reshaping and autograd live above it (:mod:`normkit.dispatch`, :mod:`normkit.ops`),
so a backend assumes valid input.

Dropout is described by a seed rather than a mask: forward and backward must derive the same
keep masks from ``(seed, M, N, dropout_p)``, so a mask is stored only when the caller asks for
it. Each backend may use its own random stream; the reference's is :func:`fused_keep_masks`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from normkit import reference
from normkit.contract import ForwardOut, GradNeeds, GradsOut, KernelSpec, sum_is_input
from normkit.reference import fused_keep_masks

ForwardResult = Tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor]
BackwardResult = Tuple[Tensor, Tensor, Tensor, Tensor]


class Backend:
    """Base class for normkit backends. Subclasses set ``name`` and override the methods."""

    name: str = "abstract"
    #: Device types ("cpu", "cuda", ...) for which this backend is picked when none is forced;
    #: "*" means any. A backend can still support other devices when forced (Triton on CPU
    #: tensors under TRITON_INTERPRET=1).
    default_for: Tuple[str, ...] = ()

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the backend can run on this machine, else a sentence saying why not.

        Must be cheap (no heavy imports): it is asked by :func:`normkit.backends`.
        """
        return None

    def is_available(self) -> bool:
        return self.unavailable_reason() is None

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        """Whether this backend handles input ``x`` (device, dtype, size); otherwise the
        dispatcher falls back to the reference."""
        raise NotImplementedError

    # --- the plain call (residual, prenorm, dropout): the fused contract with every other option
    # off, kept as a convenience for callers and tests of the (M, N) kernels.

    def forward(self, x, residual, weight, bias, eps, is_rms, dropout_p, seed, store_sum) -> ForwardResult:
        """``(y, s, mean, rstd)`` of :meth:`fused_forward` with the options off: ``y`` in
        ``x.dtype``, ``s`` (a tensor of its own, even when it equals ``x``) only with
        ``store_sum``, ``mean`` ``None`` for RMS norm."""
        spec = KernelSpec(is_rms, float(eps), float(dropout_p), x.dtype, x.dtype, store_sum=store_sum)
        copy = store_sum and sum_is_input(x, residual, None, None, spec)
        res = self.fused_forward(x, residual, None, None, weight, bias, None, None, spec, seed,
                                 residual_out=torch.empty_like(x) if copy else None)
        return res.y, res.s, res.mean, res.rstd

    def backward(self, dy, dsum, s, weight, mean, rstd, is_rms, dropout_p, seed) -> BackwardResult:
        """``(dx, dresidual, dweight, dbias)`` of :meth:`fused_backward` with the options off;
        ``dweight``/``dbias`` ``(N,)`` in the compute dtype. Without dropout the residual's
        gradient is ``dx`` itself (one tensor, returned twice)."""
        dropout = dropout_p > 0.0
        spec = KernelSpec(is_rms, 0.0, float(dropout_p), s.dtype, dy.dtype)
        needs = GradNeeds(x=True, residual=dropout, weight=True, bias=True)
        g = self.fused_backward(dy, None, dsum, s, weight, None, None, mean, rstd, spec, seed, needs, dy.dtype, dy.dtype)
        return g.dx, g.dresidual if dropout else g.dx, g.dweight, g.dbias

    # --- the fused contract (normkit.contract): every option in one forward and one
    # backward kernel. The defaults run the reference's torch ops with the reference's dropout
    # stream, so a backend without its own kernels for an option is still correct.

    def fused_supports(self, x: Tensor, spec: KernelSpec) -> bool:
        """Whether :meth:`fused_forward` / :meth:`fused_backward` run this backend's kernels for
        input ``x`` (device, dtype) and ``spec``; when not, the caller picks another backend."""
        return self.supports(x, spec.dropout_p)

    def fused_forward(
        self,
        x: Tensor,
        residual: Optional[Tensor],
        x1: Optional[Tensor],
        rowscale: Optional[Tensor],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        weight1: Optional[Tensor],
        bias1: Optional[Tensor],
        spec: KernelSpec,
        seed: int,
        out: Optional[Tensor] = None,
        out1: Optional[Tensor] = None,
        residual_out: Optional[Tensor] = None,
    ) -> ForwardOut:
        """The contract's forward on contiguous ``(M, N)`` tensors (``rowscale`` ``(M,)``,
        parameters ``(N,)``), the dropout masks drawn from ``seed``. ``out`` / ``out1`` /
        ``residual_out``, when given, are contiguous ``(M, N)`` buffers of ``y``'s / ``y1``'s /
        ``s``'s dtype that share no memory with an input: the kernel writes them and returns them."""
        keep, keep1 = fused_keep_masks(seed, x, x1, spec.dropout_p)
        res = reference.fused_forward(x, residual, x1, rowscale, weight, bias, weight1, bias1, spec, keep, keep1)
        return into_buffers(res, out, out1, residual_out)

    def fused_backward(
        self,
        dy: Optional[Tensor],
        dy1: Optional[Tensor],
        dsum: Optional[Tensor],
        s: Tensor,
        weight: Optional[Tensor],
        weight1: Optional[Tensor],
        rowscale: Optional[Tensor],
        mean: Optional[Tensor],
        rstd: Tensor,
        spec: KernelSpec,
        seed: int,
        needs: GradNeeds,
        x_dtype: torch.dtype,
        residual_dtype: Optional[torch.dtype],
    ) -> GradsOut:
        """The contract's backward: ``dy``/``dy1`` of ``spec.out_dtype`` (either may be
        ``None``: zero), ``dsum`` of ``s``'s dtype or ``None``, ``s`` the saved sum (``x`` when
        no sum was formed), ``mean``/``rstd`` as the forward returned them, the masks
        regenerated from ``seed``. Computes only what ``needs`` asks for."""
        keep, keep1 = fused_keep_masks(seed, s, None if dy1 is None and not needs.x1 else s, spec.dropout_p)
        with torch.no_grad():
            return reference.fused_backward(
                dy, dy1, dsum, s, weight, weight1, rowscale, spec, needs, x_dtype, residual_dtype, keep, keep1, (mean, rstd)
            )

    def rnn_steps(self, x: Tensor):
        """The compiled LN-LSTM/GRU time loops for buffers like ``x`` (an object with
        ``lstm_forward``, ``lstm_backward``, ``gru_forward``, ``gru_backward`` and
        ``column_dot``, as ``normkit._C`` has them), or ``None``: the plain-torch steps of
        :mod:`normkit.nn.rnn.sequence` run."""
        return None

    def __repr__(self) -> str:
        return f"<normkit backend {self.name!r}>"


def into_buffers(res: ForwardOut, out, out1, residual_out) -> ForwardOut:
    """``res`` with ``y``/``y1``/``s`` copied into the caller's buffers where given (for
    implementations that cannot write them directly)."""
    y = res.y if out is None else out.copy_(res.y)
    y1 = res.y1 if out1 is None or res.y1 is None else out1.copy_(res.y1)
    s = res.s if residual_out is None or res.s is None else residual_out.copy_(res.s)
    return res._replace(y=y, y1=y1, s=s)
