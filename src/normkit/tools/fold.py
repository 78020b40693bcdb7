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

Folding is exact only if the norm's output goes to those Linears and nowhere else, and each
Linear reads that norm and nothing else. :func:`fold` never takes that on trust; each norm's
fold must pass every check it can run, and one that cannot be shown safe is not done:

* **structure** — a Linear paired with two different norms, a Linear that already absorbed a
  norm in an earlier call, or a parameter tied to another module (an embedding tied to the
  Linear, say) is refused;
* **dataflow** — the model is traced with :mod:`torch.fx` (the norms and Linears as leaves,
  everything that contains none of them as an opaque call, so tracing only needs the path from
  the root to them to be traceable); in the graph every call of the norm must feed only calls
  of its Linears, and every call of those Linears must read the norm;
* **outputs** — with ``example_inputs``, the model's outputs before and after each norm's
  fold must agree to rounding (:func:`normkit.tools.convert.outputs_differ`, the comparison
  :func:`normkit.convert` uses on its probes); a fold that changes them is undone.

A model that cannot be traced needs ``example_inputs``. Pairs found automatically (a norm
directly followed by an ``nn.Linear`` inside an ``nn.Sequential``, which is a chain only if the
model calls it as one) are skipped with a :class:`FoldWarning` saying why; explicit pairs that
fail raise ``ValueError`` and leave the model unchanged.

What it saves is the affine's two loads and multiply-add per element, on a memory-bound kernel:
little on CPU (measure it); the bigger win is that every norm then has the same parameter-free
form, which some inference runtimes fuse more readily.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import normkit.nn as nnk
from normkit.tools.layers import is_hf_rms_norm
from normkit.tools.probe import outputs_differ

__all__ = ["FoldRecord", "FoldWarning", "fold"]

_FOLDED_FROM = "_normkit_folded_from"  # set on a Linear (outside the module tree) once it absorbed a norm


class FoldWarning(UserWarning):
    """:func:`fold` skipped an automatically found (norm, Linear) pair it could not show safe."""


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
    Hugging Face RMS norm. Not a zero-centred normkit norm: its gain is ``1 + weight``, and the
    fold reads ``weight`` as the gain."""
    if getattr(module, "zero_centered_weight", False) is True:
        return False
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
            raise TypeError(f"pairs: {norm_name!r} must be a LayerNorm/RMSNorm (torch, normkit or Hugging Face RMS norm; "
                            f"not zero-centred), got {type(norm).__name__}")
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



# -- undo ---------------------------------------------------------------------------------------

class _Snapshot:
    """What one norm's fold changes (the Linears' weight/bias values, the norm's parameters),
    so that a fold that fails its output check is undone exactly."""

    def __init__(self, norm: nn.Module, linears: List[nn.Linear]) -> None:
        self.norm = norm
        self.norm_params = {k: norm._parameters.get(k) for k in ("weight", "bias") if k in norm._parameters}
        self.norm_values = {k: p.detach().clone() for k, p in self.norm_params.items() if p is not None}
        self.affine = norm.__dict__.get("elementwise_affine")
        self.linears = [(lin, lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone(),
                         lin.__dict__.get(_FOLDED_FROM)) for lin in linears]

    @torch.no_grad()
    def restore(self) -> None:
        for lin, weight, bias, mark in self.linears:
            lin.weight.copy_(weight)
            if bias is None:
                lin.register_parameter("bias", None)
            else:
                lin.bias.copy_(bias)
            if mark is None:
                lin.__dict__.pop(_FOLDED_FROM, None)
            else:
                lin.__dict__[_FOLDED_FROM] = mark
        for k, p in self.norm_params.items():
            self.norm.register_parameter(k, p)
            if p is not None:
                p.copy_(self.norm_values[k])
        if self.affine is not None:
            self.norm.elementwise_affine = self.affine


# -- the checks ---------------------------------------------------------------------------------

def _structure_problems(model: nn.Module, groups: "OrderedDict[str, List[str]]") -> Dict[str, str]:
    """Per norm name, why its fold is unsafe on the module structure alone."""
    problems: Dict[str, str] = {}
    readers: Dict[int, List[str]] = {}  # Linear -> the distinct norms paired with it
    norm_of = {n: model.get_submodule(n) for n in groups}
    for norm_name, linear_names in groups.items():
        for linear_name in linear_names:
            names = readers.setdefault(id(model.get_submodule(linear_name)), [])
            if not any(norm_of[other] is norm_of[norm_name] for other in names):
                names.append(norm_name)
    owners: Dict[int, List[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname.rpartition(".")[0])
    for norm_name, linear_names in groups.items():
        for linear_name in linear_names:
            linear = model.get_submodule(linear_name)
            others = [n for n in readers[id(linear)] if norm_of[n] is not norm_of[norm_name]]
            if others:
                problems[norm_name] = (f"Linear {linear_name!r} is paired with another norm too ({', '.join(map(repr, others))}); "
                                       "a Linear can absorb one norm's affine")
            elif linear.__dict__.get(_FOLDED_FROM) is not None:
                problems[norm_name] = f"Linear {linear_name!r} already absorbed the affine of {linear.__dict__[_FOLDED_FROM]!r}"
        for name in [norm_name, *linear_names]:
            module = model.get_submodule(name)
            for p in module.parameters(recurse=False):
                shared = sorted({o for o in owners.get(id(p), []) if model.get_submodule(o) is not module})
                if shared:
                    problems.setdefault(norm_name, f"a parameter of {name!r} is shared with {', '.join(map(repr, shared))} (tied weights)")
    return problems


class _Tracer(torch.fx.Tracer):
    """Traces into ``through`` (the root and the modules containing a norm or Linear of a pair);
    every other module, the pairs' modules included, is one opaque call."""

    def __init__(self, through: set) -> None:
        super().__init__()
        self.through = through

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) not in self.through


def _trace(model: nn.Module, groups: "OrderedDict[str, List[str]]") -> Tuple[Optional[torch.fx.Graph], str]:
    relevant = {id(model.get_submodule(n)) for norm_name, linears in groups.items() for n in [norm_name, *linears]}
    through = {id(model)}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in relevant:
            parts = name.split(".")
            through.update(id(model.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))
    try:
        return _Tracer(through).trace(model), ""
    except Exception as exc:  # data-dependent control flow, unsupported ops, ...
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _describe(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    if node.op == "output":
        return "the model's output directly"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{'method ' if node.op == 'call_method' else ''}{name}"


def _dataflow_problem(model: nn.Module, graph: torch.fx.Graph, norm_name: str, linear_names: List[str]) -> Optional[str]:
    """Why the traced graph does not show "norm -> only these Linears -> read only the norm"."""
    path = {id(m): n for n, m in model.named_modules()}  # fx's name of each module
    norm_path = path[id(model.get_submodule(norm_name))]
    linear_paths = {path[id(model.get_submodule(n))] for n in linear_names}
    for node in graph.nodes:
        if node.op == "get_attr" and any(str(node.target).startswith(p + ".") for p in [norm_path, *linear_paths]):
            return f"the model reads the parameter {node.target!r} directly"
        if node.op != "call_module":
            continue
        if node.target == norm_path:
            for user in node.users:
                if not (user.op == "call_module" and user.target in linear_paths and user.args == (node,) and not user.kwargs):
                    return f"the output of {norm_name!r} also goes to {_describe(user)}"
        elif node.target in linear_paths:
            src = node.args[0] if node.args else None
            if not (isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target == norm_path) or len(node.args) != 1 or node.kwargs:
                what = _describe(src) if isinstance(src, torch.fx.Node) else repr(src)
                return f"Linear {node.target!r} is also called on {what}, not only on {norm_name!r}"
    return None


def _run(model: nn.Module, example_inputs) -> Any:
    args, kwargs = (example_inputs, {}) if isinstance(example_inputs, tuple) else \
        ((), example_inputs) if isinstance(example_inputs, dict) else ((example_inputs,), {})
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)  # dropout in training mode draws the same masks before and after
        return model(*args, **kwargs)


# -- fold -----------------------------------------------------------------------------------------

def fold(model: nn.Module, pairs: Optional[Iterable[Sequence[str]]] = None, *, example_inputs=None) -> List[FoldRecord]:
    """Fold norm affines into the following Linear layers, in place; returns what was folded.

    Args:
        model: the model (put it in ``eval()`` mode; the result is for inference).
        pairs: ``(norm_name, linear_name)`` pairs of qualified submodule names. ``None``: every
            norm directly followed by an ``nn.Linear`` inside an ``nn.Sequential``.
        example_inputs: optional inputs of ``model`` (a tensor, a tuple of positional
            arguments, or a dict of keyword arguments): each fold is then checked on the
            model's outputs, and undone if they change. Needed when ``torch.fx`` cannot trace
            the model.

    Each norm's fold is done only if it passes the checks of the module docstring (structure,
    traced dataflow, outputs on ``example_inputs``); so the model's outputs are unchanged up to
    rounding (the folded weights are computed in float64). A pair that fails, or that cannot
    be checked (untraceable model, no ``example_inputs``): ``ValueError`` for explicit
    ``pairs``, with the model left as it was; a :class:`FoldWarning` and a skip for pairs found
    automatically. Norms without an affine, or already folded, are left alone.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module as model, got {type(model).__name__}")
    if pairs is not None and isinstance(pairs, (str, bytes)):
        raise TypeError(f"pairs must be an iterable of (norm_name, linear_name) pairs, got {pairs!r}")
    explicit = pairs is not None
    groups = _validate(model, pairs if explicit else _auto_pairs(model))
    for norm_name in list(groups):
        norm = model.get_submodule(norm_name)
        gain = getattr(norm, "weight", None)
        beta = getattr(norm, "bias", None) if isinstance(getattr(norm, "bias", None), torch.Tensor) else None
        if (gain is None and beta is None) or (is_hf_rms_norm(norm) and bool((gain == 1).all()) and beta is None):
            del groups[norm_name]  # nothing to fold (no affine, or already folded)
    seen: Dict[int, str] = {}
    for norm_name in list(groups):  # one norm reached under two names: fold it once
        key = id(model.get_submodule(norm_name))
        if key in seen:
            groups[seen[key]] += [n for n in groups.pop(norm_name) if n not in groups[seen[key]]]
        else:
            seen[key] = norm_name
    if not groups:
        return []

    problems = _structure_problems(model, groups)
    graph, trace_error = _trace(model, groups)
    for norm_name, linear_names in groups.items():
        if norm_name in problems:
            continue
        if graph is not None:
            why = _dataflow_problem(model, graph, norm_name, linear_names)
            if why:
                problems[norm_name] = why
        elif example_inputs is None:
            problems[norm_name] = (f"torch.fx cannot trace the model ({trace_error}), so the dataflow cannot be "
                                   "checked; pass example_inputs= to check the outputs instead")

    def refuse(items: Dict[str, str]) -> None:
        lines = "\n".join(f"  {n} -> {', '.join(groups[n])}: {why}" for n, why in items.items())
        if explicit:
            raise ValueError(f"fold: these pairs cannot be folded without changing the model's outputs, or "
                             f"that cannot be ruled out; nothing was folded:\n{lines}")
        warnings.warn(f"fold skipped (norm -> Linears: reason):\n{lines}", FoldWarning, stacklevel=3)

    if problems:
        refuse(problems)  # raises for explicit pairs
    todo = [(n, ls) for n, ls in groups.items() if n not in problems]
    reference = None if example_inputs is None else _run(model, example_inputs)
    done: List[Tuple[_Snapshot, FoldRecord]] = []
    changed: Dict[str, str] = {}
    for norm_name, linear_names in todo:
        norm = model.get_submodule(norm_name)
        linears = [model.get_submodule(n) for n in linear_names]
        snap = _Snapshot(norm, linears)
        gain = getattr(norm, "weight", None)
        beta = getattr(norm, "bias", None) if isinstance(getattr(norm, "bias", None), torch.Tensor) else None
        for linear in linears:
            _fold_into(linear, gain, beta)
            linear.__dict__[_FOLDED_FROM] = norm_name
        _strip_affine(norm)
        if reference is not None:
            why = outputs_differ(reference, _run(model, example_inputs))
            if why:
                snap.restore()
                changed[norm_name] = f"on example_inputs, {why}"
                if explicit:
                    break
                continue
        done.append((snap, FoldRecord(norm_name, tuple(linear_names), beta is not None)))
    if changed:
        if explicit:
            for snap, _ in reversed(done):
                snap.restore()
        refuse(changed)
    return [record for _, record in done]
