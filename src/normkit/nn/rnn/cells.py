r"""Single-step layer-normalized recurrent cells: :class:`LayerNormLSTMCell`, :class:`LayerNormGRUCell`.

Same constructor and call interface as :class:`torch.nn.LSTMCell` / :class:`torch.nn.GRUCell`
(plus a keyword-only ``eps``). The step is the reference step of
:mod:`normkit.nn.rnn.reference`; for whole sequences use :class:`normkit.nn.LayerNormLSTM` /
:class:`~normkit.nn.LayerNormGRU`, whose fused path is much faster than a Python loop over a cell.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from normkit.nn.rnn.reference import gru_cell_ref, lstm_cell_ref

__all__ = ["LayerNormLSTMCell", "LayerNormGRUCell"]


def reset_rnn_parameters(module: nn.Module, hidden_size: int) -> None:
    r"""Initialization shared by every normkit RNN module.

    Weight matrices (names starting with ``weight_``) are uniform in
    :math:`\pm 1/\sqrt{H}` as in :class:`torch.nn.LSTM`; layer-norm gains (``ln_*_weight``) are
    ones; every additive bias (``bias_*``, ``ln_*_bias``) is zero — they play the role of the
    layer-norm shifts :math:`\beta`, which the paper initializes to zero.
    """
    stdv = 1.0 / math.sqrt(hidden_size) if hidden_size > 0 else 0.0
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            if name.startswith("weight_"):
                p.uniform_(-stdv, stdv)
            elif name.startswith("ln_") and "_weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def fold_torch_lstm_bias(module: nn.Module, state_dict: dict, prefix: str, suffixes: Sequence[str]) -> None:
    r"""Fold :class:`torch.nn.LSTM`'s second gate bias into the single LN-LSTM gate bias, in the
    copy of a state_dict that ``load_state_dict`` hands to ``_load_from_state_dict``.

    torch's LSTM adds both of its biases to the gate pre-activations,
    :math:`W_{ih} x + b_{ih} + W_{hh} h + b_{hh}`, so only :math:`b_{ih} + b_{hh}` matters; the
    LN-LSTM adds its gate bias :math:`b` at the same place, after the two normalized
    projections: :math:`\mathrm{LN}(W_{hh} h) + \mathrm{LN}(W_{ih} x) + b`. Hence
    ``bias_ih{suffix} <- bias_ih{suffix} + bias_hh{suffix}`` and ``bias_hh{suffix}`` is consumed:
    the gate offsets (a forget-gate bias of 1 set on either vector, say) carry over whole.
    Nothing else is changed. A ``bias_hh`` without a ``bias_ih`` of the same shape beside it, or
    for a module built with ``bias=False``, stays in the dict, and ``load_state_dict`` reports
    it as an unexpected key (an error when ``strict``).
    """
    for suffix in suffixes:
        ih, hh = prefix + "bias_ih" + suffix, prefix + "bias_hh" + suffix
        b_ih, b_hh = state_dict.get(ih), state_dict.get(hh)
        if getattr(module, "bias_ih" + suffix, None) is None or not isinstance(b_hh, Tensor):
            continue
        if not isinstance(b_ih, Tensor) or b_ih.shape != b_hh.shape:
            continue
        with torch.no_grad():
            state_dict[ih] = b_ih + b_hh
        del state_dict[hh]


def check_positive_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_input_dtype(name: str, input: Tensor, weight: Tensor) -> None:
    """The input must have the parameters' dtype (a ``ValueError``, as :class:`torch.nn.LSTM` raises)."""
    if input.dtype != weight.dtype:
        hint = f"input.to({weight.dtype})"
        if input.dtype.is_floating_point:
            hint += f", or convert the model: model.to({input.dtype})"
        raise ValueError(
            f"{name}: input dtype ({input.dtype}) does not match the parameters' dtype ({weight.dtype}). "
            f"Convert the input: {hint}"
        )
    if input.device != weight.device:
        raise ValueError(f"{name}: input is on {input.device} but the parameters are on {weight.device}")


class _CellBase(nn.Module):
    _gates = 1
    _cell = "RNNCell"

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *, eps: float = 1e-5):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = check_positive_size("input_size", input_size)
        self.hidden_size = check_positive_size("hidden_size", hidden_size)
        self.bias = bool(bias)
        self.eps = float(eps)
        G, H = self._gates * hidden_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(G, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(G, H, **factory))
        self._make_biases(G, H, factory)
        self.ln_ih_weight = nn.Parameter(torch.empty(G, **factory))
        self.ln_hh_weight = nn.Parameter(torch.empty(G, **factory))
        self._make_extra(G, H, factory)
        self.reset_parameters()

    def _make_biases(self, G, H, factory):  # pragma: no cover - overridden
        raise NotImplementedError

    def _make_extra(self, G, H, factory):
        pass

    def reset_parameters(self) -> None:
        reset_rnn_parameters(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        return s

    def _check(self, input: Tensor, hx: Tuple[Optional[Tensor], ...], names: Tuple[str, ...]):
        """Validate input / state shapes; returns ``(input, states, batched)`` with a batch dim."""
        if not isinstance(input, Tensor):
            raise TypeError(f"{self._cell}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{self._cell}: expected input to be 1-D or 2-D, got {input.dim()}-D instead")
        if input.shape[-1] != self.input_size:
            raise ValueError(
                f"{self._cell}: input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.shape[-1]}"
            )
        check_input_dtype(self._cell, input, self.weight_ih)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        B = x.shape[0]
        states = []
        for name, s in zip(names, hx):
            if s is None:
                s = x.new_zeros(B, self.hidden_size)
            else:
                want = (B, self.hidden_size) if batched else (self.hidden_size,)
                if tuple(s.shape) != want:
                    raise ValueError(f"{self._cell}: expected {name} of shape {want}, got {tuple(s.shape)}")
                if s.dtype != x.dtype or s.device != x.device:
                    raise ValueError(
                        f"{self._cell}: expected {name} with the input's dtype and device "
                        f"({x.dtype}, {x.device}), got ({s.dtype}, {s.device})"
                    )
                s = s if batched else s.unsqueeze(0)
            states.append(s)
        return x, states, batched


class LayerNormLSTMCell(_CellBase):
    r"""A layer-normalized LSTM cell (Ba, Kiros & Hinton 2016, supplementary material).

    .. math::

        (i, f, g, o) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + \mathrm{LN}(W_{ih} x;\ \alpha_x) + b

        c' = \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \qquad
        h' = \sigma(o) \odot \tanh\big(\mathrm{LN}(c';\ \alpha_c, \beta_c)\big)

    ``LN`` normalizes the whole ``4 * hidden_size`` pre-activation vector (as the paper does);
    gate order ``(i, f, g, o)`` as :class:`torch.nn.LSTMCell`.

    Args:
        input_size, hidden_size, bias, device, dtype: as :class:`torch.nn.LSTMCell`.
        eps: the layer norms' epsilon.

    Parameters:
        ``weight_ih`` ``(4H, input_size)``, ``weight_hh`` ``(4H, H)``: uniform
        :math:`\pm 1/\sqrt{H}`. ``ln_ih_weight`` :math:`\alpha_x`, ``ln_hh_weight``
        :math:`\alpha_h` ``(4H,)`` and ``ln_c_weight`` :math:`\alpha_c` ``(H,)``: ones.
        With ``bias=True`` also ``bias_ih`` :math:`b` ``(4H,)`` and ``ln_c_bias``
        :math:`\beta_c` ``(H,)``, zeros. The two layer norms' shifts and the LSTM bias would add
        up to one vector, so there is a single gate bias ``b`` (no ``bias_hh``); loading a
        :class:`torch.nn.LSTMCell` state_dict folds its ``bias_hh`` into ``bias_ih``, as
        :class:`~normkit.nn.LayerNormLSTM` does (see there).

    Shape:
        input ``(B, input_size)`` or ``(input_size,)``; ``hx = (h, c)`` each ``(B, H)`` or
        ``(H,)``, zeros when ``None``; returns ``(h', c')`` of the same shape.
    """

    _gates = 4
    _cell = "LayerNormLSTMCell"

    def _make_biases(self, G, H, factory):
        self.bias_ih = nn.Parameter(torch.empty(G, **factory)) if self.bias else None

    def _make_extra(self, G, H, factory):
        self.ln_c_weight = nn.Parameter(torch.empty(H, **factory))
        self.ln_c_bias = nn.Parameter(torch.empty(H, **factory)) if self.bias else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        fold_torch_lstm_bias(self, state_dict, prefix, ("",))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if hx is None:
            hx = (None, None)
        elif not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{self._cell}: hx must be a tuple (h, c), got {type(hx).__name__}")
        x, (h, c), batched = self._check(input, tuple(hx), ("hx[0]", "hx[1]"))
        h, c = lstm_cell_ref(
            x, h, c, self.weight_ih, self.weight_hh, self.bias_ih,
            self.ln_ih_weight, self.ln_hh_weight, self.ln_c_weight, self.ln_c_bias, self.eps,
        )
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class LayerNormGRUCell(_CellBase):
    r"""A layer-normalized GRU cell.

    .. math::

        (x_r, x_z, x_n) = \mathrm{LN}(W_{ih} x;\ \alpha_x) + b_{ih}, \qquad
        (h_r, h_z, h_n) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + b_{hh}

        r = \sigma(x_r + h_r), \quad z = \sigma(x_z + h_z), \quad
        n = \tanh(x_n + r \odot h_n), \qquad h' = (1 - z) \odot n + z \odot h

    Gate order ``(r, z, n)`` and the placement of ``r`` (on the recurrent part *including* its
    bias) as :class:`torch.nn.GRUCell`; ``LN`` normalizes the whole ``3H`` vector.

    Parameters:
        ``weight_ih`` ``(3H, input_size)``, ``weight_hh`` ``(3H, H)`` uniform
        :math:`\pm 1/\sqrt{H}`; ``ln_ih_weight`` :math:`\alpha_x`, ``ln_hh_weight``
        :math:`\alpha_h` ``(3H,)`` ones; with ``bias=True``, ``bias_ih`` and ``bias_hh``
        ``(3H,)``, zeros: they are the two layer norms' shifts (``bias_hh`` is not redundant,
        since ``r`` scales it).

    Shape:
        input ``(B, input_size)`` or ``(input_size,)``; ``hx`` ``(B, H)`` or ``(H,)`` (zeros
        when ``None``); returns ``h'`` of the same shape.
    """

    _gates = 3
    _cell = "LayerNormGRUCell"

    def _make_biases(self, G, H, factory):
        self.bias_ih = nn.Parameter(torch.empty(G, **factory)) if self.bias else None
        self.bias_hh = nn.Parameter(torch.empty(G, **factory)) if self.bias else None

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        x, (h,), batched = self._check(input, (hx,), ("hx",))
        h = gru_cell_ref(
            x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            self.ln_ih_weight, self.ln_hh_weight, self.eps,
        )
        return h if batched else h.squeeze(0)
