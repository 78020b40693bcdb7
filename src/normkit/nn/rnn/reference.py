r"""Reference layer-normalized LSTM and GRU: the equations, one time step at a time.

Plain PyTorch ops differentiated by autograd, written to be read against the paper (Ba, Kiros
& Hinton 2016, section 3.1 and the LN-LSTM equations of the supplementary material). The fast
path (:mod:`normkit.nn.rnn.sequence`) is tested against these functions, and is replaced by them
when a module's ``fast_path`` attribute is set to ``False`` (a debugging run, or a check of the
fast path).

Conventions shared by both files:

* ``LN(v; g)`` normalizes over the *whole* gate pre-activation vector (``4H`` for the LSTM,
  ``3H`` for the GRU), as the paper writes it, not each gate block separately. Statistics are
  computed in the compute dtype (float32, float64 for float64 input), with the two-pass variance
  of :mod:`normkit.reference`.
* LSTM gate order ``(i, f, g, o)`` — the order of :class:`torch.nn.LSTM`, so ``weight_ih``
  rows ``[0:H]`` drive the input gate, ``[H:2H]`` the forget gate, ``[2H:3H]`` the cell
  candidate and ``[3H:4H]`` the output gate. GRU gate order ``(r, z, n)`` as :class:`torch.nn.GRU`.
* Sequences are in the *packed* layout used by :class:`torch.nn.utils.rnn.PackedSequence`:
  ``data`` is ``(N, features)`` with the rows of time step ``t`` at
  ``offsets[t] : offsets[t] + batch_sizes[t]`` and ``batch_sizes`` non-increasing, so the
  active sequences at step ``t`` are rows ``0 .. batch_sizes[t] - 1`` of the state. A dense
  ``(T, B, features)`` tensor is the special case ``batch_sizes = [B] * T``.

LSTM step (``x`` the input, ``h, c`` the previous state):

.. math::

    (i, f, g, o) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + \mathrm{LN}(W_{ih} x;\ \alpha_x) + b

    c' = \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \qquad
    h' = \sigma(o) \odot \tanh\big(\mathrm{LN}(c';\ \alpha_c, \beta_c)\big)

GRU step:

.. math::

    (x_r, x_z, x_n) = \mathrm{LN}(W_{ih} x;\ \alpha_x) + b_{ih}, \qquad
    (h_r, h_z, h_n) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + b_{hh}

    r = \sigma(x_r + h_r), \quad z = \sigma(x_z + h_z), \quad n = \tanh(x_n + r \odot h_n),
    \qquad h' = (1 - z) \odot n + z \odot h

(``r`` multiplies the normalized, shifted recurrent part ``h_n`` — the placement of
:class:`torch.nn.GRU`, which applies ``r`` to ``W_{hn} h + b_{hn}``.)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from normkit.reference import compute_dtype, normalize

__all__ = [
    "layer_norm_ref",
    "lstm_input_ref",
    "lstm_recurrence_ref",
    "lstm_cell_ref",
    "gru_input_ref",
    "gru_recurrence_ref",
    "gru_cell_ref",
    "lstm_recurrence_layer_ref",
    "gru_recurrence_layer_ref",
    "lstm_layer_ref",
    "gru_layer_ref",
]


def layer_norm_ref(v: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """``LN(v; weight, bias)`` over the last dim, statistics in the compute dtype."""
    y, _, _ = normalize(v.to(compute_dtype(v.dtype)), (-1,), weight, bias, eps, False)
    return y.to(v.dtype)


def lstm_input_ref(x: Tensor, w_ih: Tensor, b: Optional[Tensor], ln_ih_w: Tensor, eps: float) -> Tensor:
    r"""The input part of the LSTM gates, :math:`\mathrm{LN}(W_{ih} x;\ \alpha_x) + b`, ``(rows, 4H)``.

    It does not depend on the state, so the fused path computes it for all steps at once."""
    return layer_norm_ref(F.linear(x, w_ih), ln_ih_w, b, eps)


def lstm_recurrence_ref(
    xg: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    ln_hh_w: Tensor,
    ln_c_w: Tensor,
    ln_c_b: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    r"""One LN-LSTM step given its input part ``xg`` (:func:`lstm_input_ref`); returns ``(h', c')``.

    .. math::

        (i, f, g, o) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + x_g, \qquad
        c' = \sigma(f) \odot c + \sigma(i) \odot \tanh(g), \qquad
        h' = \sigma(o) \odot \tanh\big(\mathrm{LN}(c';\ \alpha_c, \beta_c)\big)
    """
    gates = layer_norm_ref(F.linear(h, w_hh), ln_hh_w, None, eps) + xg
    i, f, g, o = gates.chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(layer_norm_ref(c_new, ln_c_w, ln_c_b, eps))
    return h_new, c_new


def lstm_cell_ref(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b: Optional[Tensor],
    ln_ih_w: Tensor,
    ln_hh_w: Tensor,
    ln_c_w: Tensor,
    ln_c_b: Optional[Tensor],
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """One LN-LSTM step on ``(B, I)`` input and ``(B, H)`` state; returns ``(h', c')``."""
    xg = lstm_input_ref(x, w_ih, b, ln_ih_w, eps)
    return lstm_recurrence_ref(xg, h, c, w_hh, ln_hh_w, ln_c_w, ln_c_b, eps)


def gru_input_ref(x: Tensor, w_ih: Tensor, b_ih: Optional[Tensor], ln_ih_w: Tensor, eps: float) -> Tensor:
    r"""The input part of the GRU, :math:`(x_r, x_z, x_n) = \mathrm{LN}(W_{ih} x;\ \alpha_x) + b_{ih}`,
    ``(rows, 3H)``."""
    return layer_norm_ref(F.linear(x, w_ih), ln_ih_w, b_ih, eps)


def gru_recurrence_ref(
    xg: Tensor, h: Tensor, w_hh: Tensor, ln_hh_w: Tensor, b_hh: Optional[Tensor], eps: float
) -> Tensor:
    r"""One LN-GRU step given its input part ``xg = (x_r, x_z, x_n)`` (:func:`gru_input_ref`);
    returns ``h'``.

    .. math::

        (h_r, h_z, h_n) = \mathrm{LN}(W_{hh} h;\ \alpha_h) + b_{hh}, \quad
        r = \sigma(x_r + h_r), \quad z = \sigma(x_z + h_z), \quad
        n = \tanh(x_n + r \odot h_n), \quad h' = (1 - z) \odot n + z \odot h
    """
    x_r, x_z, x_n = xg.chunk(3, dim=-1)
    h_r, h_z, h_n = layer_norm_ref(F.linear(h, w_hh), ln_hh_w, b_hh, eps).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def gru_cell_ref(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    ln_ih_w: Tensor,
    ln_hh_w: Tensor,
    eps: float,
) -> Tensor:
    """One LN-GRU step on ``(B, I)`` input and ``(B, H)`` state; returns ``h'``."""
    return gru_recurrence_ref(gru_input_ref(x, w_ih, b_ih, ln_ih_w, eps), h, w_hh, ln_hh_w, b_hh, eps)


def _step_order(batch_sizes: Sequence[int], reverse: bool) -> Tuple[List[int], List[int]]:
    """Time steps in processing order and the packed row offset of every step."""
    offsets, total = [], 0
    for bs in batch_sizes:
        offsets.append(total)
        total += int(bs)
    steps = list(range(len(batch_sizes)))
    return (steps[::-1] if reverse else steps), offsets


def _run_layer(cell, data: Tensor, batch_sizes: Sequence[int], state: Tuple[Tensor, ...], reverse: bool):
    """Run ``cell(x_t, *state) -> new state`` over a packed sequence.

    The state keeps every sequence's rows; a sequence that has ended (forward direction) or not
    yet started (reverse direction) keeps its rows untouched, so the final state holds each
    sequence's state at its own last processed step.
    """
    steps, offsets = _step_order(batch_sizes, reverse)
    outputs: List[Optional[Tensor]] = [None] * len(steps)
    for t in steps:
        bs = int(batch_sizes[t])
        x_t = data[offsets[t] : offsets[t] + bs]
        new = cell(x_t, *(s[:bs] for s in state))
        state = tuple(torch.cat([n, s[bs:]]) if bs < s.shape[0] else n for n, s in zip(new, state))
        outputs[t] = new[0]
    out = torch.cat(outputs) if outputs else data.new_empty((0, state[0].shape[-1]))
    return out, state


def lstm_recurrence_layer_ref(
    xg: Tensor,
    batch_sizes: Sequence[int],
    h0: Tensor,
    c0: Tensor,
    params: Sequence[Optional[Tensor]],
    eps: float,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The time loop of one LN-LSTM layer, one direction, over the packed input parts ``xg``
    ``(N, 4H)`` (:func:`lstm_input_ref` of every step): what the fused autograd function of
    :mod:`normkit.nn.rnn.sequence` computes. ``params = (w_hh, ln_hh_w, ln_c_w, ln_c_b)``.
    Returns ``(out, h_n, c_n)``."""

    def cell(x, h, c):
        return lstm_recurrence_ref(x, h, c, *params, eps)

    out, (h_n, c_n) = _run_layer(cell, xg, batch_sizes, (h0, c0), reverse)
    return out, h_n, c_n


def gru_recurrence_layer_ref(
    xg: Tensor,
    batch_sizes: Sequence[int],
    h0: Tensor,
    params: Sequence[Optional[Tensor]],
    eps: float,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """The time loop of one LN-GRU layer over the packed input parts ``xg`` ``(N, 3H)``
    (:func:`gru_input_ref` of every step); ``params = (w_hh, ln_hh_w, b_hh)``. Returns ``(out, h_n)``."""

    def cell(x, h):
        return (gru_recurrence_ref(x, h, *params, eps),)

    out, (h_n,) = _run_layer(cell, xg, batch_sizes, (h0,), reverse)
    return out, h_n


def lstm_layer_ref(
    data: Tensor,
    batch_sizes: Sequence[int],
    h0: Tensor,
    c0: Tensor,
    params: Sequence[Optional[Tensor]],
    eps: float,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LN-LSTM layer, one direction, over packed ``data`` ``(N, I)``.

    ``params = (w_ih, w_hh, b, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b)``. Returns ``(out, h_n, c_n)``
    with ``out`` ``(N, H)`` in the packed layout of ``data``. The input parts of all steps are
    computed first (row by row, as the cell would), then the time loop.
    """
    w_ih, w_hh, b, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b = params
    xg = lstm_input_ref(data, w_ih, b, ln_ih_w, eps)
    return lstm_recurrence_layer_ref(xg, batch_sizes, h0, c0, (w_hh, ln_hh_w, ln_c_w, ln_c_b), eps, reverse)


def gru_layer_ref(
    data: Tensor,
    batch_sizes: Sequence[int],
    h0: Tensor,
    params: Sequence[Optional[Tensor]],
    eps: float,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One LN-GRU layer, one direction; ``params = (w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w)``.
    Returns ``(out, h_n)``."""
    w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_hh_w = params
    xg = gru_input_ref(data, w_ih, b_ih, ln_ih_w, eps)
    return gru_recurrence_layer_ref(xg, batch_sizes, h0, (w_hh, ln_hh_w, b_hh), eps, reverse)
