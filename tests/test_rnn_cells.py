"""LayerNormLSTMCell / LayerNormGRUCell, and the numba per-step kernels of the fused RNN path.

The cells are the per-step reference equations behind an nn.LSTMCell-style interface; stepping
one over a sequence must give what the sequence module gives. The numba kernels
(:mod:`normkit.backends.numba_rnn_kernels`) must compute what the plain-torch steps of
:mod:`normkit.nn.rnn.sequence` compute, row for row, and touch no row outside the active block.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import normkit
from normkit.backends import numba_rnn_kernels as rnn_kernels
from normkit.nn.rnn import sequence as rnn_fast

from helpers import randn

CELLS = {"LSTM": (normkit.nn.LayerNormLSTMCell, torch.nn.LSTMCell, normkit.nn.LayerNormLSTM),
         "GRU": (normkit.nn.LayerNormGRUCell, torch.nn.GRUCell, normkit.nn.LayerNormGRU)}
KINDS = list(CELLS)
F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
TIGHT = dict(rtol=1e-12, atol=1e-12)


def make_cell(kind, input_size, hidden_size, *, seed=0, dtype=F64, **kw):
    cell = CELLS[kind][0](input_size, hidden_size, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
    return cell


def cell_hx(kind, shape, seed=3, dtype=F64, requires_grad=False):
    h = randn(shape, dtype, seed=seed, scale=0.5, requires_grad=requires_grad)
    return (h, randn(shape, dtype, seed=seed + 1, scale=0.5, requires_grad=requires_grad)) if kind == "LSTM" else h


def as_tuple(kind, st):
    return tuple(st) if kind == "LSTM" else (st,)


# --------------------------------------------------------------------------- cells


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cell_shapes_match_torch(kind, batched, with_hx):
    ours, theirs = CELLS[kind][0](5, 6), CELLS[kind][1](5, 6)
    x = randn((3, 5) if batched else (5,), seed=1)
    hx = cell_hx(kind, (3, 6) if batched else (6,), dtype=torch.float32) if with_hx else None
    a, b = as_tuple(kind, ours(x, hx)), as_tuple(kind, theirs(x, hx))
    assert [t.shape for t in a] == [t.shape for t in b]


@pytest.mark.parametrize("kind", KINDS)
def test_cell_names_repr_and_init(kind):
    ours, theirs = CELLS[kind][0](5, 6, bias=False), CELLS[kind][1](5, 6, bias=False)
    assert repr(ours) == "LayerNorm" + repr(theirs)
    assert dict(ours.named_parameters())["weight_ih"].shape == theirs.weight_ih.shape
    assert dict(ours.named_parameters())["weight_hh"].shape == theirs.weight_hh.shape
    names = list(CELLS[kind][0](5, 6).state_dict())
    want = {"LSTM": ["weight_ih", "weight_hh", "bias_ih", "ln_ih_weight", "ln_hh_weight", "ln_c_weight", "ln_c_bias"],
            "GRU": ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "ln_ih_weight", "ln_hh_weight"]}[kind]
    assert names == want
    cell = CELLS[kind][0](5, 16)
    assert cell.weight_hh.abs().max() <= 1 / math.sqrt(16) and torch.all(cell.ln_hh_weight == 1)


@pytest.mark.parametrize("kind", KINDS)
def test_stepping_the_cell_equals_the_sequence_module(kind):
    """T cell steps = one call of the (fused) sequence module holding the same parameters."""
    cell = make_cell(kind, 4, 5)
    seq = CELLS[kind][2](4, 5, dtype=F64)
    seq.load_state_dict({f"{n}_l0": p for n, p in cell.state_dict().items()})
    x = randn((6, 3, 4), F64, seed=2)
    hx = cell_hx(kind, (3, 5))
    out, st = seq(x, tuple(s.unsqueeze(0) for s in hx) if kind == "LSTM" else hx.unsqueeze(0))
    state = hx
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        torch.testing.assert_close(out[t], as_tuple(kind, state)[0], **TIGHT)
    for a, b in zip(as_tuple(kind, st), as_tuple(kind, state)):
        torch.testing.assert_close(a[0], b, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_cell_unbatched_and_default_state(kind):
    cell = make_cell(kind, 4, 5)
    x = randn((3, 4), F64, seed=4)
    hx = cell_hx(kind, (3, 5))
    full = as_tuple(kind, cell(x, hx))
    one = as_tuple(kind, cell(x[2], tuple(s[2] for s in as_tuple(kind, hx)) if kind == "LSTM" else hx[2]))
    for a, b in zip(one, full):
        torch.testing.assert_close(a, b[2], **TIGHT)
    zeros = tuple(torch.zeros(3, 5, dtype=F64) for _ in as_tuple(kind, hx))
    for a, b in zip(as_tuple(kind, cell(x)), as_tuple(kind, cell(x, zeros if kind == "LSTM" else zeros[0]))):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("kind", KINDS)
def test_cell_gradcheck(kind):
    cell = make_cell(kind, 3, 4)
    x = randn((2, 3), F64, seed=5, requires_grad=True)
    hx = as_tuple(kind, cell_hx(kind, (2, 4), requires_grad=True))
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in cell.parameters()]

    def f(x, *rest):
        n = len(hx)
        state = rest[:n] if kind == "LSTM" else rest[0]
        return torch.func.functional_call(cell, dict(zip(names, rest[n:])), (x, state))

    assert torch.autograd.gradcheck(f, (x, *hx, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cell_errors(kind):
    cell = CELLS[kind][0](5, 6)
    name = f"LayerNorm{kind}Cell"
    with pytest.raises(ValueError, match=f"{name}: expected input to be 1-D or 2-D, got 3-D"):
        cell(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"input.size\(-1\) must be equal to input_size. Expected 5, got 4"):
        cell(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"input dtype \(torch.float64\) does not match"):
        cell(torch.randn(3, 5, dtype=F64))
    bad = (torch.zeros(2, 6), torch.zeros(2, 6)) if kind == "LSTM" else torch.zeros(2, 6)
    with pytest.raises(ValueError, match=r"expected hx.* of shape \(3, 6\), got \(2, 6\)"):
        cell(torch.randn(3, 5), bad)
    with pytest.raises(ValueError, match="hidden_size must be a positive int, got 0"):
        CELLS[kind][0](5, 0)


# --------------------------------------------------------------------------- numba kernels


def _tol(width):
    """Both sides compute in float32 and differ in summation order (statistics over ``width``
    values: error ~ sqrt(width) ulps, taken 8x) and in exp (the kernels' polynomial exp and
    tanh/sigmoid are within ~1 ulp of 1.0 of libm)."""
    t = 8 * (math.sqrt(width) + 1) * EPS32
    return dict(rtol=t, atol=t)


def _random_buffers(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).float() for s in shapes]


def _run_both(numba_fn, torch_fn, off, bs, bufs, eps=None):
    """Run the torch step and the numba kernel on identical copies of every buffer."""
    a = [b.clone() for b in bufs]
    b = [t.clone() for t in bufs]
    extra_t = () if eps is None else (eps,)
    extra_n = () if eps is None else (np.float32(eps),)
    torch_fn(off, bs, *a, *extra_t)
    numba_fn(off, bs, *(t.numpy() for t in b), *extra_n)
    return a, b


def _compare(a, b, names, width):
    for n, x, y in zip(names, a, b):
        torch.testing.assert_close(y, x, **_tol(width), msg=lambda m: f"{n}: {m}")


# (N packed rows, B state rows, off, bs): a step in the middle of a packed batch, not all rows active
LAYOUTS = [(7, 4, 2, 3), (1, 1, 0, 1)]


@pytest.mark.parametrize("H", [1, 3, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lstm_kernels_equal_torch_steps(H, layout):
    N, B, off, bs = layout
    G, eps = 4 * H, 1e-5
    names = ["xg", "a", "rstd_a", "gates", "chat", "rstd_c", "tc", "out", "hprev", "cprev", "h_state", "c_state", "w_h", "w_c", "b_c"]
    shapes = [(N, G), (N, G), (N,), (N, G), (N, H), (N,), (N, H), (N, H), (N, H), (N, H), (B, H), (B, H), (G,), (H,), (H,)]
    bufs = _random_buffers(shapes, seed=H)
    bufs[1] = bufs[1] * 3 + 1  # the recurrent product: not already normalized
    a, b = _run_both(rnn_kernels.lstm_fwd_step, rnn_fast.lstm_fwd_step_torch, off, bs, bufs, eps)
    _compare(a, b, names, G)
    # backward on the forward's results, with random incoming gradients
    fwd = dict(zip(names, a))
    dout, dh, dc = _random_buffers([(N, H), (B, H), (B, H)], seed=H + 1)
    junk = _random_buffers([(N, G), (N, G), (N, H), (H,)], seed=H + 2)  # dxg, da, dchat, tmp (outputs)
    bnames = ["dout", "dh_state", "dc_state", "ahat", "rstd_a", "gates", "chat", "rstd_c", "tc", "cprev", "w_h", "w_c", "dxg", "da", "dchat"]
    bbufs = [dout, dh, dc] + [fwd[n] for n in ("a", "rstd_a", "gates", "chat", "rstd_c", "tc", "cprev", "w_h", "w_c")] + junk
    a, b = _run_both(rnn_kernels.lstm_bwd_step, rnn_fast.lstm_bwd_step_torch, off, bs, bbufs)
    _compare(a[:-1], b[:-1], bnames, G)  # tmp is scratch


@pytest.mark.parametrize("H", [1, 3, 40])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gru_kernels_equal_torch_steps(H, layout):
    N, B, off, bs = layout
    G, eps = 3 * H, 1e-5
    names = ["xg", "a", "rstd_a", "gates", "out", "hprev", "h_state", "w_h", "b_h"]
    shapes = [(N, G), (N, G), (N,), (N, G), (N, H), (N, H), (B, H), (G,), (G,)]
    bufs = _random_buffers(shapes, seed=H)
    bufs[1] = bufs[1] * 3 + 1
    a, b = _run_both(rnn_kernels.gru_fwd_step, rnn_fast.gru_fwd_step_torch, off, bs, bufs, eps)
    _compare(a, b, names, G)
    fwd = dict(zip(names, a))
    dout, dh = _random_buffers([(N, H), (B, H)], seed=H + 1)
    junk = _random_buffers([(N, G), (N, G), (N, G)], seed=H + 2)  # dxg, dgh, da
    bnames = ["dout", "dh_state", "ahat", "rstd_a", "gates", "hprev", "w_h", "b_h", "dxg", "dgh", "da"]
    bbufs = [dout, dh] + [fwd[n] for n in ("a", "rstd_a", "gates", "hprev", "w_h", "b_h")] + junk
    a, b = _run_both(rnn_kernels.gru_bwd_step, rnn_fast.gru_bwd_step_torch, off, bs, bbufs)
    _compare(a, b, bnames, G)


def test_kernel_activations_against_libm():
    """The polynomial exp behind the kernels' sigmoid and tanh: within 1 ulp of 1.0 (absolute)
    of float64 libm everywhere, exact limits at +-inf and huge inputs, NaN propagated."""
    xs = np.concatenate([np.linspace(-30, 30, 2001), [-1e30, 1e30, -np.inf, np.inf, 1e-8, -1e-8, 0.0]]).astype(np.float32)
    for x in xs:
        xd = float(x)
        sig = 0.5 * (1 + math.tanh(xd / 2)) if math.isfinite(xd) else (1.0 if xd > 0 else 0.0)
        th = math.tanh(xd)
        assert abs(float(rnn_kernels._sigmoid(x)) - sig) <= EPS32, x
        assert abs(float(rnn_kernels._tanh(x)) - th) <= EPS32, x
    assert math.isnan(rnn_kernels._tanh(np.float32("nan"))) and math.isnan(rnn_kernels._sigmoid(np.float32("nan")))


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1000, 40)])
def test_column_reductions(shape):
    """Gain/bias gradients: products rounded to float32 (relative error <= eps/2 each), summed in
    float64, rounded once, so the error is at most eps * sum_i |u_i v_i| per column."""
    u, v = _random_buffers([shape, shape], seed=shape[0])
    out = torch.empty(shape[1])
    rnn_kernels.column_dot(u.numpy(), v.numpy(), out.numpy())
    exact = (u.double() * v.double()).sum(0)
    assert torch.all((out.double() - exact).abs() <= EPS32 * (u.double() * v.double()).abs().sum(0))
    rnn_kernels.column_sum(u.numpy(), out.numpy())
    assert torch.all((out.double() - u.double().sum(0)).abs() <= EPS32 * u.double().abs().sum(0))


@pytest.mark.parametrize("value", [0.1, -3.3, 1e4 + 0.1])
def test_constant_row_centres_to_exactly_zero_in_both_steps(value):
    """A constant gate row (variance 0) normalizes to 0, not to rounding residues amplified by
    rstd = 1/sqrt(eps): the numba step and the torch step refine the mean alike."""
    row = np.full(1000, value, dtype=np.float32)
    rnn_kernels._normalize_inplace(row, 1000, np.float32(1e-12))
    assert not row.any(), f"max residue {np.abs(row).max():.3g}"
    t = torch.full((2, 1000), value)
    rnn_fast._normalize_rows_(t, 1e-12)
    assert not t.any()
