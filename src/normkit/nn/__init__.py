"""normkit modules: drop-in normalization layers (and, as they land, recurrent networks)."""

from normkit.nn.normalization import LayerNorm, RMSNorm
from normkit.nn.channels import LayerNorm2d, LayerNormCHW
from normkit.nn.rnn import LayerNormGRU, LayerNormLSTM
from normkit.nn.rnn_cells import LayerNormGRUCell, LayerNormLSTMCell

__all__ = ["LayerNorm", "RMSNorm", "LayerNorm2d", "LayerNormCHW",
           "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]
