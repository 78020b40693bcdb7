"""normkit modules: drop-in normalization layers (and, as they land, recurrent networks)."""

from normkit.nn.normalization import LayerNorm, RMSNorm
from normkit.nn.channels import LayerNorm2d, LayerNormCHW

__all__ = ["LayerNorm", "RMSNorm", "LayerNorm2d", "LayerNormCHW"]
