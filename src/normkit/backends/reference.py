"""The ``"reference"`` backend: :mod:`normkit.reference` behind the backend contract.

Always available, any device and floating dtype; the fallback for every case a fast backend
does not support.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from normkit import reference as ref
from normkit.backends.base import Backend, BackwardResult, ForwardResult


def _keep_mask(seed: int, like: Tensor, dropout_p: float) -> Optional[Tensor]:
    if dropout_p == 0.0:
        return None
    return ref.dropout_keep_mask(seed, like.shape, dropout_p, like.device)


class ReferenceBackend(Backend):
    name = "reference"
    default_for = ("*",)

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return True

    def forward(self, x, residual, weight, bias, eps, is_rms, dropout_p, seed, store_sum) -> ForwardResult:
        keep = _keep_mask(seed, x, dropout_p)
        return ref.norm_forward(x, residual, weight, bias, eps, is_rms, keep, dropout_p, store_sum)

    def backward(self, dy, dsum, s, weight, mean, rstd, is_rms, dropout_p, seed) -> BackwardResult:
        keep = _keep_mask(seed, dy, dropout_p)
        return ref.norm_backward(dy, dsum, s, weight, mean, rstd, is_rms, keep, dropout_p)


BACKEND = ReferenceBackend()
