r"""Layer-normalized recurrent networks with the :class:`torch.nn.LSTM` / :class:`torch.nn.GRU` interface.

:class:`LayerNormLSTM` and :class:`LayerNormGRU` take the constructor arguments of their torch
counterparts and accept the same inputs — batched ``(T, B, I)`` (``(B, T, I)`` with
``batch_first``), unbatched ``(T, I)``, or a :class:`~torch.nn.utils.rnn.PackedSequence` — and
return the same outputs. The equations are in :mod:`normkit.nn.rnn.reference`; each layer and
direction runs as one fused autograd function (:mod:`normkit.nn.rnn.sequence`): the input
projections and their layer norm for all time steps in one matrix product and one
:func:`normkit.layer_norm` call, then a time loop doing only the small recurrent product and a
fused step, and a hand-written backward through time (under ``create_graph=True`` a
differentiable one: the reference equations recomputed and differentiated by autograd).
``torch.func`` transforms and forward-mode AD run the per-step reference equations of
:mod:`normkit.nn.rnn.reference`, whose plain torch ops every autograd mode understands.
"""

from __future__ import annotations

import numbers
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from normkit import _torch_private as private
from normkit.dispatch import _in_forward_ad
from normkit.nn.rnn import sequence
from normkit.nn.rnn.cells import check_input_dtype, check_positive_size, fold_torch_lstm_bias, reset_rnn_parameters
from normkit.nn.rnn.reference import gru_layer_ref, lstm_layer_ref

__all__ = ["LayerNormLSTM", "LayerNormGRU"]


class _LayerNormRNNBase(nn.Module):
    """Shared constructor, validation, layering, bidirectionality and packing."""

    _gates = 1
    #: Run each layer through the fused autograd function (``False``: the per-step reference
    #: implementation of :mod:`normkit.nn.rnn.reference`, differentiated by autograd). Under
    #: ``torch.jit.trace``, ``torch.export`` and ONNX export the reference runs whatever this
    #: says: the fused function's compiled time loop cannot be traced. A trace unrolls the time
    #: loop, so it holds for the traced sequence length only. ``torch.func`` transforms
    #: (``grad``, ``vmap``, ``jacrev``, ``jvp``...) and forward-mode AD also run the reference:
    #: the fused function has no batching rule and no ``jvp``.
    fast_path: bool = True

    def _fast(self, tensors: Sequence[Optional[Tensor]]) -> bool:
        """Whether a layer on ``tensors`` (its input, states and parameters) runs the fused function."""
        if not self.fast_path:
            return False
        is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or is_exporting():
            return False
        # private, but the check functional.route makes too: no public API says whether a
        # functorch transform is active
        return not (private.functorch_transforms_active() or _in_forward_ad(tensors))

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        eps: float = 1e-5,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = check_positive_size("input_size", input_size)
        self.hidden_size = check_positive_size("hidden_size", hidden_size)
        self.num_layers = check_positive_size("num_layers", num_layers)
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1] (the probability of zeroing an element), got {dropout!r}")
        if proj_size != 0:
            raise ValueError(
                f"proj_size is not supported by {type(self).__name__} (expected 0, got {proj_size!r}); "
                "add a linear layer on the output instead"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}"
            )
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = 0
        self.eps = float(eps)
        G, H = self._gates * hidden_size, hidden_size
        self._param_names: List[List[str]] = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else H * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                names = []
                for name, shape in self._layer_shapes(G, H, layer_in):
                    full = f"{name}_l{layer}{suffix}"
                    self.register_parameter(full, None if shape is None else nn.Parameter(torch.empty(shape, **factory)))
                    names.append(full)
                self._param_names.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_shapes(self, G: int, H: int, layer_in: int):  # pragma: no cover - overridden
        raise NotImplementedError

    def reset_parameters(self) -> None:
        reset_rnn_parameters(self, self.hidden_size)

    def flatten_parameters(self) -> None:
        """No-op, for code written for :class:`torch.nn.LSTM` (there is no cuDNN weight buffer)."""

    @property
    def all_weights(self) -> List[List[Optional[nn.Parameter]]]:
        """Per layer and direction, the parameters in :meth:`_layer_shapes` order (``None`` where
        ``bias=False`` removes one)."""
        return [[getattr(self, n) for n in names] for names in self._param_names]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.eps != 1e-5:
            s += f", eps={self.eps}"
        return s

    # --- input handling

    def _unpack_input(self, input):
        """Returns ``(data (N, I), batch_sizes list, T, B, sorted_indices, unsorted_indices, batched)``."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            bs = [int(b) for b in batch_sizes.tolist()]
            T, B, batched = len(bs), bs[0], True
        elif isinstance(input, Tensor):
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: expected input to be 2-D (unbatched) or 3-D (batched), got {input.dim()}-D")
            batched = input.dim() == 3
            x = input.unsqueeze(1) if not batched else (input.transpose(0, 1) if self.batch_first else input)
            T, B = int(x.shape[0]), int(x.shape[1])  # ints, also under the tracer (which unrolls T)
            if T == 0:  # torch.nn.LSTM/GRU's own error
                raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
            data = x.reshape(T * B, int(x.shape[2]))
            bs, sorted_indices, unsorted_indices = [B] * T, None, None
        else:
            raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        if data.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {data.shape[-1]}"
            )
        check_input_dtype(name, data, self.weight_ih_l0)
        return data, bs, T, B, sorted_indices, unsorted_indices, batched

    def _prepare_state(self, s: Optional[Tensor], what: str, B: int, batched: bool, data: Tensor, sorted_indices):
        """Zeros for ``None``; else check the shape, add the batch dim, order as the packed batch."""
        L, H = self.num_layers * self.num_directions, self.hidden_size
        if s is None:
            return data.new_zeros(L, B, H)
        if not isinstance(s, Tensor):
            raise TypeError(f"{type(self).__name__}: {what} must be a Tensor, got {type(s).__name__}")
        want = (L, B, H) if batched else (L, H)
        if tuple(s.shape) != want:
            kind = "batched 3-D" if batched else "unbatched 2-D"
            raise ValueError(f"{type(self).__name__}: expected {what} of shape {want} for {kind} input, got {tuple(s.shape)}")
        if s.dtype != data.dtype:
            raise ValueError(f"{type(self).__name__}: expected {what} with the input's dtype {data.dtype}, got {s.dtype}")
        if s.device != data.device:
            raise ValueError(f"{type(self).__name__}: expected {what} on the input's device {data.device}, got {s.device}")
        s = s if batched else s.unsqueeze(1)
        return s if sorted_indices is None else s.index_select(1, sorted_indices)

    def _run(self, input, states: Sequence[Optional[Tensor]], names: Sequence[str]):
        """The layer stack. Returns ``(output, final_states)`` in the caller's layout."""
        data, bs, T, B, sorted_indices, unsorted_indices, batched = self._unpack_input(input)
        states = [self._prepare_state(s, n, B, batched, data, sorted_indices) for s, n in zip(states, names)]
        finals: List[List[Tensor]] = [[] for _ in states]
        layer_input = data
        D = self.num_directions
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_input = F.dropout(layer_input, self.dropout, True)
            outs = []
            for d in range(D):
                idx = layer * D + d
                params = self.all_weights[idx]
                res = self._layer(layer_input, bs, [s[idx] for s in states], params, reverse=d == 1)
                outs.append(res[0])
                for f, s in zip(finals, res[1:]):
                    f.append(s)
            layer_input = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        finals_t = [torch.stack(f) for f in finals]
        if unsorted_indices is not None:
            finals_t = [f.index_select(1, unsorted_indices) for f in finals_t]
        if isinstance(input, PackedSequence):
            output = PackedSequence(layer_input, input.batch_sizes, sorted_indices, unsorted_indices)
        else:
            output = layer_input.reshape(T, B, self.num_directions * self.hidden_size)  # not -1: B may be 0
            if not batched:
                output = output.squeeze(1)
                finals_t = [f.squeeze(1) for f in finals_t]
            elif self.batch_first:
                output = output.transpose(0, 1)
        return output, finals_t


class LayerNormLSTM(_LayerNormRNNBase):
    r"""A multi-layer layer-normalized LSTM (Ba, Kiros & Hinton 2016), drop-in for :class:`torch.nn.LSTM`.

    For each layer and time step, with :math:`x_t` the layer input:

    .. math::

        (i_t, f_t, g_t, o_t) = \mathrm{LN}(W_{hh} h_{t-1};\ \alpha_h)
            + \mathrm{LN}(W_{ih} x_t;\ \alpha_x) + b

        c_t = \sigma(f_t) \odot c_{t-1} + \sigma(i_t) \odot \tanh(g_t), \qquad
        h_t = \sigma(o_t) \odot \tanh\big(\mathrm{LN}(c_t;\ \alpha_c, \beta_c)\big)

    :math:`\mathrm{LN}(v; \alpha, \beta) = \alpha \odot (v - \bar v) / \sqrt{\mathrm{Var}(v) +
    \epsilon} + \beta` normalizes the whole ``4H`` pre-activation vector of each sample and
    step (the paper's formulation; statistics over the hidden units, so any batch size and
    sequence length work, batch size 1 included). Gate order ``(i, f, g, o)`` as
    :class:`torch.nn.LSTM`. The second and later layers take :math:`h_t` of the layer below
    (both directions concatenated), with dropout in training mode when ``dropout > 0``.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, device,
            dtype: as :class:`torch.nn.LSTM`. ``proj_size`` is not supported (a non-zero value
            raises ``ValueError``).
        eps: the layer norms' epsilon (keyword-only).

    Parameters, for layer ``k`` (suffix ``_reverse`` for the reverse direction):
        ``weight_ih_l{k}`` ``(4H, in)`` and ``weight_hh_l{k}`` ``(4H, H)``: uniform
        :math:`\pm 1/\sqrt{H}` as in :class:`torch.nn.LSTM`.
        ``ln_ih_weight_l{k}`` :math:`\alpha_x`, ``ln_hh_weight_l{k}`` :math:`\alpha_h` ``(4H,)``
        and ``ln_c_weight_l{k}`` :math:`\alpha_c` ``(H,)``: ones.
        With ``bias=True`` (default): ``bias_ih_l{k}`` :math:`b` ``(4H,)`` and
        ``ln_c_bias_l{k}`` :math:`\beta_c` ``(H,)``, zeros. The shifts of the two projection
        norms and the LSTM's ``b_ih + b_hh`` would add up to one vector, so ``b`` is the only
        gate bias (there is no ``bias_hh``). ``bias=False`` removes every additive parameter.

    Loading a :class:`torch.nn.LSTM` state_dict (``load_state_dict(lstm.state_dict(),
    strict=False)``, same sizes) starts from torch's weights, not from torch's function:
    ``weight_ih_l{k}`` and ``weight_hh_l{k}`` load by name, but the layer norms remove each
    projection's per-sample mean and scale, so the loaded module computes something else; the
    ``ln_*`` parameters keep their values and are reported in ``missing_keys``. torch's two
    gate biases fold into the one: ``bias_ih_l{k}`` gets ``b_ih + b_hh``, exact for the
    bias, since :class:`torch.nn.LSTM` depends on the sum only and :math:`b` enters where that
    sum does (added to the gate pre-activations, before the nonlinearities), so gate offsets
    such as a forget-gate bias carry over whole; ``bias_hh_l{k}`` is consumed, not reported.
    Into a ``bias=False`` module both biases are unexpected keys. A state_dict of a
    ``LayerNormLSTM`` loads unchanged (it has no ``bias_hh``).

    Autograd: every mode gives the reference equations' derivatives. Double backward
    (``create_graph=True``: gradient penalties, Hessians) recomputes each layer with the
    reference and differentiates it; ``torch.func`` transforms and forward-mode AD run the
    reference from the start (see ``fast_path``). The same holds for :class:`LayerNormGRU`.

    Inputs: ``input, hx``
        ``input``: ``(T, B, input_size)``, ``(B, T, input_size)`` with ``batch_first``,
        ``(T, input_size)`` unbatched, or a :class:`~torch.nn.utils.rnn.PackedSequence`.
        ``hx = (h_0, c_0)``: each ``(D * num_layers, B, H)`` (``(D * num_layers, H)``
        unbatched), zeros when ``None``; for packed input in the original (unsorted) batch order.

    Outputs: ``output, (h_n, c_n)``
        ``output``: ``(T, B, D * H)`` (batch-first / unbatched / packed like the input) — the
        last layer's :math:`h_t`; ``h_n``, ``c_n``: ``(D * num_layers, B, H)``, each sequence's
        state after its own last step.

    Examples::

        >>> rnn = normkit.nn.LayerNormLSTM(10, 20, num_layers=2)
        >>> output, (h_n, c_n) = rnn(torch.randn(5, 3, 10))
    """

    _gates = 4

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        suffixes = [names[0][len("weight_ih") :] for names in self._param_names]  # "_l0", "_l0_reverse", ...
        fold_torch_lstm_bias(self, state_dict, prefix, suffixes)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layer_shapes(self, G, H, layer_in):
        b = self.bias
        return [
            ("weight_ih", (G, layer_in)),
            ("weight_hh", (G, H)),
            ("bias_ih", (G,) if b else None),
            ("ln_ih_weight", (G,)),
            ("ln_hh_weight", (G,)),
            ("ln_c_weight", (H,)),
            ("ln_c_bias", (H,) if b else None),
        ]

    def _layer(self, data, bs, state, params, reverse):
        fn = sequence.lstm_layer if self._fast((data, *state, *params)) else lstm_layer_ref
        return fn(data, bs, state[0], state[1], params, self.eps, reverse)

    def forward(self, input, hx: Optional[Tuple[Tensor, Tensor]] = None):
        if hx is None:
            hx = (None, None)
        elif not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"LayerNormLSTM: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
        output, (h_n, c_n) = self._run(input, hx, ("hx[0] (h_0)", "hx[1] (c_0)"))
        return output, (h_n, c_n)


class LayerNormGRU(_LayerNormRNNBase):
    r"""A multi-layer layer-normalized GRU, drop-in for :class:`torch.nn.GRU`.

    For each layer and time step:

    .. math::

        (x_r, x_z, x_n) = \mathrm{LN}(W_{ih} x_t;\ \alpha_x) + b_{ih}, \qquad
        (h_r, h_z, h_n) = \mathrm{LN}(W_{hh} h_{t-1};\ \alpha_h) + b_{hh}

        r_t = \sigma(x_r + h_r), \quad z_t = \sigma(x_z + h_z), \quad
        n_t = \tanh(x_n + r_t \odot h_n), \qquad h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}

    Both projections are normalized over their whole ``3H`` vector. ``r`` multiplies the
    normalized recurrent part *after* its shift :math:`b_{hn}` — exactly where
    :class:`torch.nn.GRU` applies it (to :math:`W_{hn} h + b_{hn}`). Gate order ``(r, z, n)``.

    Args:
        as :class:`LayerNormLSTM` (and :class:`torch.nn.GRU`).

    Parameters, for layer ``k`` (suffix ``_reverse`` for the reverse direction):
        ``weight_ih_l{k}`` ``(3H, in)``, ``weight_hh_l{k}`` ``(3H, H)``: uniform
        :math:`\pm 1/\sqrt{H}`; ``ln_ih_weight_l{k}``, ``ln_hh_weight_l{k}`` ``(3H,)``: ones;
        with ``bias=True``: ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``(3H,)``, zeros — the shifts of
        the two layer norms, named as :class:`torch.nn.GRU`'s biases.

    Loading a :class:`torch.nn.GRU` state_dict (``strict=False``) maps every key by name, each
    bias to where torch adds it (``b_hn`` inside :math:`r \odot (\cdot)` in both); as for
    :class:`LayerNormLSTM` the layer norms change what the weights compute, and the ``ln_*``
    gains keep their values and are reported in ``missing_keys``.

    Inputs: ``input, hx`` — as :class:`torch.nn.GRU`; ``hx`` ``(D * num_layers, B, H)``.
    Outputs: ``output, h_n`` — as :class:`torch.nn.GRU`.

    Examples::

        >>> rnn = normkit.nn.LayerNormGRU(10, 20, batch_first=True, bidirectional=True)
        >>> output, h_n = rnn(torch.randn(3, 5, 10))
    """

    _gates = 3

    def _layer_shapes(self, G, H, layer_in):
        b = self.bias
        return [
            ("weight_ih", (G, layer_in)),
            ("weight_hh", (G, H)),
            ("bias_ih", (G,) if b else None),
            ("bias_hh", (G,) if b else None),
            ("ln_ih_weight", (G,)),
            ("ln_hh_weight", (G,)),
        ]

    def _layer(self, data, bs, state, params, reverse):
        fn = sequence.gru_layer if self._fast((data, *state, *params)) else gru_layer_ref
        return fn(data, bs, state[0], params, self.eps, reverse)

    def forward(self, input, hx: Optional[Tensor] = None):
        output, (h_n,) = self._run(input, (hx,), ("hx",))
        return output, h_n
