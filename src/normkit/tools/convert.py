r"""``convert`` / ``revert``: swap the normalization layers of an existing model, in place.

:func:`convert` walks a model and replaces, by module-tree surgery (no model code is patched):

=====================================================  ======================================
found                                                  becomes (``to=None``)
=====================================================  ======================================
``torch.nn.LayerNorm`` (exactly that class)            ``normkit.nn.LayerNorm`` (same ``eps``,
                                                       ``elementwise_affine``, ``bias``)
``torch.nn.RMSNorm`` (exactly that class)              ``normkit.nn.RMSNorm(...,
                                                       casting_mode="gemma")``: one rounding
``LlamaRMSNorm``, ``Qwen2/3RMSNorm``,                  ``normkit.nn.RMSNorm(...,
``MistralRMSNorm``, ``T5LayerNorm`` (``weight *        casting_mode="llama")``
x_hat.to(dtype)``)
``GemmaRMSNorm``, Gemma2/3, Qwen3-Next (``(x_hat *     ``normkit.nn.RMSNorm(...,
(1 + weight)).to(dtype)``)                             zero_centered_weight=True,
                                                       casting_mode="gemma")``
``Olmo2RMSNorm``, ``Gemma3nRMSNorm``, ... (``(weight   ``normkit.nn.RMSNorm(...,
* x_hat).to(dtype)``)                                  casting_mode="gemma")``
``CohereLayerNorm`` (a layer norm without bias)        ``normkit.nn.LayerNorm(..., bias=False)``
``BatchNorm1d`` (``batch_norm=True``)                  :class:`ChannelLayerNorm` ``(C)``: over
                                                       dim 1 of ``(N, C)`` and ``(N, C, L)``
``BatchNorm2d`` on NCHW (``batch_norm=True``)          ``normkit.nn.LayerNorm2d(C)``
=====================================================  ======================================

Third-party norms (Hugging Face's) are found by duck typing: a class named ``*RMSNorm`` or
``*LayerNorm`` with a ``weight`` parameter and a ``variance_epsilon`` or ``eps``. Their source is
not read; the table's right column is what the probes of :mod:`normkit.tools.norm_match` find:
each candidate (RMS norm with gain ``weight`` or ``1 + weight``, casting mode ``"gemma"`` or
``"llama"``; layer norm with or without bias) runs beside the module on random inputs, with
its own parameters and random ones, in float32, in the module's own dtype and in bfloat16, and
the first that agrees everywhere replaces it (bit-equal in 16-bit dtypes, up to rare one-ulp
ties). One that agrees in float32 and the model's dtype but not in bfloat16 is taken with a
note saying so; a module no candidate agrees with is skipped, with the reason in the summary
(DeBERTa's layer norm, which rounds ``x_hat`` before its gain and bias, in a 16-bit model).
The same probes check every other same-kind replacement (``torch.nn.LayerNorm`` →
``normkit.nn.LayerNorm``, ``fused=False`` → torch's modules, which round once and so cannot
stand in for ``LlamaRMSNorm`` in a 16-bit model). The summary lists the options each new
module was built with (``casting_mode``, ``zero_centered_weight``, ``bias=False``).
Subclasses of ``nn.LayerNorm``/``nn.RMSNorm`` are skipped: they may override ``forward``; so
are RMS norms without a weight (they take any last dim).

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
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import normkit.nn as nnk
from normkit.nn.channels import ChannelLayerNorm
from normkit.reference import default_rms_eps
from normkit.tools.layers import is_hf_rms_norm, is_norm_layer
from normkit.tools.norm_match import NormSpec, check, duck_typed_norm, match_norm, module_spec, unweighted_rms_norm
from normkit.tools.probe import outputs_differ

__all__ = ["ChannelLayerNorm", "ConversionRecord", "ConversionSummary", "convert", "revert", "is_hf_rms_norm",
           "is_norm_layer", "outputs_differ"]

_TARGETS = (None, "layer_norm", "rms_norm", "dyt")
_ORIGINAL = "_normkit_original"  # attribute (outside the module tree) holding the replaced module
_WEIGHT_OFFSET = "_normkit_weight_offset"  # a DyT from a zero-centred norm: weight = original's + this
_Replacement = Tuple[Optional[nn.Module], str, Dict[str, object]]  # (new module or None, note, options)


@dataclasses.dataclass(frozen=True)
class ConversionRecord:
    """One module that :func:`convert` or :func:`revert` replaced (``new is None``: skipped)."""

    name: str
    old: str
    new: Optional[str]
    note: str = ""
    # options the new module was built with beyond shape and eps (``casting_mode`` for every
    # normkit RMS norm, ``zero_centered_weight``, ``bias=False``, ...)
    options: Dict[str, object] = dataclasses.field(default_factory=dict, hash=False)

    @property
    def options_text(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


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
        rows = [(r.name or "(root)", r.old, r.new or "-", r.options_text, r.note) for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [head]
        for row in rows:
            line = "  " + "  ".join(c.ljust(w) for c, w in zip(row[:4], widths))
            lines.append((line + "  " + row[4]).rstrip())
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


def _batch_norm_replacement(module: nn.Module) -> _Replacement:
    note = "per-sample statistics replace batch statistics (running stats dropped): outputs change"
    args = dict(eps=module.eps, elementwise_affine=module.affine, bias=module.affine)
    cls = nnk.LayerNorm2d if type(module) is nn.BatchNorm2d else ChannelLayerNorm
    options = {} if module.affine else {"elementwise_affine": False, "bias": False}
    return _take(_build(cls, module.num_features, **args), module, ("weight", "bias")), note, options


def _source_spec(module: nn.Module) -> Tuple[Optional[NormSpec], str, bool]:
    """``(spec, note, proven)``: what ``module`` computes, ``proven`` when probes showed it (a
    duck-typed norm); ``(None, reason or "", False)`` when it is no layer or RMS norm convert takes."""
    spec = module_spec(module)
    if spec is not None:
        return spec, "", False
    kind = duck_typed_norm(module)
    if kind is not None:
        spec, note = match_norm(module, kind)
        return spec, note, spec is not None
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        base = "LayerNorm" if isinstance(module, nn.LayerNorm) else "RMSNorm"
        return None, f"skipped: subclass of torch.nn.{base} (it may override forward)", False
    if unweighted_rms_norm(module):
        return None, "skipped: an RMS norm without a weight normalizes any last dim; normkit's modules have a fixed size", False
    return None, "", False


def _target_spec(spec: NormSpec, target: str) -> NormSpec:
    if target == spec.kind:
        return spec
    if target == "layer_norm":  # an RMS norm's eps=None (torch's default) is the dtype's epsilon
        return dataclasses.replace(spec, kind="layer_norm", bias=False, casting_mode="gemma")
    return dataclasses.replace(spec, kind="rms_norm", bias=False, casting_mode="gemma")


def _replacement(module: nn.Module, to: Optional[str], fused: bool, batch_norm: bool) -> _Replacement:
    """``(new module or None, note, options set)`` for one module; ``(None, "", {})`` when it
    is not a target."""
    if batch_norm and type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
        return _batch_norm_replacement(module)
    spec, note, proven = _source_spec(module)
    if spec is None:
        return None, note, {}
    weight = module._parameters.get("weight")
    target = to or spec.kind
    if target == "dyt":
        new = _to_dyt(module, spec.normalized_shape, spec.elementwise_affine, spec.bias, spec.zero_centered_weight)
        return new, "norm -> DyT (tanh(alpha x), no normalization): outputs change", {}
    new_spec = _target_spec(spec, target)
    new_cls = _classes(fused)[target]
    if new_cls is type(module):
        return None, "", {}
    if spec.zero_centered_weight and not fused:
        return None, f"skipped: torch.nn.{new_cls.__name__} has no zero-centred (1 + weight) gain; fused=True keeps it", {}
    if new_spec.kind == "layer_norm" and new_spec.eps is None:  # torch.nn.RMSNorm's default eps
        new_spec = dataclasses.replace(new_spec, eps=default_rms_eps(weight.dtype if weight is not None else torch.float32))
    new = _take(new_spec.build(fused), module, ("weight", "bias"))
    options = new_spec.options(new_cls)
    if target != spec.kind:
        if target == "layer_norm":
            return new, "RMS -> layer norm adds the mean subtraction: outputs change", options
        return new, "layer -> RMS norm drops the mean subtraction" + (" and the bias" if spec.bias else "") + ": outputs change", options
    if not (proven and fused) and weight is not None and weight.device.type != "meta":
        refused, note = check(module, new)  # a proven spec was checked as this very module
        if refused is not None:
            hint = "; fused=True keeps casting_mode='llama'" if spec.casting_mode == "llama" and not fused else ""
            return None, f"skipped: {_qualname(new_cls)} {refused}{hint}", {}
        if note and spec.casting_mode == "llama" and not fused:
            note += f"; torch.nn.RMSNorm rounds once, fused=True keeps casting_mode='llama'"
    return new, note, options


def _check_model(model: nn.Module, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects a torch.nn.Module as model, got {type(model).__name__}")
    if is_norm_layer(model):
        raise ValueError(
            f"{fn} replaces submodules in place, but model is itself a {type(model).__name__}; "
            f"wrap it (e.g. torch.nn.Sequential(model)) or build the normkit module directly"
        )


def _swap(model: nn.Module, replace: Callable[[nn.Module], _Replacement]) -> ConversionSummary:
    """Apply ``replace`` to every submodule; a module shared by several parents stays shared."""
    summary = ConversionSummary()
    done: Dict[int, Optional[nn.Module]] = {}
    for name, child in list(model.named_modules(remove_duplicate=False))[1:]:
        parent_name, _, attr = name.rpartition(".")
        if id(child) not in done:
            new, note, options = replace(child)
            done[id(child)] = new
            if new is not None or note:
                new_name = None if new is None else _qualname(type(new))
                summary.append(ConversionRecord(name, _qualname(type(child)), new_name, note, options))
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
        fused: ``True`` installs normkit modules: normkit's kernels (C++ on CPU, Triton on
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
        new, note, options = _replacement(module, to, fused, batch_norm)
        if new is not None:
            # keep the replaced module (outside the module tree) for revert(); chains keep the first
            new.__dict__[_ORIGINAL] = module.__dict__.get(_ORIGINAL, module)
        return new, note, options

    return _swap(model, replace)


def _restore(module: nn.Module) -> _Replacement:
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
    return original, "", {}


def _rebuild_plain(module: nn.Module) -> _Replacement:
    """A normkit module that :func:`convert` did not create: rebuild its torch.nn equivalent."""
    cls = type(module)
    if cls in (nnk.LayerNorm, nnk.RMSNorm) and module.zero_centered_weight:
        return None, "skipped: torch.nn has no zero-centred (1 + weight) gain", {}
    if cls is nnk.RMSNorm and module.casting_mode == "llama" and module.weight is not None:
        return None, "skipped: torch.nn.RMSNorm rounds once, it has no casting_mode='llama'", {}
    spec = module_spec(module)
    if spec is not None:
        return _take(spec.build(fused=False), module, ("weight", "bias")), "", {}
    if cls is nnk.LayerNormCHW:
        new = _build(nn.GroupNorm, 1, module.num_channels, eps=module.eps, affine=module.affine)
        return _take(new, module, ("weight", "bias")), "", {}
    if cls in (nnk.LayerNorm2d, ChannelLayerNorm):
        return None, "skipped: torch.nn has no channels-first layer norm", {}
    return None, "", {}


def revert(model: nn.Module) -> ConversionSummary:
    """Undo :func:`convert`: put back the replaced modules (``LlamaRMSNorm`` stays
    ``LlamaRMSNorm``) with the *current* parameters, and turn other normkit norm modules into
    their torch.nn equivalents (``LayerNorm2d`` has none and stays). Returns the summary."""
    _check_model(model, "revert")
    ours = (nnk.LayerNorm, nnk.RMSNorm, nnk.LayerNorm2d, nnk.LayerNormCHW)
    return _swap(model, lambda m: _restore(m) if _ORIGINAL in m.__dict__ or isinstance(m, ours) else (None, "", {}))
