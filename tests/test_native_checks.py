"""The C++ entry points' boundary (issue 22): the reproduced crashes, wrong results and unnamed
errors, each as a test, and the named error of every argument check. The fuzz suite
(test_fuzz_native.py) covers the same ground at random; these are the cases that were seen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import params, randn

import normkit
from normkit import functional as nkf
from normkit.backends import cpu as compiled
from normkit.errors import NormOverlapError

_C = compiled.extension
pytestmark = pytest.mark.skipif(_C is None, reason="normkit._C is not built")


# --- empty inputs: no division by zero (was SIGFPE in dim_backward: chunks = min(outer, 64) = 0)


def test_empty_dim_backward_and_layer_norm_2d():
    w = randn((4,), seed=1, requires_grad=True)
    x = randn((0, 4, 3), seed=2, requires_grad=True)
    normkit.layer_norm(x, (4,), w, dim=1).sum().backward()
    assert x.grad.shape == (0, 4, 3) and torch.equal(w.grad, torch.zeros(4))
    x2 = randn((0, 4, 3, 3), seed=3, requires_grad=True)
    w2, b2 = (t.requires_grad_() for t in params((4,), seed=4))
    normkit.layer_norm_2d(x2, w2, b2).sum().backward()
    assert x2.grad.shape == x2.shape and torch.equal(w2.grad, torch.zeros(4)) and torch.equal(b2.grad, torch.zeros(4))


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0)])
def test_raw_kernels_on_empty_rows_or_width(shape):
    x = randn(shape, seed=5)
    y, s, mean, rstd = _C.forward(x, x, None, None, 1e-5, False, True)
    assert y.shape == shape and s.shape == shape and mean.shape == (shape[0],)
    torch.testing.assert_close(mean, torch.zeros(shape[0]))  # torch's native_layer_norm: mean 0, rstd NaN
    assert torch.isnan(rstd).all()
    dx, dw, db = _C.backward(x, None, x, None, mean, rstd, False)
    assert dx.shape == shape and torch.equal(dw, torch.zeros(shape[1])) and torch.equal(db, torch.zeros(shape[1]))
    (y2,) = _C.norm(x, shape[1], None, None, 1e-5, False, None)
    assert y2.shape == shape


# --- Python objects: no pending error (was SystemError), no pybind11 signature dump


def test_huge_dropout_is_a_value_error_not_a_system_error():
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        normkit.layer_norm(randn((2, 8), seed=6), (8,), dropout_p=2**64)
    assert _C.try_norm(randn((2, 8), seed=6), (8,), None, None, 1e-5, False, None, False, 2**64) is None
    assert _C.try_norm(randn((2, 8), seed=6), (2**64,), None, None, 1e-5, False, None, False, 0.0) is None


@pytest.mark.parametrize("prenorm", ["no", 1, None, 0.0, torch.tensor(True)])
@pytest.mark.parametrize("contiguous", [True, False], ids=["native", "general"])
def test_prenorm_must_be_a_bool(prenorm, contiguous):
    x = randn((4, 8), seed=7)
    x = x if contiguous else x.t().contiguous().t()
    with pytest.raises(TypeError, match=r"prenorm must be a bool, got"):
        normkit.layer_norm(x, (8,), prenorm=prenorm)
    with pytest.raises(TypeError, match=r"prenorm must be a bool"):
        normkit.rms_norm(x, (8,), residual=x.clone(), prenorm=prenorm)
    if contiguous:
        assert _C.try_norm(x, (8,), None, None, 1e-5, False, None, prenorm, 0.0) is None


# --- negative-bit views: resolved (the kernels read raw data, which hold -x)


@pytest.mark.parametrize("which", ["x", "weight", "bias", "residual"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
def test_neg_bit_views_give_torch_results(which, is_rms):
    x, r = randn((4, 8), seed=8), randn((4, 8), seed=9)
    w, b = params((8,), seed=10)
    args = dict(x=x, weight=w, bias=None if is_rms else b, residual=r)
    if which == "bias" and is_rms:
        pytest.skip("RMS norm has no bias in the kernel")
    args[which] = torch._neg_view(-args[which])  # same values, negative bit set, raw data negated
    assert args[which].is_neg()
    leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
    got_in = {k: (torch._neg_view(-leaves[k]) if k == which else leaves[k]) for k in leaves}
    fn = normkit.rms_norm if is_rms else normkit.layer_norm
    kw = dict(residual=got_in["residual"])
    y = fn(got_in["x"], (8,), got_in["weight"], **({} if is_rms else dict(bias=got_in["bias"])), **kw)
    s = x + r
    want = F.rms_norm(s, (8,), w, torch.finfo(torch.float32).eps) if is_rms else F.layer_norm(s, (8,), w, b)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    ref_leaves = {k: v.detach().clone().requires_grad_() for k, v in args.items() if v is not None}
    s2 = ref_leaves["x"] + ref_leaves["residual"]
    if is_rms:
        want2 = F.rms_norm(s2, (8,), ref_leaves["weight"], torch.finfo(torch.float32).eps)
    else:
        want2 = F.layer_norm(s2, (8,), ref_leaves["weight"], ref_leaves["bias"])
    want2.sum().backward()
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, msg=k)


def test_neg_bit_in_raw_entry_points():
    x = randn((3, 16), seed=11)
    nx = torch._neg_view(-x)
    y = _C.forward(nx, None, None, None, 1e-5, False, False)[0]
    torch.testing.assert_close(y, F.layer_norm(x, (16,)))
    torch.testing.assert_close(_C.norm_dim(nx.view(3, 4, 4), 1, 1, None, None, 1e-5, False),
                               F.layer_norm(x.view(3, 4, 4).transpose(1, 2), (4,)).transpose(1, 2))
    torch.testing.assert_close(_C.column_dot(nx, None), x.sum(0))
    with pytest.raises(RuntimeError, match=r"out: expected a tensor without the negative / conjugate bit"):
        _C.forward(x, None, None, None, 1e-5, False, False, torch._neg_view(torch.empty(3, 16)))


def test_expanded_weight_and_expanded_out():
    x = randn((3, 8), seed=12)
    w = torch.tensor([1.5]).expand(8)
    torch.testing.assert_close(normkit.layer_norm(x, (8,), w), F.layer_norm(x, (8,), w.contiguous()))
    with pytest.raises(RuntimeError, match=r"out: expected a contiguous tensor"):
        _C.forward(x, None, None, None, 1e-5, False, False, torch.empty(1, 8).expand(3, 8))


# --- eps: the kernels take finite eps >= 0; the public API computes any eps, as torch


@pytest.mark.parametrize("eps", [-1.0, float("nan"), float("inf"), -1e-30])
def test_any_eps_runs_the_reference_formula(eps):
    x = randn((4, 8), seed=13)
    assert nkf.route(x, None, None, None, False, 0.0, (8,), eps) == "composite"
    torch.testing.assert_close(normkit.layer_norm(x, (8,), eps=eps), F.layer_norm(x, (8,), eps=eps), equal_nan=True)
    x4 = randn((2, 3, 2, 2), seed=14)
    torch.testing.assert_close(normkit.layer_norm_2d(x4, eps=eps), F.layer_norm(x4.movedim(1, -1), (3,), eps=eps).movedim(-1, 1), equal_nan=True)
    with pytest.raises(ValueError, match=r"eps: expected a finite number >= 0, got"):
        _C.norm(x, 8, None, None, eps, False, None)


# --- out= / residual_out= that overlap: a named error, before anything is written


def test_aliased_out_buffers_raise():
    x, r = randn((4, 8), seed=15), randn((4, 8), seed=16)
    w, b = params((8,), seed=17)
    buf = torch.empty(4, 8)
    with pytest.raises(NormOverlapError, match=r"out shares memory with residual_out"):
        normkit.layer_norm(x, (8,), w, b, residual=r, prenorm=True, out=buf, residual_out=buf)
    x_before = x.clone()
    with pytest.raises(NormOverlapError, match=r"out shares memory with input"):
        normkit.layer_norm(x, (8,), w, b, prenorm=True, out=x)
    assert torch.equal(x, x_before)
    with pytest.raises(NormOverlapError, match=r"residual_out shares memory with residual"):
        normkit.rms_norm(x, (8,), w, residual=r, prenorm=True, residual_out=r)
    with pytest.raises(NormOverlapError, match=r"out shares memory with out1"):
        normkit.layer_norm(x, (8,), w, b, weight1=w, out=buf, out1=buf)
    with pytest.raises(NormOverlapError, match=r"out1 shares memory with weight1"):
        normkit.layer_norm(x[:1], (8,), w, b, weight1=buf[0], out1=buf[:1])
    halves = torch.empty(2, 4, 8)  # two views of one storage that do not overlap: fine
    y, s = normkit.layer_norm(x, (8,), w, b, residual=r, prenorm=True, out=halves[0], residual_out=halves[1])
    torch.testing.assert_close(y, F.layer_norm(x + r, (8,), w, b))
    torch.testing.assert_close(s, x + r)


# --- every raw check names its argument

X = randn((2, 8), seed=18)
RNN = dict(xg=torch.randn(3, 8), h0=torch.randn(2, 2), w_hh=torch.randn(8, 2), w_h=torch.ones(8), w_c=torch.ones(2), b_c=torch.zeros(2))


def _lstm(**over):
    a = {**RNN, **over}
    steps = over.pop("steps", [(0, 2), (2, 1)])
    eps = over.pop("eps", 1e-5)
    return _C.lstm_forward(a["xg"], a["h0"], a["h0"], a["w_hh"], a["w_h"], a["w_c"], a["b_c"], steps, eps)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: _C.forward(X[:, ::2], None, None, None, 1e-5, False, False), RuntimeError, r"^x: expected a contiguous tensor"),
        (lambda: _C.forward(X.view(16), None, None, None, 1e-5, False, False), RuntimeError, r"^x: expected a 2-D tensor"),
        (lambda: _C.forward(X.int(), None, None, None, 1e-5, False, False), TypeError, r"^x: expected float32, float64"),
        (lambda: _C.forward(X, X[:1], None, None, 1e-5, False, False), RuntimeError, r"^residual: expected sizes \[2, 8\]"),
        (lambda: _C.forward(X, X.double(), None, None, 1e-5, False, False), TypeError, r"^residual: expected dtype Float"),
        (lambda: _C.forward(X, None, torch.ones(9), None, 1e-5, False, False), RuntimeError, r"^weight: expected 8 elements"),
        (lambda: _C.forward(X, None, None, torch.ones(8, dtype=torch.int64), 1e-5, False, False), TypeError, r"^bias: expected float32"),
        (lambda: _C.forward(X, None, None, None, float("nan"), False, False), ValueError, r"^eps: expected a finite number >= 0, got nan"),
        (lambda: _C.forward(X, None, None, None, 2**2000, False, False), ValueError, r"^eps: expected a float, got an int too large"),
        (lambda: _C.forward(X, None, None, None, "1e-5", False, False), TypeError, r"^eps: expected a float, got str"),
        (lambda: _C.forward(X, None, None, None, 1e-5, 1, False), TypeError, r"^is_rms: expected a bool, got int"),
        (lambda: _C.forward(X, None, None, None, 1e-5, False, None), TypeError, r"^store_sum: expected a bool, got NoneType"),
        (lambda: _C.forward(X, None, None, None, 1e-5, False, False, X), RuntimeError, r"^out: expected a buffer that shares no memory with x"),
        (lambda: _C.backward(X, None, X, None, None, torch.ones(2), False), RuntimeError, r"^mean: expected the row means"),
        (lambda: _C.backward(X, None, X, None, torch.ones(2), torch.ones(3), False), RuntimeError, r"^rstd: expected 2 values"),
        (lambda: _C.backward(X, X[:1], X, None, None, torch.ones(2), True), RuntimeError, r"^dsum: expected sizes"),
        (lambda: _C.norm(X, 2**64, None, None, 1e-5, False, None), ValueError, r"^n: expected an int that fits in 64 bits"),
        (lambda: _C.norm(X, -1, None, None, 1e-5, False, None), ValueError, r"^n: expected the normalized size, >= 0"),
        (lambda: _C.norm(X, 3, None, None, 1e-5, False, None), RuntimeError, r"^x: expected a whole number of rows of n = 3"),
        (lambda: _C.norm(X, 8, None, None, 1e-5, False, X[:1]), RuntimeError, r"^residual: expected sizes"),
        (lambda: _C.norm_dim(X, 2, 1, None, None, 1e-5, False), IndexError, r"^start: expected a dim of x in \[0, 2\), got 2"),
        (lambda: _C.norm_dim(X, 0, 3, None, None, 1e-5, False), IndexError, r"^k: expected 1 <= k <= 2"),
        (lambda: _C.norm_dim(X, -(2**70), 1, None, None, 1e-5, False), ValueError, r"^start: expected an int that fits in 64 bits, got one below"),
        (lambda: _C.norm_dim(X, 0, 1, torch.ones(3), None, 1e-5, False), RuntimeError, r"^weight: expected 2 elements"),
        (lambda: _C.try_norm(X, (8,), None, None, 1e-5, None, None, False, 0.0), TypeError, r"^is_rms: expected a bool"),
        (lambda: _lstm(xg=torch.randn(3, 7)), RuntimeError, r"^xg: expected 4 \* hidden_size columns"),
        (lambda: _lstm(h0=torch.randn(2, 3)), RuntimeError, r"^h0: expected sizes \[2, 2\]"),
        (lambda: _lstm(w_hh=torch.randn(2, 8)), RuntimeError, r"^w_hh: expected sizes \[8, 2\]"),
        (lambda: _lstm(w_c=torch.ones(3)), RuntimeError, r"^w_c: expected sizes \[2\]"),
        (lambda: _lstm(b_c=torch.ones(2, dtype=torch.float64)), TypeError, r"^b_c: expected dtype Float"),
        (lambda: _lstm(steps=[(0, 3)]), ValueError, r"^steps: expected batch sizes in \[0, 2\]"),
        (lambda: _lstm(steps=[(2, 2)]), ValueError, r"^steps: expected rows \[offset, offset \+ batch_size\) within the 3"),
        (lambda: _lstm(steps=[(2**64, 1)]), ValueError, r"^steps offset: expected an int that fits in 64 bits"),
        (lambda: _lstm(steps=[(0,)]), TypeError, r"^steps: expected \(offset, batch_size\) pairs"),
        (lambda: _lstm(steps=7), TypeError, r"^steps: expected a sequence"),
        (lambda: _lstm(eps=float("nan")), ValueError, r"^eps: expected a finite number >= 0"),
        (lambda: _C.gru_forward(torch.randn(3, 7), torch.randn(2, 2), torch.randn(6, 2), torch.ones(6), torch.ones(6), [(0, 2)], 1e-5), RuntimeError, r"^xg: expected 3 \* hidden_size"),
        (lambda: _C.column_dot(torch.randn(3, 4), torch.randn(3, 5)), RuntimeError, r"^v: expected sizes \[3, 4\]"),
        (lambda: _C.column_dot(torch.randn(3, 4).double(), None), TypeError, r"^u: expected dtype Float"),
    ],
)
def test_raw_checks_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --- the RNN's fast exp: NaN propagates, the top of its range saturates (no UB)


@pytest.mark.parametrize("v", [float("nan"), float("inf"), -float("inf"), 88.3762626647949, 89.0, -88.0, 1e30])
def test_lstm_gates_at_exp_edges(v):
    H, B = 2, 1
    xg = torch.full((B, 4 * H), v)
    h0, c0 = torch.zeros(B, H), torch.randn(B, H)
    out = _C.lstm_forward(xg, h0, c0, torch.randn(4 * H, H), torch.zeros(4 * H), torch.ones(H), torch.zeros(H), [(0, B)], 1e-5)[0]
    s, t = torch.sigmoid(torch.tensor(v, dtype=torch.float64)), torch.tanh(torch.tensor(v, dtype=torch.float64))
    c = s * c0.double() + s * t
    want = s * torch.tanh((c - c.mean(-1, True)) / torch.sqrt(c.var(-1, unbiased=False, keepdim=True) + 1e-5))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("which", range(7))
def test_rnn_entry_points_read_neg_bit_views_by_value(which):
    g = torch.Generator().manual_seed(19)
    H, B, N = 3, 2, 4
    args = [torch.randn(N, 4 * H, generator=g), torch.randn(B, H, generator=g), torch.randn(B, H, generator=g),
            torch.randn(4 * H, H, generator=g), torch.rand(4 * H, generator=g) + 0.5, torch.rand(H, generator=g) + 0.5,
            torch.randn(H, generator=g)]
    steps = [(0, 2), (2, 2)]
    want = _C.lstm_forward(*args, steps, 1e-5)
    args[which] = torch._neg_view(-args[which])
    got = _C.lstm_forward(*args, steps, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    dout, dh = torch.randn(N, H, generator=g), torch.randn(B, H, generator=g)
    saved = list(want[3:])
    back = [saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[7]]  # a_hat, rstd_a, gates, chat, rstd_c, tc, cprev
    ref = _C.lstm_backward(dout, dh, dh, args[3].resolve_neg(), args[4].resolve_neg(), args[5].resolve_neg(), *back, steps[::-1])
    back[which % len(back)] = torch._neg_view(-back[which % len(back)])
    got_b = _C.lstm_backward(torch._neg_view(-dout), dh, dh, args[3], args[4], args[5], *back, steps[::-1])
    for a, b in zip(got_b, ref):
        torch.testing.assert_close(a, b)
    u = torch.randn(5, 6, generator=g)
    torch.testing.assert_close(_C.column_dot(u, torch._neg_view(-u)), (u * u).sum(0))
