"""Input handling for the scalers: numpy/torch in and out, dtype checks, feature dimensions.

Numpy arrays are viewed as CPU tensors (``torch.from_numpy``, no copy) and results converted
back, so one torch implementation serves both; tensors stay on their device.

Feature dims: ``feature_dims`` names the dimensions that index *features* (each feature gets its
own statistics); every other dimension indexes *samples* and is reduced over. ``-1`` (the
default) is scikit-learn's ``(n_samples, n_features)`` layout and also fits
``(batch, time, features)``; ``(1,)`` is per channel for NCHW images.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from normkit.validation import FLOAT_DTYPES as _FLOAT_DTYPES

__all__ = ["DimsLike", "as_dims", "broadcast_shape", "feature_shape", "from_tensor", "resolve_dims", "to_rows", "to_tensor"]

DimsLike = Union[int, Sequence[int]]


def as_dims(feature_dims: DimsLike) -> Tuple[int, ...]:
    """Validate a ``feature_dims`` argument (int or non-empty sequence of distinct ints)."""
    if isinstance(feature_dims, numbers.Integral) and not isinstance(feature_dims, bool):
        return (int(feature_dims),)
    if isinstance(feature_dims, Sequence) and not isinstance(feature_dims, str) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in feature_dims
    ):
        dims = tuple(int(d) for d in feature_dims)
        if not dims:
            raise ValueError("feature_dims must name at least one dimension, got ()")
        return dims
    raise TypeError(f"feature_dims must be an int or a sequence of ints, got {feature_dims!r}")


def to_tensor(X: Any, name: str = "X") -> Tuple[Tensor, bool]:
    """``(tensor, was_numpy)``. Tensors pass through; anything else goes through ``np.asarray``.

    Raises ``TypeError`` for a non-floating dtype: integers are not silently converted.
    """
    if isinstance(X, Tensor):
        t, was_numpy = X, False
    else:
        arr = np.asarray(X)
        # compare in native byte order: a big-endian '>f4' is a float32 too (a copy makes it native)
        if arr.dtype.kind != "f" or arr.dtype.newbyteorder("=") not in (np.float16, np.float32, np.float64):
            raise TypeError(
                f"{name} must have a floating dtype (float16, float32, float64), got {arr.dtype}; "
                f"convert it first, e.g. {name}.astype(np.float32)"
            )
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr = np.ascontiguousarray(arr)
        if not arr.flags.writeable:  # torch.from_numpy warns on read-only memory; we never write
            arr = arr.copy()
        t, was_numpy = torch.from_numpy(arr), True
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got "
            f"{t.dtype}; convert it first, e.g. {name}.float()"
        )
    return t, was_numpy


def from_tensor(t: Tensor, was_numpy: bool):
    return t.detach().cpu().numpy() if was_numpy else t


def resolve_dims(dims: Tuple[int, ...], ndim: int, name: str = "X") -> Tuple[int, ...]:
    """``dims`` as sorted non-negative indices into an ``ndim``-dim input; at least one sample
    dim must remain."""
    if ndim <= len(dims):
        raise ValueError(
            f"{name} must have more dimensions than feature_dims={list(dims)} names (at least "
            f"one dimension of samples), got {name} with {ndim} dimension(s)"
        )
    out = []
    for d in dims:
        if not -ndim <= d < ndim:
            raise ValueError(f"feature_dims={list(dims)} is out of range for {name} with {ndim} dimensions")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"feature_dims={list(dims)} names a dimension twice for {name} with {ndim} dimensions")
    return tuple(sorted(out))


def feature_shape(x: Tensor, dims: Tuple[int, ...]) -> Tuple[int, ...]:
    return tuple(x.shape[d] for d in dims)


def to_rows(x: Tensor, dims: Tuple[int, ...]) -> Tensor:
    """Float64 ``(rows, *feature_shape)``: feature dims moved last, sample dims flattened."""
    k = len(dims)
    moved = x.detach().movedim(dims, tuple(range(x.dim() - k, x.dim())))
    return moved.reshape((-1,) + feature_shape(x, dims)).to(torch.float64)


def broadcast_shape(ndim: int, dims: Tuple[int, ...], fshape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape that makes a ``fshape`` statistic broadcast against the input (1 on sample dims)."""
    shape = [1] * ndim
    for d, s in zip(dims, fshape):
        shape[d] = s
    return tuple(shape)
