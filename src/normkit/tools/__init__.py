"""Practitioner tools built on the public normkit API.

* :func:`convert` / :func:`revert` -- swap the norm layers of an existing model in place.
* :func:`monitor` -- record per-layer normalization statistics during training.
* :func:`fold` -- fold a norm's gain and bias into the following ``nn.Linear`` for inference.
* :func:`export_onnx` -- ONNX export with normkit layers mapped to standard ONNX operators.

Heavy optional dependencies (pandas, matplotlib, onnx, onnxruntime) are imported inside the
functions that need them, so importing this package stays cheap.
"""

from normkit.tools.convert import ChannelLayerNorm, ConversionRecord, ConversionSummary, convert, revert
from normkit.tools.fold import FoldRecord, FoldWarning, fold
from normkit.tools.monitor import MonitorCompileWarning, NormHealthWarning, NormMonitor, monitor
from normkit.tools.onnx_export import OnnxExport, export_onnx, onnx_op_types

__all__ = [
    "ChannelLayerNorm",
    "ConversionRecord",
    "ConversionSummary",
    "FoldRecord",
    "FoldWarning",
    "MonitorCompileWarning",
    "NormHealthWarning",
    "NormMonitor",
    "OnnxExport",
    "convert",
    "export_onnx",
    "fold",
    "monitor",
    "onnx_op_types",
    "revert",
]
