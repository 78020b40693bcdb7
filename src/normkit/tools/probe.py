"""Whether a rewrite left a computation's outputs unchanged, up to rounding: the check behind
:func:`normkit.convert` (a module against its replacement) and :func:`normkit.fold` (a model
before and after folding)."""

from __future__ import annotations

from typing import List, Optional

import torch

__all__ = ["outputs_differ"]


def _tensors(value) -> List[torch.Tensor]:
    """The tensors of a (nested) model output: a tensor, tuple/list, dict, or an object with
    ``to_tuple()`` (Hugging Face ``ModelOutput``)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def outputs_differ(before, after) -> Optional[str]:
    r"""Why two outputs of one computation, before and after a rewrite, are not equal up to the
    rounding of their dtype (``None`` when they are).

    Floating tensors agree when :math:`\max|a - b| \le \tau (1 + \max|a|)`, with
    :math:`\tau` = 1e-10 (float64), 1e-5 (float32) or 2e-2 (16-bit); other tensors must be
    equal. Used by :func:`convert` (a module against its replacement, on a random probe) and
    :func:`normkit.fold` (the model before and after folding, on example inputs).
    """
    a, b = _tensors(before), _tensors(after)
    if len(a) != len(b) or not a:
        return f"the outputs have {len(a)} vs {len(b)} tensors"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return f"output {i} changed"
            continue
        tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(x.dtype, 2e-2)
        xd, yd = x.detach().double(), y.detach().double()
        same_nan = torch.equal(torch.isnan(xd), torch.isnan(yd))
        xd, yd = torch.nan_to_num(xd, nan=0.0), torch.nan_to_num(yd, nan=0.0)
        err = float((xd - yd).abs().max()) if x.numel() else 0.0
        scale = float(xd.abs().max()) if x.numel() else 0.0
        if not same_nan or not err <= tol * (1.0 + scale):
            return f"output {i} changed by up to {err:.3g} (values up to {scale:.3g}, tolerance {tol:g} relative)"
    return None
