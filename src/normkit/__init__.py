"""normkit: layer normalization and its family for PyTorch.

Exact reference semantics (:mod:`normkit.reference`), fast backends (C++ on CPU, Triton on
GPU) chosen per call (:mod:`normkit.backends`), drop-in modules (:mod:`normkit.nn`), input
scalers (:mod:`normkit.data`) and practitioner tools (:mod:`normkit.tools`).
"""

from normkit import backends, data, errors, nn, reference
from normkit.backends import use_backend  # alias of normkit.backends.use
from normkit.functional import layer_norm, rms_norm
from normkit.functional_channels import layer_norm_2d, layer_norm_chw
from normkit.norm_linear import layer_norm_linear, rms_norm_linear
from normkit.tools import NormHealthWarning, convert, export_onnx, fold, monitor, revert

__version__ = "0.1.0"

__all__ = [
    "NormHealthWarning",
    "backends",
    "convert",
    "data",
    "errors",
    "export_onnx",
    "fold",
    "layer_norm",
    "layer_norm_2d",
    "layer_norm_chw",
    "layer_norm_linear",
    "monitor",
    "nn",
    "reference",
    "revert",
    "rms_norm",
    "rms_norm_linear",
    "use_backend",
    "__version__",
]
