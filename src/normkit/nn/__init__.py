"""normkit modules: drop-in normalization layers, DyT, and layer-normalized recurrent networks."""

from normkit.nn.normalization import LayerNorm, RMSNorm
from normkit.nn.dyt import DyT
from normkit.nn.channels import ChannelLayerNorm, LayerNorm2d, LayerNormCHW
from normkit.nn.rnn import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell

__all__ = ["LayerNorm", "RMSNorm", "DyT", "LayerNorm2d", "LayerNormCHW", "ChannelLayerNorm",
           "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]
