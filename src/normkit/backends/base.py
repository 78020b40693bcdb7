"""The backend contract: what a kernel implementation must provide to plug into normkit.

A backend computes layer norm / RMS norm on a contiguous 2-D view ``(M, N)`` of the input,
with exactly the semantics of :func:`normkit.reference.norm_forward` and
:func:`normkit.reference.norm_backward`. Validation, reshaping and autograd live above it
(:mod:`normkit.functional`, :mod:`normkit.ops`), so a backend assumes valid input.

Dropout is described by a seed rather than a mask: ``forward`` and ``backward`` must derive
the same keep mask from ``(seed, M, N, dropout_p)``, so the mask never has to be stored. Each
backend may use its own random stream; the reference's is :func:`normkit.reference.dropout_keep_mask`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

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

    def forward(
        self,
        x: Tensor,
        residual: Optional[Tensor],
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        eps: float,
        is_rms: bool,
        dropout_p: float,
        seed: int,
        store_sum: bool,
    ) -> ForwardResult:
        """``(y, s, mean, rstd)`` as :func:`normkit.reference.norm_forward` returns them;
        ``mean`` may be ``None`` for RMS norm, ``s`` is ``None`` unless ``store_sum``."""
        raise NotImplementedError

    def backward(
        self,
        dy: Tensor,
        dsum: Optional[Tensor],
        s: Tensor,
        weight: Optional[Tensor],
        mean: Optional[Tensor],
        rstd: Tensor,
        is_rms: bool,
        dropout_p: float,
        seed: int,
    ) -> BackwardResult:
        """``(dx, dresidual, dweight, dbias)`` as :func:`normkit.reference.norm_backward`:
        ``dweight``/``dbias`` of shape ``(N,)`` in float32 (float64 for float64 input)."""
        raise NotImplementedError

    def rnn_steps(self, x: Tensor):
        """The compiled LN-LSTM/GRU time loops for buffers like ``x`` (an object with
        ``lstm_forward``, ``lstm_backward``, ``gru_forward``, ``gru_backward`` and
        ``column_dot``, as ``normkit._C`` has them), or ``None``: the plain-torch steps of
        :mod:`normkit.nn.rnn.sequence` run."""
        return None

    def empty_like(self, t: Tensor) -> Tensor:
        """An uninitialized buffer like ``t`` for a full-size output made outside the kernels
        (the residual gradient when it must be a copy of dx); a backend may allocate it the
        way its own outputs are allocated."""
        return torch.empty_like(t)

    def __repr__(self) -> str:
        return f"<normkit backend {self.name!r}>"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype for an input dtype (re-exported here for backends)."""
    from normkit.reference import compute_dtype as _compute_dtype

    return _compute_dtype(dtype)
