"""LayerNormLSTMCell / LayerNormGRUCell, and the compiled time loop of the fused RNN path.

The cells are the per-step reference equations behind an nn.LSTMCell-style interface; stepping
one over a sequence must give what the sequence module gives. The C++ loop (normkit._C,
csrc/rnn_cpu.cpp) must compute what the plain-torch steps of :mod:`normkit.nn.rnn.sequence`
compute, on packed batches whose active rows shrink step by step.
"""

from __future__ import annotations

import math

import pytest
import torch

import normkit
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


# ------------------------------------------------------------------ the compiled time loop (C++)


def _compiled():
    from normkit.backends import cpu as compiled

    if compiled.extension is None:
        pytest.skip("normkit._C is not built")
    return compiled.extension


def _layer_run(kind, H, batch_sizes, seed, backend, scale=1.0, eps=1e-5):
    """One fused layer (sequence.lstm_layer / gru_layer) on a packed batch: outputs and every
    gradient, with the steps of ``backend`` ("cpu": the C++ loop; "reference": plain torch)."""
    g = torch.Generator().manual_seed(seed)
    G = (4 if kind == "LSTM" else 3) * H
    N, B, I = sum(batch_sizes), batch_sizes[0], 5
    data = (torch.randn(N, I, generator=g) * scale).requires_grad_()
    h0 = torch.randn(B, H, generator=g).requires_grad_()
    shapes = [(G, I), (G, H), (G,), (G,), (G,)] + ([(H,), (H,)] if kind == "LSTM" else [(G,)])
    params = [(torch.randn(s, generator=g) * 0.5 + (1.0 if i >= 3 else 0.0)).requires_grad_() for i, s in enumerate(shapes)]
    with normkit.backends.use(backend):
        if kind == "LSTM":
            c0 = torch.randn(B, H, generator=g).requires_grad_()
            w_ih, w_hh, b, ln_ih, ln_hh, ln_c, ln_cb = params
            out, h, c = rnn_fast.lstm_layer(data, batch_sizes, h0, c0, [w_ih, w_hh, b, ln_ih, ln_hh, ln_c, ln_cb], eps)
            leaves, outs = [data, h0, c0, *params], (out, h, c)
        else:
            w_ih, w_hh, b_ih, ln_ih, ln_hh, b_hh = params
            out, h = rnn_fast.gru_layer(data, batch_sizes, h0, [w_ih, w_hh, b_ih, b_hh, ln_ih, ln_hh], eps)
            leaves, outs = [data, h0, *params], (out, h)
        loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("H", [1, 3, 40])
@pytest.mark.parametrize("batch_sizes", [[1], [4, 3, 3, 1], [2] * 5])
def test_compiled_loop_equals_the_torch_steps(kind, H, batch_sizes):
    """Every output and gradient of the C++ loop against the plain-torch steps (float32 both:
    they differ in summation order and in exp, a polynomial within ~1 ulp of 1.0 of libm)."""
    _compiled()
    got = _layer_run(kind, H, batch_sizes, seed=H, backend="cpu")
    want = _layer_run(kind, H, batch_sizes, seed=H, backend="reference")
    for i, (a, b) in enumerate(zip(got, want)):
        tol = 64 * (math.sqrt(4 * H) + 1) * EPS32 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{kind} H={H} item {i}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_loop_saturates_like_libm(kind):
    """Huge pre-activations (inputs of 1e30) give the exact limits of sigmoid and tanh, as
    torch's do, and NaN inputs propagate."""
    _compiled()
    got = _layer_run(kind, 3, [2, 2], seed=3, backend="cpu", scale=1e30)
    want = _layer_run(kind, 3, [2, 2], seed=3, backend="reference", scale=1e30)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    m = getattr(normkit.nn, f"LayerNorm{kind}")(2, 3)
    x = torch.randn(3, 1, 2)
    x[1, 0, 0] = float("nan")
    out = m(x)[0]
    assert not out[0].isnan().any() and out[1:].isnan().all()


def test_column_dot_is_accurate():
    """Gain/bias gradients: products rounded to float32 (relative error <= eps/2 each), summed in
    float64, rounded once, so the error is at most eps * sum_i |u_i v_i| per column."""
    ext = _compiled()
    for shape in [(1, 1), (7, 3), (1000, 40)]:
        g = torch.Generator().manual_seed(shape[0])
        u, v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        exact = (u.double() * v.double()).sum(0)
        assert torch.all((ext.column_dot(u, v).double() - exact).abs() <= EPS32 * (u.double() * v.double()).abs().sum(0))
        assert torch.all((ext.column_dot(u, None).double() - u.double().sum(0)).abs() <= EPS32 * u.double().abs().sum(0))


@pytest.mark.parametrize("value", [0.1, -3.3, 1e4 + 0.1])
def test_constant_rows_centre_to_exactly_zero(value):
    """A constant gate row (variance 0) normalizes to 0, not to rounding residues amplified by
    rstd = 1/sqrt(eps): with every row of W_hh equal, the recurrent product is constant along
    each row, so the layer must give exactly what it gives with W_hh = 0 (the C++ loop and the
    torch steps alike)."""
    t = torch.full((2, 1000), value)
    rnn_fast._normalize_rows_(t, 1e-12)
    assert not t.any()
    for backend in ("cpu", "reference"):
        if backend == "cpu":
            _compiled()
        m = normkit.nn.LayerNormLSTM(3, 8, eps=1e-12)
        x = torch.randn(4, 2, 3)
        with torch.no_grad(), normkit.backends.use(backend):
            m.weight_hh_l0.fill_(value)
            constant = m(x)[0]
            m.weight_hh_l0.zero_()
            zero = m(x)[0]
        assert torch.equal(constant, zero), backend
