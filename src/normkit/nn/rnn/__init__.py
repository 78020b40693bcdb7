"""Layer-normalized recurrent networks (Ba et al. 2016, §3.1 / the LN-LSTM).

========================  ======================================================================
module                    what it holds
========================  ======================================================================
:mod:`.modules`           :class:`LayerNormLSTM` / :class:`LayerNormGRU` (the ``nn.LSTM`` interface)
:mod:`.cells`             :class:`LayerNormLSTMCell` / :class:`LayerNormGRUCell` (one step)
:mod:`.sequence`          the fused per-layer autograd functions and their plain-torch steps
:mod:`.reference`         the equations, step by step in plain torch (the semantics)
========================  ======================================================================

The compiled time loop lives with the other CPU kernels (``src/normkit/csrc/rnn_cpu.cpp``, in
``normkit._C``) and is chosen through the backend registry (``Backend.rnn_steps``):
``normkit.backends.use("reference")`` runs the plain-torch steps.
"""

from normkit.nn.rnn.cells import LayerNormGRUCell, LayerNormLSTMCell
from normkit.nn.rnn.modules import LayerNormGRU, LayerNormLSTM

__all__ = ["LayerNormLSTM", "LayerNormGRU", "LayerNormLSTMCell", "LayerNormGRUCell"]
