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

:func:`export_onnx` exports in ``eval()`` mode, then (``check=True``) runs the file in
onnxruntime on the same inputs and compares with PyTorch. onnx/onnxruntime are imported only
here, inside the function.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
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

    def __str__(self) -> str:
        ops = ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(self.op_types.items()))
        err = "" if self.max_abs_error is None else f", onnxruntime max |error| {self.max_abs_error:.2e}"
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

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) > len(inputs):
        raise RuntimeError(f"the ONNX graph expects {len(names)} inputs ({names}) but {len(inputs)} tensors were given")
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs)}
    return session.run(None, feeds)


def export_onnx(
    model: nn.Module,
    args,
    path,
    opset: int = 17,
    *,
    dynamo: Optional[bool] = None,
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
            ``RMSNormalization``).
        dynamo: which exporter; ``None`` picks the TorchScript one for opset 17 (the dynamo
            exporter starts at opset 18 and converts down afterwards, which fails for some
            graphs) and the dynamo one from opset 18 on.
        check: run the file in onnxruntime on ``args`` and compare every output with PyTorch's,
            raising ``RuntimeError`` when one differs by more than ``atol`` (scaled by the
            output's magnitude).
        **export_kwargs: passed to :func:`torch.onnx.export` (``input_names``,
            ``dynamic_axes``/``dynamic_shapes``, ...).

    Returns:
        an :class:`OnnxExport` (path, opset, exporter, op types, onnxruntime error).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects a torch.nn.Module as model, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < 17:
        raise ValueError(f"opset must be an int >= 17 (ONNX LayerNormalization needs opset 17), got {opset!r}")
    if dynamo is not None and not isinstance(dynamo, bool):
        raise TypeError(f"dynamo must be None, True or False, got {dynamo!r}")
    args = args if isinstance(args, tuple) else (args,)
    inputs = _flat_tensors(args)
    use_dynamo = opset >= 18 if dynamo is None else dynamo
    path = os.fspath(path)

    export_kwargs.setdefault("verbose", False)  # the dynamo exporter prints its progress otherwise
    modes = _modes(model)
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shapes read by Python code become constants of the traced graph: expected here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # chosen on purpose for opset 17 (see ``dynamo``); torch says it is deprecated
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
            expected = _flat_tensors(model(*args)) if check else []
            exported = model if use_dynamo else _Positional(model)
            torch.onnx.export(exported, args, path, opset_version=int(opset), dynamo=use_dynamo, **export_kwargs)
    finally:
        for module, training in modes:
            module.training = training

    # the file's own opset: the dynamo exporter keeps 18 when it cannot convert down to 17
    result = OnnxExport(path, _file_opset(path), "dynamo" if use_dynamo else "torchscript", onnx_op_types(path))
    if any("norm_fwd" in op for op in result.op_types):
        raise RuntimeError(f"the exported graph still contains normkit's custom op: {result.op_types}")
    if check:
        got = _run_onnxruntime(path, inputs)
        if len(got) != len(expected):
            raise RuntimeError(f"onnxruntime returned {len(got)} outputs, PyTorch {len(expected)}")
        worst = 0.0
        for i, (g, e) in enumerate(zip(got, expected)):
            e = e.detach().float().cpu()
            err = (torch.from_numpy(g).float() - e).abs().max().item() if e.numel() else 0.0
            scale = max(1.0, e.abs().max().item() if e.numel() else 0.0)
            if not err <= atol * scale:
                raise RuntimeError(f"output {i}: onnxruntime differs from PyTorch by {err:.3g} (allowed {atol * scale:.3g})")
            worst = max(worst, err)
        result.max_abs_error = worst
    return result
