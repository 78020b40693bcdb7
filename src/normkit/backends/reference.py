"""The ``"reference"`` backend: :mod:`normkit.reference` behind the backend contract (the
:class:`~normkit.backends.base.Backend` defaults are the reference's torch ops).

Always available, any device and floating dtype; the fallback for every case a fast backend
does not support.
"""

from __future__ import annotations

from torch import Tensor

from normkit.backends.base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    default_for = ("*",)

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return True


BACKEND = ReferenceBackend()
