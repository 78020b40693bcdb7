r"""``export_onnx``: export a model that uses normkit layers to ONNX, and check the result.

normkit's kernels run behind a ``torch.library`` custom op that ONNX exporters cannot see into.
While an export runs (``torch.onnx.is_in_onnx_export()``, true under both the TorchScript and
the dynamo exporter), :mod:`normkit.functional` therefore emits standard ops instead:

===========================  ====================================================================
normkit call                 ONNX graph
===========================  ====================================================================
``layer_norm``               ``LayerNormalization`` (opset >= 17)
``rms_norm``                 ``RMSNormalization`` (opset >= 23, dynamo exporter; onnxruntime
                             >= 1.22 runs it), else ``Pow, ReduceMean, Add, Sqrt, Div/Reciprocal,
                             Mul``
fused ``residual=``          ``Add`` followed by the norm; ``prenorm=True`` also outputs the sum
``LayerNorm2d`` (NCHW)       ``ReduceMean``-based graph over the channel axis
``LayerNormCHW``             ``LayerNormalization`` over ``(C, H, W)`` with the broadcast
                             per-channel affine as constant initializers
===========================  ====================================================================

(``LayerNormCHW``'s broadcast affine fixes ``H`` and ``W`` in the file; only the batch stays
dynamic.)

:func:`export_onnx` exports in ``eval()`` mode, by default at opset 18 with the dynamo exporter
and with dynamic dims: every input dim the model accepts at another size (tried in PyTorch
first) is passed as ``torch.export.Dim.AUTO``, so batch and sequence length stay symbolic in the
file and feature dims stay fixed. Then (``check=True``) it runs the file in onnxruntime on the
example inputs *and* on inputs with the symbolic dims resized, and compares both with PyTorch.

Which opsets export current Hugging Face models (transformers 5.x, torch 2.13, tiny models from
configs, converted or not): Llama, GPT-2 and Gemma all export and check at 18, 20, 21 and 23.
At 17 the TorchScript exporter fails on the mask code's ``aten::diff`` (it has no lowering for it
at any opset), and the dynamo exporter, which builds opset 18 and converts down, leaves Llama's
and Gemma's files at 18 and writes GPT-2 an invalid opset-17 file (``Split`` with opset 18's
``num_outputs``). A failed export for a missing lowering raises a ``RuntimeError`` naming the
operator (and, for the TorchScript exporter, whether opset 18 exports the model).

onnx/onnxruntime are imported only here, inside the function.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import warnings
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["OnnxExport", "export_onnx", "onnx_op_types"]


@dataclasses.dataclass
class OnnxExport:
    """What :func:`export_onnx` produced."""

    path: str
    opset: int  # as written in the file
    exporter: str  # "dynamo" or "torchscript"
    op_types: Dict[str, int]  # op type -> count in the main graph
    max_abs_error: Optional[float] = None  # onnxruntime vs PyTorch, when checked
    # the input shapes onnxruntime was checked on ("(2, 13)" per input, joined by ", "): the
    # example's, and with the file's dynamic dims resized when it has any
    checked_shapes: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        ops = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(self.op_types.items()))
        err = "" if self.max_abs_error is None else f", onnxruntime max |error| {self.max_abs_error:.2e}"
        if len(self.checked_shapes) > 1:
            err += " on inputs " + " and ".join(f"[{s}]" for s in self.checked_shapes)
        return f"{self.path} (opset {self.opset}, {self.exporter} exporter{err}): {ops}"


def onnx_op_types(path) -> Dict[str, int]:
    """Op types (with counts) of the main graph of the ONNX file at ``path``."""
    import onnx  # lazily: optional dependency

    model = onnx.load(os.fspath(path))
    return dict(Counter(node.op_type for node in model.graph.node))


def _file_opset(path: str) -> int:
    import onnx

    model = onnx.load(path, load_external_data=False)
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=-1)


def _flat_tensors(value) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat_tensors(v)]
    return []


class _Positional(nn.Module):
    """Calls the model with positional arguments only. The TorchScript exporter fills every
    parameter of ``forward`` it was not given with its default, positionally, which breaks
    keyword-only arguments such as normkit's ``prenorm``/``dropout_p``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def _modes(model: nn.Module) -> List[Tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _run_onnxruntime(path: str, inputs: Sequence[Tensor]) -> List:
    import onnxruntime as ort  # lazily: optional dependency

    try:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise RuntimeError(f"onnxruntime cannot load {path}: {exc}") from exc
    names = [i.name for i in session.get_inputs()]
    if len(names) > len(inputs):
        raise RuntimeError(f"the ONNX graph expects {len(names)} inputs ({names}) but {len(inputs)} tensors were given")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
    return session.run(None, feeds)


def _map_tensors(value, fn, other=lambda v: v):
    """``value`` with every tensor replaced by ``fn(tensor)`` (and everything else by ``other``)."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn, other) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn, other) for k, v in value.items()}
    return other(value)


def _other_size(n: int) -> int:
    return n - 1 if n >= 3 else n + 1  # never 0 or 1, which torch.export specializes


def _resized(args: tuple, sizes: Dict[Tuple[int, int], int]) -> tuple:
    """``args`` with dim ``d`` of the ``k``-th tensor resized to ``sizes[k, d]``. The new tensor
    is a slice of the old one and its flip (shifted by one along the dim), so token ids stay
    valid ids and masks stay masks, yet the values differ from the example's."""
    counter = iter(range(len(_flat_tensors(args))))

    def resize(t: Tensor) -> Tensor:
        k = next(counter)
        for d in range(t.dim()):
            if (k, d) in sizes:
                t = torch.cat([t, t.flip(d)], d).narrow(d, 1, sizes[k, d])
        return t.contiguous()

    return _map_tensors(args, resize)


def _free_dims(model: nn.Module, args: tuple) -> set:
    """The ``(tensor index, dim)`` pairs the model accepts at another size. Dims of equal size
    are resized together (``input_ids`` and ``attention_mask`` share batch and sequence), one
    size at a time; a group the model rejects (a feature dim a weight pins) stays fixed."""
    groups: Dict[int, List[Tuple[int, int]]] = {}
    for k, t in enumerate(_flat_tensors(args)):
        for d, n in enumerate(t.shape):
            if n >= 2:
                groups.setdefault(n, []).append((k, d))
    free = set()
    for n, members in groups.items():
        try:
            model(*_resized(args, {m: _other_size(n) for m in members}))
        except Exception:  # the model needs this size: export it fixed
            continue
        free.update(members)
    return free


def _dynamic_shapes(args: tuple, free: set) -> tuple:
    """``dynamic_shapes`` for ``torch.onnx.export(dynamo=True)``: ``Dim.AUTO`` for the free dims
    (torch.export may still fix one the traced code specializes on), the rest fixed."""
    counter = iter(range(len(_flat_tensors(args))))

    def spec(t: Tensor):
        k = next(counter)
        return {d: torch.export.Dim.AUTO for d in range(t.dim()) if (k, d) in free}

    return _map_tensors(args, spec, lambda v: None)


def _symbolic_dims(path: str) -> List[List[Optional[str]]]:
    """Per graph input (initializers excluded), the symbolic name of each dim (``None``: fixed)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    return [
        [d.dim_param or None for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
        if i.name not in initializers
    ]


def _exported_dynamic(program) -> Optional[List[List[bool]]]:
    """Per tensor input of the program torch.export made (``ONNXProgram.exported_program``),
    which dims stayed symbolic; ``None`` when there is no program to read."""
    ep = getattr(program, "exported_program", None)
    if ep is None:
        return None
    ranges = ep.range_constraints

    def is_dynamic(d) -> bool:  # a symbol whose range is one value was specialized
        if isinstance(d, int):
            return False
        vr = ranges.get(getattr(getattr(d, "node", None), "expr", None))
        return vr is None or vr.lower != vr.upper

    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    flags = []
    for name in ep.graph_signature.user_inputs:
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if isinstance(val, Tensor):
            flags.append([is_dynamic(d) for d in val.shape])
    return flags


def _fix_specialized_dims(path: str, dynamic: List[List[bool]], args: tuple) -> None:
    """Write the example's size into every input dim the file calls symbolic but torch.export
    specialized (code that reads a size as a Python int, e.g. ``LayerNormCHW``'s affine
    broadcast over ``(C, H, W)``): torch.onnx names it after the requested ``Dim.AUTO`` all the
    same, and onnxruntime would accept any size there and fail, or compute with the old one."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    changed = False
    for graph_input, flags, t in zip(inputs, dynamic, _flat_tensors(args)):
        for d, (dim, is_dynamic) in enumerate(zip(graph_input.type.tensor_type.shape.dim, flags)):
            if dim.dim_param and not is_dynamic:
                dim.dim_value = int(t.shape[d])  # clears dim_param (a oneof)
                changed = True
    if changed:
        onnx.save(model, path)  # tensors stored outside the file keep their references


def _other_shape_args(args: tuple, symbols: List[List[Optional[str]]]) -> Optional[tuple]:
    """``args`` with every dim the ONNX file has as symbolic resized (the same size for a
    symbol several inputs share); ``None`` when the file has no symbolic dim."""
    by_symbol: Dict[str, int] = {}
    sizes: Dict[Tuple[int, int], int] = {}
    for k, (t, dims) in enumerate(zip(_flat_tensors(args), symbols)):
        for d, name in enumerate(dims[: t.dim()]):
            if name is not None:
                sizes[k, d] = by_symbol.setdefault(name, _other_size(t.shape[d]))
    return _resized(args, sizes) if sizes else None


def _compare(got: List, expected: List[Tensor], atol: float, shapes: str) -> float:
    if len(got) != len(expected):
        raise RuntimeError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(expected)} (inputs {shapes})")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        e = e.detach().float().cpu()
        if tuple(g.shape) != tuple(e.shape):
            raise RuntimeError(f"output {i}: onnxruntime's shape {tuple(g.shape)} differs from PyTorch's {tuple(e.shape)} (inputs {shapes})")
        err = (torch.from_numpy(g).float() - e).abs().max().item() if e.numel() else 0.0
        scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
        if not err <= atol * scale:
            raise RuntimeError(f"output {i}: onnxruntime differs from PyTorch by {err:.3g} (allowed {atol * scale:.3g}, inputs {shapes})")
        worst = max(worst, err)
    return worst


def _shapes(args) -> str:
    return ", ".join(str(tuple(t.shape)) for t in _flat_tensors(args))


_TORCHSCRIPT_MISSING = re.compile(r"Exporting the operator '([\w:.]+)' to ONNX opset version (\d+) is not supported")
_DYNAMO_MISSING = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)'")


def _export_error(exc: Exception, model: nn.Module, args: tuple, opset: int, use_dynamo: bool, kwargs: dict) -> Optional[RuntimeError]:
    """A clearer error for an export that failed for a missing operator lowering (``None``
    for other failures). For the TorchScript exporter it tries the dynamo exporter at opset 18
    in memory (no file written) to say whether that one exports the model."""
    text = str(exc)
    found = _TORCHSCRIPT_MISSING.search(text)
    if found is not None and not use_dynamo:
        op = found.group(1)
        head = f"ONNX export failed: the TorchScript exporter (export_onnx's choice for opset {opset}) has no lowering for {op}"
        try:
            kwargs = {k: v for k, v in kwargs.items() if k not in ("dynamic_axes", "input_names", "output_names")}
            torch.onnx.export(model, args, None, opset_version=18, dynamo=True, **kwargs)
        except Exception as other:
            return RuntimeError(f"{head}; the dynamo exporter at opset 18 fails too: {str(other).strip().splitlines()[-1]}")
        return RuntimeError(f"{head}; the dynamo exporter at opset 18 (export_onnx's default) exports this model: "
                            f"export_onnx(model, args, path, opset=18)")
    found = _DYNAMO_MISSING.search(text)
    if found is not None:
        return RuntimeError(
            f"ONNX export failed: the dynamo exporter has no ONNX lowering for {found.group(1)} (at opset {opset}); "
            f"pass custom_translation_table={{torch.ops.{found.group(1)}.default: onnxscript_function}} "
            f"(see torch.onnx.export), or change the model to avoid the operator"
        )
    return None


def export_onnx(
    model: nn.Module,
    args,
    path,
    opset: int = 18,
    *,
    dynamo: Optional[bool] = None,
    dynamic: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    **export_kwargs,
) -> OnnxExport:
    """Export ``model(*args)`` to ``path`` with normkit layers mapped to standard ONNX ops.

    Args:
        model: the model (exported in ``eval()`` mode; its modes are restored afterwards).
        args: a tensor or a tuple of positional inputs.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, ``>= 17`` (``LayerNormalization`` appeared in opset 17; 23 adds
            ``RMSNormalization``). The default, 18, exports current Hugging Face Llama, GPT-2
            and Gemma models; at 17 their mask code (``aten::diff``) has no TorchScript
            lowering, and the dynamo exporter cannot always convert its opset-18 graph down.
        dynamo: which exporter; ``None`` picks the TorchScript one for opset 17 (the dynamo
            exporter starts at opset 18 and converts down afterwards, which fails for some
            graphs) and the dynamo one from opset 18 on.
        dynamic: with the dynamo exporter, and unless ``dynamic_shapes`` is passed, every dim
            of every input tensor is exported as ``torch.export.Dim.AUTO``: the dims the model
            lets vary (batch, sequence, image size) become symbolic in the file, the rest
            (feature dims a weight pins, dims of size 0 or 1) stay fixed. ``False`` fixes
            every dim to the example's. The TorchScript exporter (opset 17) traces fixed
            shapes unless ``dynamic_axes`` is passed.
        check: run the file in onnxruntime on ``args`` and compare every output with PyTorch's,
            raising ``RuntimeError`` when one differs by more than ``atol`` (scaled by the
            output's magnitude); when the file has dynamic dims, do the same again on inputs
            with those dims resized, so a shape baked into the graph shows.
        **export_kwargs: passed to :func:`torch.onnx.export` (``input_names``,
            ``dynamic_shapes``/``dynamic_axes``, ...).

    Returns:
        an :class:`OnnxExport` (path, opset, exporter, op types, onnxruntime error, the
        input shapes checked).

    Raises:
        RuntimeError: the export failed for an operator without an ONNX lowering (the message
            names it, and for the TorchScript exporter says whether opset 18 exports the
            model), or onnxruntime disagrees with PyTorch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module as model, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < 17:
        raise ValueError(f"opset must be an int >= 17 (ONNX LayerNormalization needs opset 17), got {opset!r}")
    if dynamo is not None and not isinstance(dynamo, bool):
        raise TypeError(f"dynamo must be None, True or False, got {dynamo!r}")
    if not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be True or False, got {dynamic!r}")
    args = args if isinstance(args, tuple) else (args,)
    use_dynamo = opset >= 18 if dynamo is None else dynamo
    path = os.fspath(path)

    export_kwargs.setdefault("verbose", False)  # the dynamo exporter prints its progress otherwise
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            if use_dynamo and dynamic and export_kwargs.get("dynamic_shapes") is None:
                export_kwargs["dynamic_shapes"] = _dynamic_shapes(args, _free_dims(model, args))
            # shapes read by Python code become constants of the traced graph: expected here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # chosen on purpose for opset 17 (see ``dynamo``); torch says it is deprecated
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
            expected = _flat_tensors(model(*args)) if check else []
            exported = model if use_dynamo else _Positional(model)
            try:
                program = torch.onnx.export(exported, args, path, opset_version=int(opset), dynamo=use_dynamo, **export_kwargs)
            except Exception as exc:
                clearer = _export_error(exc, model, args, int(opset), use_dynamo, export_kwargs)
                if clearer is None:
                    raise
                raise clearer from exc
            dynamic_dims = _exported_dynamic(program) if use_dynamo else None
            if dynamic_dims is not None:
                _fix_specialized_dims(path, dynamic_dims, args)
            other = _other_shape_args(args, _symbolic_dims(path)) if check else None
            expected_other = _flat_tensors(model(*other)) if other is not None else []
    finally:
        for module, training in modes:
            module.training = training

    # the file's own opset: the dynamo exporter keeps 18 when it cannot convert down to 17
    result = OnnxExport(path, _file_opset(path), "dynamo" if use_dynamo else "torchscript", onnx_op_types(path))
    if any("norm_fwd" in op for op in result.op_types):
        raise RuntimeError(f"the exported graph still contains normkit's custom op: {result.op_types}")
    if check:
        try:
            worst = _compare(_run_onnxruntime(path, _flat_tensors(args)), expected, atol, _shapes(args))
            if other is not None:
                worst = max(worst, _compare(_run_onnxruntime(path, _flat_tensors(other)), expected_other, atol, _shapes(other)))
        except RuntimeError as exc:
            if use_dynamo and opset < 18:
                raise RuntimeError(f"{exc}\n(the dynamo exporter builds opset 18 and converts it down to {opset}, "
                                   f"which can go wrong: opset=18 avoids the conversion)") from exc
            raise
        result.max_abs_error = worst
        result.checked_shapes = [_shapes(args)] + ([_shapes(other)] if other is not None else [])
    return result
