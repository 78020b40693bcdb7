r"""``convert`` / ``revert``: swap the normalization layers of an existing model, in place.

:func:`convert` walks a model and replaces, by module-tree surgery (no model code is patched):

=====================================================  ======================================
found                                                  becomes (``to=None``)
=====================================================  ======================================
``torch.nn.LayerNorm`` (exactly that class)            ``normkit.nn.LayerNorm``
``torch.nn.RMSNorm`` (exactly that class)              ``normkit.nn.RMSNorm``
Hugging Face ``*RMSNorm`` (``LlamaRMSNorm``, ...)      ``normkit.nn.RMSNorm``
Hugging Face ``GemmaRMSNorm`` (and Gemma2/3, or any    ``normkit.nn.RMSNorm(...,
``*RMSNorm`` scaling by ``1 + weight``)                zero_centered_weight=True)``
``BatchNorm1d`` (``batch_norm=True``)                  :class:`ChannelLayerNorm` ``(C)``: over
                                                       dim 1 of ``(N, C)`` and ``(N, C, L)``
``BatchNorm2d`` on NCHW (``batch_norm=True``)          ``normkit.nn.LayerNorm2d(C)``
=====================================================  ======================================

``to="rms_norm"`` turns layer norms into RMS norms (the gain is kept, the bias dropped: the
outputs change), ``to="layer_norm"`` the reverse (adds the mean subtraction: the outputs change),
``to="dyt"`` turns layer and RMS norms into :class:`normkit.nn.DyT` (Dynamic Tanh: no
normalization at all, the outputs change; gain and bias kept, ``alpha`` starts at 0.5).
A zero-centred gain stays zero-centred across kinds; DyT has none, so its ``weight`` is a new
parameter holding ``1 + weight`` (``revert`` writes ``weight - 1`` back).

Parameters are *taken over*, not copied: the new module holds the very ``Parameter`` objects of
the old one, so dtype, device and ``requires_grad`` are kept and an optimizer built before the
conversion still updates the model. The replaced module is kept (outside the module tree, as
``new._normkit_original``) so that :func:`revert` can rebuild it with the current parameters,
including third-party classes such as ``LlamaRMSNorm`` and a dropped bias.

Hugging Face RMS norms are found by duck typing: the class name ends with ``"RMSNorm"`` and the
module has a ``weight`` parameter and a ``variance_epsilon`` or ``eps``. Their formulas differ
(Gemma's scales by ``1 + weight``, Llama's by ``weight``), so each candidate is checked against
an RMS norm with gain ``weight`` and then against one with gain ``1 + weight``, on a random
probe input with the module's own weight *and* with a random weight (Gemma initializes its
weight to zeros, where ``1 + weight`` and, say, ``1 + weight**2`` agree); the first that agrees
replaces it, and a module neither agrees with is skipped, with the reason in the summary.
Subclasses of ``nn.LayerNorm``/``nn.RMSNorm`` are skipped too: they may override ``forward``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import normkit.nn as nnk
from normkit.nn.channels import ChannelLayerNorm
from normkit.tools.layers import is_hf_rms_norm, is_norm_layer
from normkit.tools.probe import outputs_differ
from normkit.reference import default_rms_eps

__all__ = ["ChannelLayerNorm", "ConversionRecord", "ConversionSummary", "convert", "revert", "is_hf_rms_norm",
           "is_norm_layer", "outputs_differ"]

_TARGETS = (None, "layer_norm", "rms_norm", "dyt")
_ORIGINAL = "_normkit_original"  # attribute (outside the module tree) holding the replaced module
_WEIGHT_OFFSET = "_normkit_weight_offset"  # a DyT from a zero-centred norm: weight = original's + this


@dataclasses.dataclass(frozen=True)
class ConversionRecord:
    """One module that :func:`convert` or :func:`revert` replaced (``new is None``: skipped)."""

    name: str
    old: str
    new: Optional[str]
    note: str = ""


class ConversionSummary(List[ConversionRecord]):
    """The records of one :func:`convert`/:func:`revert` call; a list that prints as a table."""

    @property
    def replaced(self) -> List[ConversionRecord]:
        return [r for r in self if r.new is not None]

    @property
    def skipped(self) -> List[ConversionRecord]:
        return [r for r in self if r.new is None]

    def __str__(self) -> str:
        head = f"{len(self.replaced)} module(s) replaced, {len(self.skipped)} skipped"
        if not self:
            return head
        rows = [(r.name or "(root)", r.old, r.new or "-", r.note) for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [head]
        for row in rows:
            line = "  " + "  ".join(c.ljust(w) for c, w in zip(row[:3], widths))
            lines.append((line + "  " + row[3]).rstrip())
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    module = cls.__module__
    if module.startswith("normkit.nn"):
        module = "normkit.nn"
    elif module.startswith("torch.nn"):
        module = "torch.nn"
    elif not module.startswith("normkit."):
        return cls.__name__
    return f"{module}.{cls.__name__}"


def _hf_eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(getattr(module, "eps") if eps is None else eps)


def _probe_agrees(old: nn.Module, new: nn.Module, weight: torch.Tensor) -> bool:
    """Old and new give the same output on a fresh random input (rows of the weight's shape),
    with the module's weight and with a random one in its place (``torch.func.functional_call``:
    the modules are not changed). One weight is not enough: at Gemma's all-zeros
    initialization a ``1 + weight`` gain agrees with any gain that is 1 at zero."""
    if weight.device.type == "meta":
        return False
    generator = torch.Generator().manual_seed(1234)
    probe = torch.randn((3,) + tuple(weight.shape), generator=generator).to(weight.device, weight.dtype)
    other = (0.5 * torch.randn(tuple(weight.shape), generator=generator)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            pairs = [(old(probe), new(probe))]
            swap = {"weight": other}
            pairs.append((torch.func.functional_call(old, swap, (probe,)), torch.func.functional_call(new, swap, (probe,))))
    except Exception:
        return False
    return all(isinstance(a, torch.Tensor) and outputs_differ(a, b) is None for a, b in pairs)


def _hf_zero_centered(module: nn.Module) -> Optional[bool]:
    """Whether a Hugging Face-style RMS norm scales by ``1 + weight`` (``True``) or by ``weight``
    (``False``), as proven on probe inputs; ``None`` when it computes neither."""
    shape = tuple(module.weight.shape)
    for zero_centered in (False, True):
        candidate = _build(nnk.RMSNorm, shape, eps=_hf_eps(module), zero_centered_weight=zero_centered)
        if _probe_agrees(module, _take(candidate, module, ("weight",)), module.weight):
            return zero_centered
    return None


def _to_dyt(module: nn.Module, shape: Tuple[int, ...], affine: bool, has_bias: bool, zero_centered: bool) -> nn.Module:
    """A :class:`normkit.nn.DyT` taking over ``module``'s gain and bias; a zero-centred gain
    ``1 + w`` becomes a new ``weight`` parameter holding ``1 + w`` (DyT's gain is plain)."""
    new = _take(_build(nnk.DyT, shape, elementwise_affine=affine, bias=has_bias), module, ("weight", "bias") if has_bias else ("weight",))
    ref = next(module.parameters(recurse=False), None)
    like = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
    new.alpha = nn.Parameter(torch.full((), new.alpha_init, **like))
    if zero_centered:
        w = module.weight
        with torch.no_grad():
            gain = (1.0 + w.to(torch.float64)).to(w.dtype)
        new.weight = nn.Parameter(gain, requires_grad=w.requires_grad)
        new.__dict__[_WEIGHT_OFFSET] = 1.0
    return new


def _build(cls: type, *args, **kwargs) -> nn.Module:
    return cls(*args, device="meta", **kwargs)  # parameters are taken over right after


def _take(new: nn.Module, old: nn.Module, names: Tuple[str, ...]) -> nn.Module:
    for name in ("weight", "bias"):
        if name in new._parameters:
            new.register_parameter(name, getattr(old, name, None) if name in names else None)
    new.train(old.training)
    return new


def _classes(fused: bool) -> Dict[str, type]:
    if fused:
        return {"layer_norm": nnk.LayerNorm, "rms_norm": nnk.RMSNorm}
    return {"layer_norm": nn.LayerNorm, "rms_norm": nn.RMSNorm}


def _replacement(module: nn.Module, to: Optional[str], fused: bool, batch_norm: bool) -> Tuple[Optional[nn.Module], str]:
    """``(new module or None, note)`` for one module; ``(None, "")`` when it is not a target."""
    cls = type(module)
    classes = _classes(fused)
    zero_centered = bool(getattr(module, "zero_centered_weight", False)) if cls in (nnk.LayerNorm, nnk.RMSNorm) else False
    if cls in (nn.LayerNorm, nnk.LayerNorm):
        kind, affine, eps = "layer_norm", module.elementwise_affine, module.eps
        shape, has_bias = module.normalized_shape, module.bias is not None
    elif cls in (nn.RMSNorm, nnk.RMSNorm):
        kind, affine, eps, shape, has_bias = "rms_norm", module.elementwise_affine, module.eps, module.normalized_shape, False
    elif is_hf_rms_norm(module):
        found = _hf_zero_centered(module)
        if found is None:
            return None, "skipped: output differs on probe inputs from an RMS norm with gain weight and with gain (1 + weight)"
        zero_centered = found
        kind, affine, eps, shape, has_bias = "rms_norm", True, _hf_eps(module), tuple(module.weight.shape), False
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return None, f"skipped: subclass of torch.nn.{'LayerNorm' if isinstance(module, nn.LayerNorm) else 'RMSNorm'} (it may override forward)"
    elif batch_norm and cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        note = "per-sample statistics replace batch statistics (running stats dropped): outputs change"
        args = dict(eps=module.eps, elementwise_affine=module.affine, bias=module.affine)
        if cls is nn.BatchNorm2d:
            return _take(_build(nnk.LayerNorm2d, module.num_features, **args), module, ("weight", "bias")), note
        return _take(_build(ChannelLayerNorm, module.num_features, **args), module, ("weight", "bias")), note
    else:
        return None, ""

    target = to or kind
    if target == "dyt":
        return _to_dyt(module, tuple(shape), affine, has_bias, zero_centered), "norm -> DyT (tanh(alpha x), no normalization): outputs change"
    new_cls = classes[target]
    if new_cls is cls:
        return None, ""
    if zero_centered and not fused:
        return None, f"skipped: torch.nn.{new_cls.__name__} has no zero-centred (1 + weight) gain; fused=True keeps it"
    options = {"zero_centered_weight": True} if zero_centered else {}
    if target == "layer_norm":
        if eps is None:  # torch.nn.RMSNorm's default: the compute dtype's machine epsilon
            eps = default_rms_eps(module.weight.dtype if module.weight is not None else torch.float32)
        new = _build(new_cls, shape, eps=eps, elementwise_affine=affine, bias=has_bias, **options)
        note = "" if kind == "layer_norm" else "RMS -> layer norm adds the mean subtraction: outputs change"
        return _take(new, module, ("weight", "bias")), note
    new = _build(new_cls, shape, eps=eps, elementwise_affine=affine, **options)
    note = "" if kind == "rms_norm" else "layer -> RMS norm drops the mean subtraction" + (" and the bias" if has_bias else "") + ": outputs change"
    return _take(new, module, ("weight",)), note


def _check_model(model: nn.Module, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module as model, got {type(model).__name__}")
    if is_norm_layer(model):
        raise ValueError(
            f"{fn} replaces submodules in place, but model is itself a {type(model).__name__}; "
            f"wrap it (e.g. torch.nn.Sequential(model)) or build the normkit module directly"
        )


def _swap(model: nn.Module, replace: Callable[[nn.Module], Tuple[Optional[nn.Module], str]]) -> ConversionSummary:
    """Apply ``replace`` to every submodule; a module shared by several parents stays shared."""
    summary = ConversionSummary()
    done: Dict[int, Optional[nn.Module]] = {}
    for name, child in list(model.named_modules(remove_duplicate=False))[1:]:
        parent_name, _, attr = name.rpartition(".")
        if id(child) not in done:
            new, note = replace(child)
            done[id(child)] = new
            if new is not None or note:
                summary.append(ConversionRecord(name, _qualname(type(child)), None if new is None else _qualname(type(new)), note))
        if done[id(child)] is not None:
            setattr(model.get_submodule(parent_name), attr, done[id(child)])
    return summary


def convert(model: nn.Module, to: Optional[str] = None, fused: bool = True, batch_norm: bool = False) -> ConversionSummary:
    """Replace the normalization layers of ``model`` in place; returns what was replaced.

    Args:
        model: any ``nn.Module`` (a Hugging Face model, a torchvision-style CNN, ...).
        to: ``None`` keeps each layer's kind; ``"rms_norm"`` / ``"layer_norm"`` converts all
            of them to that kind, ``"dyt"`` replaces them with :class:`normkit.nn.DyT` (outputs
            change; the summary says so).
        fused: ``True`` installs normkit modules: normkit's kernels (numba on CPU, Triton on
            GPU), and a ``forward(x, residual=None, *, prenorm=False, dropout_p=0.0)`` that
            fuses the residual add (+ dropout) into the norm. The fusion happens only where the
            model *calls* ``norm(x, residual)``; convert never rewrites model code, so a model
            that does ``norm(x + h)`` keeps its separate add. ``False`` installs the stock
            ``torch.nn.LayerNorm``/``RMSNorm`` instead (to change a layer's kind, or to turn
            Hugging Face RMS norms into torch's, with no normkit dependency left in the model).
        batch_norm: also turn ``BatchNorm1d`` into a :class:`ChannelLayerNorm` (layer norm over
            ``C`` of ``(N, C)`` or ``(N, C, L)`` input) and ``BatchNorm2d`` into
            :class:`normkit.nn.LayerNorm2d` (outputs change). Either way the statistics are
            over dim 1, whatever the input layout, and whatever ``fused`` says (torch has no
            channel-first layer norm).

    Returns:
        a :class:`ConversionSummary` (a list of :class:`ConversionRecord`; ``print`` it).
    """
    _check_model(model, "convert")
    if to not in _TARGETS:
        raise ValueError(f"to must be None, 'layer_norm', 'rms_norm' or 'dyt', got {to!r}")
    if not isinstance(fused, bool) or not isinstance(batch_norm, bool):
        raise TypeError(f"fused and batch_norm must be bools, got fused={fused!r}, batch_norm={batch_norm!r}")

    def replace(module: nn.Module):
        new, note = _replacement(module, to, fused, batch_norm)
        if new is not None:
            # keep the replaced module (outside the module tree) for revert(); chains keep the first
            new.__dict__[_ORIGINAL] = module.__dict__.get(_ORIGINAL, module)
        return new, note

    return _swap(model, replace)


def _restore(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    original = module.__dict__.get(_ORIGINAL)
    if original is None:
        return _rebuild_plain(module)
    offset = module.__dict__.get(_WEIGHT_OFFSET)
    with torch.no_grad():
        for name in ("weight", "bias"):
            current = module._parameters.get(name)
            if current is None or name not in original._parameters:
                continue
            if name == "weight" and offset is not None and original.weight is not None:
                original.weight.copy_(current.to(torch.float64) - offset)  # DyT's 1 + w, back to w
            else:
                original.register_parameter(name, current)
        ref = getattr(module, "weight", None)
        if ref is not None:  # buffers (BatchNorm running stats) follow the parameters' device
            for key, buf in original._buffers.items():
                if buf is not None:
                    original._buffers[key] = buf.to(ref.device, ref.dtype if buf.is_floating_point() else buf.dtype)
    original.train(module.training)
    return original, ""


def _rebuild_plain(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """A normkit module that :func:`convert` did not create: rebuild its torch.nn equivalent."""
    cls = type(module)
    if cls in (nnk.LayerNorm, nnk.RMSNorm) and module.zero_centered_weight:
        return None, "skipped: torch.nn has no zero-centred (1 + weight) gain"
    if cls is nnk.LayerNorm:
        new = _build(nn.LayerNorm, module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine, bias=module.bias is not None)
        return _take(new, module, ("weight", "bias")), ""
    if cls is nnk.RMSNorm:
        new = _build(nn.RMSNorm, module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine)
        return _take(new, module, ("weight",)), ""
    if cls is nnk.LayerNormCHW:
        new = _build(nn.GroupNorm, 1, module.num_channels, eps=module.eps, affine=module.affine)
        return _take(new, module, ("weight", "bias")), ""
    if cls in (nnk.LayerNorm2d, ChannelLayerNorm):
        return None, "skipped: torch.nn has no channels-first layer norm"
    return None, ""


def revert(model: nn.Module) -> ConversionSummary:
    """Undo :func:`convert`: put back the replaced modules (``LlamaRMSNorm`` stays
    ``LlamaRMSNorm``) with the *current* parameters, and turn other normkit norm modules into
    their torch.nn equivalents (``LayerNorm2d`` has none and stays). Returns the summary."""
    _check_model(model, "revert")
    ours = (nnk.LayerNorm, nnk.RMSNorm, nnk.LayerNorm2d, nnk.LayerNormCHW)
    return _swap(model, lambda m: _restore(m) if _ORIGINAL in m.__dict__ or isinstance(m, ours) else (None, ""))
