r"""What a normalization module computes, read from its class or proven on probe inputs: the
check behind :func:`normkit.convert`.

A norm's semantics are more than its kind and ``eps``. Hugging Face writes one RMS norm per
model, and they differ in

- the gain: ``weight`` (Llama, Qwen2/3, Mistral, T5) or ``1 + weight`` (Gemma, Gemma2/3,
  Qwen3-Next),
- where a 16-bit result is rounded (normkit's ``casting_mode``): Llama rounds the normalized
  ``x_hat`` to the input dtype and then multiplies by the gain (``"llama"``); Gemma, OLMo-2 and
  ``torch.nn.RMSNorm`` multiply in float32 and round once (``"gemma"``). In bfloat16 the two
  disagree on about a quarter of the outputs,
- the name of the epsilon (``variance_epsilon`` or ``eps``), bias presence (Cohere's layer
  norm has none) and the kind itself (T5's ``T5LayerNorm`` is an RMS norm).

The source is not parsed. Each candidate (:class:`NormSpec`) is built and run beside the
original on a random probe input of shape ``(2, 3, *weight.shape)`` (3-D, so that a norm over
another dim shows; rows with their own offsets, so that a mean subtraction shows), with the
module's own parameters *and* with random ones (at Gemma's all-zeros weight ``1 + weight``
agrees with any gain that is 1 at zero, and at Llama's all-ones weight the two casting modes
agree). A candidate must agree

- in float32, up to :func:`normkit.tools.probe.outputs_differ`'s rounding tolerance, and
- in the module's own dtype; and it should agree in bfloat16 (parameters rounded to bfloat16),
  which is what picks the casting mode of a float32 model that may later run in bfloat16.

In a 16-bit dtype "agree" means bit-equal except for rare one-ulp differences, where the
float32 statistics of two summation orders fall on either side of a rounding boundary: at
most 1 % of the outputs, none by more than one unit in the last place. (Measured on CPU for
d = 64 ... 4096: the right casting mode differs on 0 - 0.01 % of the outputs, ``torch.nn``'s
and normkit's layer norms on 0.01 - 0.06 %; the wrong casting mode on 25 %.)
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

import normkit.nn as nnk
from normkit.tools.probe import outputs_differ

__all__ = ["NormSpec", "check", "differs_on_probes", "duck_typed_norm", "match_norm", "module_spec", "unweighted_rms_norm"]

_CASTING_MODES = ("gemma", "llama")
_MAX_DIFFERING = 0.01  # share of 16-bit outputs that may differ by one ulp (summation order)


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """What a layer or RMS norm computes, as normkit's module options."""

    kind: str  # "layer_norm" or "rms_norm"
    normalized_shape: Tuple[int, ...]
    eps: Optional[float]
    elementwise_affine: bool = True
    bias: bool = False
    zero_centered_weight: bool = False
    casting_mode: str = "gemma"  # RMS norms only; see normkit.rms_norm

    def options(self, cls: type) -> Dict[str, object]:
        """The options a module of ``cls`` is built with beyond shape and eps, as shown in the
        conversion summary (``casting_mode`` always for a normkit RMS norm)."""
        out: Dict[str, object] = {}
        if not self.elementwise_affine:
            out["elementwise_affine"] = False
        if self.kind == "layer_norm" and self.elementwise_affine and not self.bias:
            out["bias"] = False
        if self.zero_centered_weight:
            out["zero_centered_weight"] = True
        if cls is nnk.RMSNorm:
            out["casting_mode"] = self.casting_mode
        return out

    def build(self, fused: bool = True) -> nn.Module:
        """The module (parameters on the meta device: the caller takes over the original's)."""
        args: Dict[str, object] = dict(eps=self.eps, elementwise_affine=self.elementwise_affine, device="meta")
        if self.kind == "layer_norm":
            cls = nnk.LayerNorm if fused else nn.LayerNorm
            args["bias"] = self.bias
        else:
            cls = nnk.RMSNorm if fused else nn.RMSNorm
        if fused:
            args["zero_centered_weight"] = self.zero_centered_weight
            if cls is nnk.RMSNorm:
                args["casting_mode"] = self.casting_mode
        return cls(self.normalized_shape, **args)


def module_spec(module: nn.Module) -> Optional[NormSpec]:
    """The spec of a torch or normkit ``LayerNorm``/``RMSNorm`` (exactly those classes)."""
    cls = type(module)
    zero_centered = bool(getattr(module, "zero_centered_weight", False))
    if cls in (nn.LayerNorm, nnk.LayerNorm):
        return NormSpec("layer_norm", tuple(module.normalized_shape), module.eps, module.elementwise_affine,
                        module.bias is not None, zero_centered)
    if cls in (nn.RMSNorm, nnk.RMSNorm):
        # torch.nn.RMSNorm multiplies by the gain in float32 and rounds once: "gemma"
        return NormSpec("rms_norm", tuple(module.normalized_shape), module.eps, module.elementwise_affine,
                        False, zero_centered, getattr(module, "casting_mode", "gemma"))
    return None


def _eps(module: nn.Module) -> Optional[float]:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def duck_typed_norm(module: nn.Module) -> Optional[str]:
    """``"rms_norm"`` for a class named ``*RMSNorm``, ``"layer_norm"`` for one named
    ``*LayerNorm``, when the module looks like a Hugging Face-style norm (a ``weight``
    parameter, a numeric ``variance_epsilon`` or ``eps``) and is no torch or normkit norm
    (their subclasses may override ``forward``: convert skips them). ``None`` otherwise. The
    name only orders the candidates: what the module computes is proven by :func:`match_norm`."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return None
    name = type(module).__name__
    kind = "rms_norm" if name.endswith("RMSNorm") else "layer_norm" if name.endswith("LayerNorm") else None
    if kind is None or _eps(module) is None:
        return None
    weight = module._parameters.get("weight")
    return kind if isinstance(weight, nn.Parameter) and weight.dim() >= 1 else None


def unweighted_rms_norm(module: nn.Module) -> bool:
    """A class named ``*RMSNorm`` with an epsilon but no ``weight`` (Gemma3n's
    ``with_scale=False``, DeepSeek-V4's ``UnweightedRMSNorm``): it normalizes whatever last dim
    it is given, so no fixed-size module can stand in for it."""
    return (type(module).__name__.endswith("RMSNorm") and not isinstance(module, nn.RMSNorm)
            and _eps(module) is not None and module._parameters.get("weight") is None)


def _probe(shape: Tuple[int, ...], dtype: torch.dtype, device, generator: torch.Generator) -> torch.Tensor:
    lead = (2, 3 if shape[-1] != 3 else 5)  # a leading dim the size of the last would hide a wrong axis
    x = 2.0 * torch.randn(lead + shape, generator=generator, dtype=torch.float64)
    x = x + torch.randn(lead + (1,) * len(shape), generator=generator, dtype=torch.float64)  # a mean per row
    return x.to(device, dtype)


def _differs_16bit(a: torch.Tensor, b: torch.Tensor) -> Optional[str]:
    """Why two 16-bit outputs disagree by more than a rare one-ulp tie (``None`` if they agree)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    ad, bd = a.double(), b.double()
    nan = torch.isnan(ad)
    if not torch.equal(nan, torch.isnan(bd)):
        return "NaN at different places"
    ad, bd = ad.masked_fill(nan, 0.0), bd.masked_fill(nan, 0.0)
    finfo = torch.finfo(a.dtype)
    gap = (ad - bd).abs()
    ulp = finfo.eps * torch.maximum(ad.abs(), bd.abs()) + finfo.tiny
    differing = int((gap > 0).sum())
    if bool((gap > ulp).any()):
        return f"differs by up to {float(gap.max()):.3g}, more than one unit in the last place"
    if differing > _MAX_DIFFERING * a.numel():
        return f"{differing} of {a.numel()} outputs differ by one unit in the last place (a different rounding order)"
    return None


def _params(module: nn.Module, dtype: torch.dtype, generator: torch.Generator) -> List[Dict[str, torch.Tensor]]:
    """The module's own weight/bias in ``dtype``, and random ones."""
    own, other = {}, {}
    for name in ("weight", "bias"):
        p = module._parameters.get(name)
        if p is not None:
            own[name] = p.detach().to(dtype)
            other[name] = (0.5 * torch.randn(tuple(p.shape), generator=generator, dtype=torch.float64)).to(p.device, dtype)
    return [own, other]


def differs_on_probes(old: nn.Module, new: nn.Module, dtype: torch.dtype) -> Optional[str]:
    """Why ``new`` does not compute what ``old`` computes on ``dtype`` probes (``None``: it
    does). Both modules are run through :func:`torch.func.functional_call` with the same
    parameters (``old``'s cast to ``dtype``, then random ones); neither is changed."""
    weight = old._parameters.get("weight")
    if weight is None or weight.device.type == "meta":
        return "no weight to probe with"
    generator = torch.Generator().manual_seed(1234)
    x = _probe(tuple(weight.shape), dtype, weight.device, generator)
    for params in _params(old, dtype, generator):
        try:
            with torch.no_grad():
                want = torch.func.functional_call(old, params, (x,))
                got = torch.func.functional_call(new, params, (x,))
        except Exception as exc:  # the candidate or the original cannot run this probe
            return f"raised {type(exc).__name__}: {exc}"
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor):
            return f"returned {type(want).__name__} / {type(got).__name__}, not tensors"
        if dtype in (torch.float16, torch.bfloat16):
            why = _differs_16bit(want, got)
        else:
            why = outputs_differ(want, got)
        if why is not None:
            return why.replace("output 0", "output", 1)
    return None


def _dtypes(module: nn.Module) -> Tuple[Tuple[torch.dtype, ...], Optional[torch.dtype]]:
    """(dtypes a replacement must agree in, the dtype it should agree in too)."""
    own = module._parameters["weight"].dtype
    required = (torch.float32,) if own == torch.float32 else (torch.float32, own)
    return required, (None if torch.bfloat16 in required else torch.bfloat16)


def check(old: nn.Module, new: nn.Module) -> Tuple[Optional[str], str]:
    """``(reason new is refused or None, note)``: ``new`` must agree with ``old`` in float32
    and the original's dtype; a disagreement in bfloat16 only is a note."""
    required, preferred = _dtypes(old)
    for dtype in required:
        why = differs_on_probes(old, new, dtype)
        if why is not None:
            return f"differs from the original in {str(dtype)[6:]} on probe inputs: {why}", ""
    if preferred is not None:
        why = differs_on_probes(old, new, preferred)
        if why is not None:
            return None, f"agrees in {str(required[-1])[6:]}, but not in bfloat16: {why}"
    return None, ""


def _candidates(module: nn.Module, kind: str) -> Iterable[NormSpec]:
    shape = tuple(module._parameters["weight"].shape)
    eps, has_bias = _eps(module), module._parameters.get("bias") is not None
    rms = [NormSpec("rms_norm", shape, eps, True, False, zc, mode) for zc in (False, True) for mode in _CASTING_MODES]
    ln = [NormSpec("layer_norm", shape, eps, True, has_bias, zc) for zc in (False, True)]
    if has_bias:  # normkit's RMS norm module has no bias
        return ln
    return rms + ln if kind == "rms_norm" else ln + rms


def _describe(spec: NormSpec) -> str:
    if spec.kind == "layer_norm":
        return f"a layer norm with gain weight or gain (1 + weight), {'with' if spec.bias else 'no'} bias"
    return "an RMS norm with gain weight or gain (1 + weight), casting_mode 'gemma' or 'llama'"


def match_norm(module: nn.Module, kind: str) -> Tuple[Optional[NormSpec], str]:
    """``(spec, note)`` of the first candidate that agrees with a duck-typed norm in float32 and
    its own dtype, preferring one that agrees in bfloat16 too; ``(None, reason)`` if none does."""
    if module._parameters["weight"].device.type == "meta":
        return None, "skipped: parameters on the meta device, nothing to probe with"
    fallback: Optional[Tuple[NormSpec, str]] = None
    tried = []
    for spec in _candidates(module, kind):
        candidate = spec.build()
        for name in ("weight", "bias"):
            if name in candidate._parameters:
                candidate.register_parameter(name, module._parameters.get(name))
        refused, note = check(module, candidate)
        if refused is None and not note:
            return spec, ""
        if refused is None and fallback is None:
            fallback = (spec, note)
        if _describe(spec) not in tried:
            tried.append(_describe(spec))
    if fallback is not None:
        return fallback
    return None, "skipped: output differs on probe inputs from " + " and from ".join(tried)
