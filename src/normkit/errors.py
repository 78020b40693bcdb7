"""normkit's exception types.

Bad input raises a ``ValueError`` or ``TypeError`` naming the argument, as Python code expects;
where :mod:`torch.nn.functional` raises ``RuntimeError`` for the same mistake, normkit's error
is *also* a ``RuntimeError`` (multiple inheritance), so code written against torch's
``except RuntimeError`` keeps working when it switches to normkit.
"""

from __future__ import annotations

__all__ = ["NormShapeError", "NormTypeError", "NormDeviceError", "NormOverlapError", "UnsupportedModeError"]


class NormShapeError(ValueError, RuntimeError):
    """A tensor's shape does not fit the call (torch: ``RuntimeError``)."""


class NormTypeError(TypeError, RuntimeError):
    """A tensor's dtype does not fit the call (torch: ``RuntimeError``)."""


class NormDeviceError(ValueError, RuntimeError):
    """Tensors of one call live on different devices (torch: ``RuntimeError``)."""


class NormOverlapError(ValueError, RuntimeError):
    """An output buffer shares memory with an input or another output (torch's out= ops:
    ``RuntimeError``, "unsupported operation: some elements of the input tensor and the
    written-to tensor refer to a single memory location")."""


class UnsupportedModeError(NotImplementedError):
    """An autograd mode, transform or placement normkit cannot compute exactly. Raised instead
    of returning a wrong result; the message names the mode and what to do instead."""
