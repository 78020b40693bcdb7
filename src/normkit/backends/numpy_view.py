"""Zero-copy NumPy views of tensors, for the numba kernels (norm and RNN steps alike)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["as_numpy"]

_TYPESTR = {torch.float32: "<f4", torch.bfloat16: "<u2", torch.float64: "<f8", torch.int64: "<i8"}


class _ArrayView:
    """A NumPy array interface over a tensor's memory; the array keeps this object, and so the
    tensor, alive as its ``base``."""

    __slots__ = ("__array_interface__", "tensor")


def as_numpy(t: Tensor) -> np.ndarray:
    """A NumPy view of contiguous CPU tensor ``t``'s memory (bfloat16 as its uint16 bits).

    Built from the array interface, not ``Tensor.numpy()``: ``numpy()`` marks the tensor's
    storage non-resizable for the rest of its life, and FSDP2 frees an unsharded parameter by
    resizing its storage to 0 ("Trying to resize storage that is not resizable")."""
    view = _ArrayView()
    view.tensor = t
    view.__array_interface__ = {
        "data": (t.data_ptr(), False),
        "shape": tuple(t.shape),
        "typestr": _TYPESTR[t.dtype],
        "version": 3,
    }
    return np.asarray(view)
