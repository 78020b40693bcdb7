"""normkit modules: drop-in normalization layers (and, as they land, recurrent networks)."""

from normkit.nn.normalization import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
