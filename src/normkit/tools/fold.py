r"""``fold``: move a norm's gain and bias into the ``nn.Linear`` that reads its output (inference).

A layer or RMS norm with gain :math:`g` and bias :math:`\beta` feeding ``Linear(W, b)``:

.. math::
    W\,(\hat x \odot g + \beta) + b \;=\; \underbrace{(W \operatorname{diag}(g))}_{W'}\,\hat x
        + \underbrace{(W \beta + b)}_{b'}

so after ``W' = W * g[None, :]`` and ``b' = W @ beta + b`` (computed in float64, stored in the
Linear's dtype) the norm needs no affine at all: its ``weight``/``bias`` are removed and
``elementwise_affine`` turned off (Hugging Face RMS norms, whose ``forward`` reads
``self.weight``, get a gain of ones instead). One norm may feed several Linears (an attention
block's q, k and v projections): pass one pair per Linear and each gets the fold.

Where the structure proves the norm feeds the Linear and nothing else, :func:`fold` finds the
pairs itself: inside an ``nn.Sequential``, a norm directly followed by an ``nn.Linear``.
Anywhere else the caller states the pairs by qualified name; that the norm's output goes *only*
to those Linears is then the caller's promise (fold cannot see the forward code).

What it saves is the affine's two loads and multiply-add per element, on a memory-bound kernel:
little on CPU (measure it); the bigger win is that every norm then has the same parameter-free
form, which some inference runtimes fuse more readily.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import normkit.nn as nnk
from normkit.tools.convert import is_hf_rms_norm

__all__ = ["FoldRecord", "fold"]


@dataclasses.dataclass(frozen=True)
class FoldRecord:
    """One norm whose affine was folded into ``linears``."""

    norm: str
    linears: Tuple[str, ...]
    had_bias: bool

    def __str__(self) -> str:
        return f"{self.norm} ({'gain + bias' if self.had_bias else 'gain'}) -> {', '.join(self.linears)}"


def _is_foldable_norm(module: nn.Module) -> bool:
    """Exactly torch's or normkit's LayerNorm/RMSNorm (a subclass may override forward), or a
    Hugging Face RMS norm."""
    return type(module) in (nn.LayerNorm, nn.RMSNorm, nnk.LayerNorm, nnk.RMSNorm) or is_hf_rms_norm(module)


def _width(norm: nn.Module) -> Optional[int]:
    """The normalized width, or ``None`` when the norm spans more than the last dim."""
    shape = tuple(norm.weight.shape) if getattr(norm, "weight", None) is not None else tuple(getattr(norm, "normalized_shape", ()))
    return shape[0] if len(shape) == 1 else None


def _auto_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (n1, m1), (n2, m2) in zip(children, children[1:]):
            if _is_foldable_norm(m1) and isinstance(m2, nn.Linear) and getattr(m1, "weight", None) is not None:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def _lookup(model: nn.Module, name, what: str) -> nn.Module:
    if not isinstance(name, str):
        raise TypeError(f"pairs entries must be (norm_name, linear_name) strings, got {what} {name!r}")
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"pairs names a {what} {name!r} that is not a submodule of the model") from None


def _validate(model: nn.Module, pairs: Iterable[Sequence[str]]) -> "OrderedDict[str, List[str]]":
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"pairs must contain (norm_name, linear_name) pairs, got {pair!r}")
        norm_name, linear_name = pair
        norm, linear = _lookup(model, norm_name, "norm"), _lookup(model, linear_name, "linear")
        if not _is_foldable_norm(norm):
            raise TypeError(f"pairs: {norm_name!r} must be a LayerNorm/RMSNorm (torch, normkit or Hugging Face RMS norm), got {type(norm).__name__}")
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"pairs: {linear_name!r} must be an nn.Linear, got {type(linear).__name__}")
        width = _width(norm)
        if width is None:
            raise ValueError(f"pairs: {norm_name!r} normalizes over {list(norm.weight.shape)}; only a norm over the last dim folds into a Linear")
        if linear.in_features != width:
            raise ValueError(f"pairs: {linear_name!r} has in_features={linear.in_features}, expected the width {width} of {norm_name!r}")
        groups.setdefault(norm_name, [])
        if linear_name not in groups[norm_name]:
            groups[norm_name].append(linear_name)
    return groups


@torch.no_grad()
def _fold_into(linear: nn.Linear, gain: Optional[torch.Tensor], beta: Optional[torch.Tensor]) -> None:
    w = linear.weight.to(torch.float64)
    new_bias = None if linear.bias is None else linear.bias.to(torch.float64)
    if beta is not None:
        shift = w @ beta.to(torch.float64)
        new_bias = shift if new_bias is None else new_bias + shift
    if gain is not None:
        w = w * gain.to(torch.float64)[None, :]
    linear.weight.copy_(w.to(linear.weight.dtype))
    if new_bias is not None:
        if linear.bias is None:
            linear.bias = nn.Parameter(new_bias.to(linear.weight.dtype), requires_grad=linear.weight.requires_grad)
        else:
            linear.bias.copy_(new_bias.to(linear.bias.dtype))


@torch.no_grad()
def _strip_affine(norm: nn.Module) -> None:
    if is_hf_rms_norm(norm):
        norm.weight.fill_(1.0)  # its forward multiplies by self.weight unconditionally
        return
    norm.register_parameter("weight", None)
    if "bias" in norm._parameters:
        norm.register_parameter("bias", None)
    norm.elementwise_affine = False


def fold(model: nn.Module, pairs: Optional[Iterable[Sequence[str]]] = None) -> List[FoldRecord]:
    """Fold norm affines into the following Linear layers, in place; returns what was folded.

    Args:
        model: the model (put it in ``eval()`` mode; the result is for inference).
        pairs: ``(norm_name, linear_name)`` pairs of qualified submodule names. ``None``: every
            norm directly followed by an ``nn.Linear`` inside an ``nn.Sequential``.

    The model's outputs are unchanged up to rounding (the folded weights are computed in
    float64). Norms without an affine, or already folded, are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module as model, got {type(model).__name__}")
    if pairs is not None and isinstance(pairs, (str, bytes)):
        raise TypeError(f"pairs must be an iterable of (norm_name, linear_name) pairs, got {pairs!r}")
    groups = _validate(model, _auto_pairs(model) if pairs is None else pairs)
    records: List[FoldRecord] = []
    folded: Dict[int, bool] = {}
    for norm_name, linear_names in groups.items():
        norm = model.get_submodule(norm_name)
        gain = getattr(norm, "weight", None)
        beta = getattr(norm, "bias", None) if isinstance(getattr(norm, "bias", None), torch.Tensor) else None
        if (gain is None and beta is None) or id(norm) in folded:
            continue
        if is_hf_rms_norm(norm) and bool((gain == 1).all()):
            continue  # already folded (a gain of ones)
        for linear_name in linear_names:
            _fold_into(model.get_submodule(linear_name), gain, beta)
        _strip_affine(norm)
        folded[id(norm)] = True
        records.append(FoldRecord(norm_name, tuple(linear_names), beta is not None))
    return records
