"""normkit modules: drop-in normalization layers and layer-normalized recurrent networks."""

from normkit.nn.normalization import LayerNorm, RMSNorm
from normkit.nn.channels import ChannelLayerNorm, LayerNorm2d, LayerNormCHW
from normkit.nn.rnn import LayerNormGRU, LayerNormGRUCell, LayerNormLSTM, LayerNormLSTMCell

__all__ = ["LayerNorm", "RMSNorm", "LayerNorm2d", "LayerNormCHW", "ChannelLayerNorm",
           "LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]
