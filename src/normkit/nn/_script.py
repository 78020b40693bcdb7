"""TorchScript stand-ins for the normkit norms whose gain torch's modules cannot express.

``torch.jit.script`` calls ``__prepare_scriptable__``; a plain normkit norm answers with torch's
own module sharing its parameters (``normalization._torch_twin``). A zero-centred gain
``1 + weight``, or RMS norm's ``casting_mode="llama"``, has no torch module, and handing over
``torch.nn.RMSNorm`` would silently scale by ``weight`` instead of ``1 + weight``. These modules
compute normkit's formula with torch's functional norms, in the compute dtype (float32, float64
for float64 input) and rounded to the input dtype as normkit rounds, holding the *same*
parameter objects (training the scripted model trains them). They agree with normkit up to the
rounding of the statistics, as the torch twins do.

(No ``from __future__ import annotations`` here: TorchScript reads these annotations.)
"""

from typing import List, Optional

import torch
from torch import Tensor

__all__ = ["ScriptLayerNorm", "ScriptRMSNorm"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # normkit.reference.compute_dtype, restated: TorchScript compiles only what it can see
    return torch.float64 if dtype == torch.float64 else torch.float32


class ScriptLayerNorm(torch.nn.Module):
    """``normkit.nn.LayerNorm(..., zero_centered_weight=True)`` for TorchScript."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.normalized_shape: List[int] = list(module.normalized_shape)
        self.eps: float = float(module.eps)
        self.weight = module.weight
        self.bias = module.bias
        self.train(module.training)

    def forward(self, input: Tensor) -> Tensor:
        acc = _compute_dtype(input.dtype)
        gain = 1.0 + self.weight.to(acc)
        bias = self.bias
        shift = None if bias is None else bias.to(acc)
        y = torch.nn.functional.layer_norm(input.to(acc), self.normalized_shape, gain, shift, self.eps)
        return y.to(input.dtype)


class ScriptRMSNorm(torch.nn.Module):
    """``normkit.nn.RMSNorm`` with ``zero_centered_weight=True`` and/or ``casting_mode="llama"``
    for TorchScript."""

    eps: Optional[float]

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.normalized_shape: List[int] = list(module.normalized_shape)
        self.eps = None if module.eps is None else float(module.eps)
        self.zero_centered: bool = bool(module.zero_centered_weight)
        self.llama: bool = module.casting_mode == "llama"
        self.weight = module.weight
        self.train(module.training)

    def forward(self, input: Tensor) -> Tensor:
        acc = _compute_dtype(input.dtype)
        gain = self.weight
        if self.zero_centered:
            gain = 1.0 + self.weight.to(acc)
        x = input.to(acc)
        if self.llama:  # x_hat rounded to the input dtype, then the gain (HF LlamaRMSNorm)
            x_hat = torch.nn.functional.rms_norm(x, self.normalized_shape, None, self.eps).to(input.dtype)
            return (gain * x_hat).to(input.dtype)
        y = torch.nn.functional.rms_norm(x, self.normalized_shape, gain.to(acc), self.eps)
        return y.to(input.dtype)
