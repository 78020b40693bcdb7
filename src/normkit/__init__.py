"""normkit: layer normalization and its family for PyTorch.

Exact reference semantics (:mod:`normkit.reference`), fast backends (numba on CPU, Triton on
GPU) chosen per call (:mod:`normkit.backends`), drop-in modules (:mod:`normkit.nn`).
"""

from normkit import nn, reference
from normkit.backends import backends, use_backend
from normkit.functional import layer_norm, rms_norm

__version__ = "0.1.0"

__all__ = ["backends", "layer_norm", "nn", "reference", "rms_norm", "use_backend", "__version__"]
