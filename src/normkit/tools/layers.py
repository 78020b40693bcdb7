"""Which modules are normalization layers, for the tools that look for them (convert, monitor, fold)."""

from __future__ import annotations

from torch import nn

import normkit.nn as nnk

__all__ = ["is_hf_rms_norm", "is_norm_layer"]


def is_hf_rms_norm(module: nn.Module) -> bool:
    """Duck-typed Hugging Face-style RMS norm: class name ends with ``RMSNorm``, it has a
    ``weight`` tensor and a ``variance_epsilon`` or ``eps``, and it is not a torch/normkit one."""
    if isinstance(module, nn.RMSNorm) or not type(module).__name__.endswith("RMSNorm"):
        return False
    return isinstance(getattr(module, "weight", None), nn.Parameter) and (hasattr(module, "variance_epsilon") or hasattr(module, "eps"))


def is_norm_layer(module: nn.Module) -> bool:
    """A normalization layer :mod:`normkit.tools` knows: torch's Layer/RMS/Group/BatchNorm
    (and subclasses: normkit's), normkit's channel norms, Hugging Face RMS norms."""
    known = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nnk.LayerNorm2d, nnk.ChannelLayerNorm)
    return isinstance(module, known) or is_hf_rms_norm(module)
