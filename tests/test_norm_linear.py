"""``normkit.layer_norm_linear`` / ``rms_norm_linear``: the same values and gradients as the norm
followed by ``F.linear``, without the normalized activation among the tensors saved for
backward; float64 gradcheck, the CPU backends, bad input and ``torch.compile``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit.backends import select_backend

from helpers import backend_or_skip, randn, tolerance

WIDTHS = (1, 3, 1000)


def _case(n, out_features=7, dtype=torch.float32, seed=0, lead=(2, 5)):
    x = randn(lead + (n,), dtype, seed=seed, scale=2.0, offset=0.5, requires_grad=True)
    g = randn((n,), dtype, seed=seed + 1, scale=0.5, offset=1.0, requires_grad=True)
    b = randn((n,), dtype, seed=seed + 2, scale=0.5, requires_grad=True)
    W = randn((out_features, n), dtype, seed=seed + 3, scale=n**-0.5, requires_grad=True)
    c = randn((out_features,), dtype, seed=seed + 4, requires_grad=True)
    return x, g, b, W, c


def _fused(is_rms, x, g, b, W, c, eps=1e-5):
    n = x.shape[-1]
    if is_rms:
        return normkit.rms_norm_linear(x, (n,), g, W, c, eps)
    return normkit.layer_norm_linear(x, (n,), g, b, W, c, eps)


def _unfused(is_rms, x, g, b, W, c, eps=1e-5):
    n = x.shape[-1]
    y = normkit.rms_norm(x, (n,), g, eps) if is_rms else normkit.layer_norm(x, (n,), g, b, eps)
    return F.linear(y, W, c)


def _formula(is_rms, x, g, b, W, c, eps=1e-5):
    """norm-then-linear in float64."""
    x, g, W, c = x.double(), g.double(), W.double(), c.double()
    mean = 0.0 if is_rms else x.mean(-1, keepdim=True)
    var = x.square().mean(-1, keepdim=True) if is_rms else (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * g
    if not is_rms:
        y = y + b.double()
    return F.linear(y, W, c)


IS_RMS = pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])


def _leaves(is_rms, x, g, b, W, c):
    return [x, g, W, c] if is_rms else [x, g, b, W, c]


@IS_RMS
@pytest.mark.parametrize("n", WIDTHS)
def test_matches_norm_then_linear_forward_and_every_gradient(is_rms, n):
    x, g, b, W, c = case = _case(n, seed=n)
    out = _fused(is_rms, *case)
    ref = _unfused(is_rms, *case)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    leaves = _leaves(is_rms, *case)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, g64, *rest = leaves64
    b64, W64, c64 = (None, *rest) if is_rms else rest
    want = _formula(is_rms, x64, g64, b64, W64, c64)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=2e-5)
    dout = randn(out.shape, seed=n + 9)
    got = torch.autograd.grad(out, leaves, dout)
    unfused = torch.autograd.grad(ref, leaves, dout)
    exact = torch.autograd.grad(want, leaves64, dout.double())
    for name, gf, gu, ge in zip(["x", "norm_weight", "norm_bias", "linear_weight", "linear_bias"] if not is_rms else ["x", "norm_weight", "linear_weight", "linear_bias"], got, unfused, exact):
        torch.testing.assert_close(gf, gu, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name} vs unfused: {m}")
        torch.testing.assert_close(gf.double(), ge, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name} vs float64: {m}")


@IS_RMS
def test_gradcheck_float64(is_rms):
    case = [t.detach().double().requires_grad_() for t in _case(4, out_features=3, seed=11, lead=(3,))]
    f = lambda x, g, b, W, c: _fused(is_rms, x, g, None if is_rms else b, W, c)  # noqa: E731
    assert torch.autograd.gradcheck(f, tuple(case))


@IS_RMS
def test_only_the_needed_gradients_and_no_linear_bias(is_rms):
    x, g, b, W, _ = _case(6, seed=12)
    W2 = W.detach()  # a frozen linear layer
    out = _fused(is_rms, x, g, b, W2, None)
    torch.testing.assert_close(out, _unfused(is_rms, x, g, b, W2, None), rtol=1e-5, atol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    (ux,) = torch.autograd.grad(_unfused(is_rms, x, g, b, W2, None).sum(), [x])
    torch.testing.assert_close(gx, ux, rtol=1e-5, atol=1e-5)
    # only the linear layer trains
    xd, gd, bd = x.detach(), g.detach(), b.detach()
    (gW,) = torch.autograd.grad(_fused(is_rms, xd, gd, bd, W, None).sum(), [W])
    (uW,) = torch.autograd.grad(_unfused(is_rms, xd, gd, bd, W, None).sum(), [W])
    torch.testing.assert_close(gW, uW, rtol=1e-5, atol=1e-5)


@IS_RMS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(is_rms, dtype):
    case = _case(1000, out_features=16, dtype=dtype, seed=13)
    out, ref = _fused(is_rms, *case), _unfused(is_rms, *case)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    leaves = _leaves(is_rms, *case)
    dout = randn(out.shape, dtype, seed=14)
    for gf, gu in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, leaves, dout)):
        scale = max(1.0, gu.double().abs().max().item())
        torch.testing.assert_close(gf.double() / scale, gu.double() / scale, rtol=0, atol=2e-2)


def _saved(fn):
    """Every tensor autograd saves while ``fn`` runs, and ``fn``'s result."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@IS_RMS
def test_the_normalized_activation_is_not_saved(is_rms):
    x, g, b, W, c = case = _case(64, out_features=16, seed=15, lead=(8, 4))
    n = x.shape[-1]
    y = (normkit.rms_norm(x, (n,), g, 1e-5) if is_rms else normkit.layer_norm(x, (n,), g, b, 1e-5)).detach()

    def holds_y(tensors):  # F.linear saves y as a (rows, n) view
        return any(t.numel() == y.numel() and torch.equal(t.reshape(y.shape), y) for t in tensors)

    saved_unfused, _ = _saved(lambda: _unfused(is_rms, *case))
    assert holds_y(saved_unfused), "the check must see y where the plain composition keeps it"
    saved, out = _saved(lambda: _fused(is_rms, *case))
    assert not holds_y(saved)
    activation_sized = [t for t in saved if t.numel() == x.numel()]
    assert len(activation_sized) == 1 and activation_sized[0] is x, "only x is kept at activation size"
    assert sum(t.numel() for t in saved) < sum(t.numel() for t in saved_unfused)
    out.sum().backward()  # the saved tensors suffice


def test_double_backward_raises_instead_of_returning_wrong_values():
    x, g, b, W, c = _case(5, seed=16)
    out = _fused(False, x, g, b, W, c)
    (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with @once_differentiable"):
        gx.sum().backward()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@IS_RMS
def test_every_backend(backend, dtype, is_rms):
    backend_or_skip(backend)
    case = _case(1000, out_features=8, dtype=dtype, seed=17)
    with normkit.use_backend(backend):
        if select_backend(case[0].detach().reshape(-1, 1000)).name != backend:
            pytest.skip(f"backend {backend!r} does not run {dtype}")
        out = _fused(is_rms, *case)
        leaves = _leaves(is_rms, *case)
        dout = randn(out.shape, dtype, seed=18)
        got = torch.autograd.grad(out, leaves, dout)
    with normkit.use_backend("reference"):
        ref = _unfused(is_rms, *case)
        want = torch.autograd.grad(ref, leaves, dout)
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    for gf, gu in zip(got, want):
        scale = max(1.0, gu.double().abs().max().item())
        atol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gf.double() / scale, gu.double() / scale, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda x, g, b, W, c: (x, g, b, W[:, :3], c), ValueError, r"linear_weight must have shape \[out_features, 6\] \(the input's last dim\), got \[7, 3\]"),
        (lambda x, g, b, W, c: (x, g, b, W[0], c), ValueError, r"linear_weight must have shape \[out_features, 6\]"),
        (lambda x, g, b, W, c: (x, g, b, W.double(), c), TypeError, r"linear_weight must have the input's dtype torch.float32, got torch.float64"),
        (lambda x, g, b, W, c: (x, g, b, W, c[:2]), ValueError, r"linear_bias must have shape \[7\], got \[2\]"),
        (lambda x, g, b, W, c: (x, g, b, W, c.half()), TypeError, r"linear_bias must have the input's dtype torch.float32"),
        (lambda x, g, b, W, c: (x, g, b, W.to("meta"), c), ValueError, r"linear_weight is on meta but input is on cpu"),
        (lambda x, g, b, W, c: (x, g, b, "W", c), TypeError, r"linear_weight must be a torch.Tensor, got str"),
        (lambda x, g, b, W, c: (x, g[:5], b, W, c), ValueError, r"Expected weight to be of same shape as normalized_shape"),
        (lambda x, g, b, W, c: (x.long(), g, b, W, c), TypeError, r"input must have a floating dtype"),
    ],
)
def test_bad_input_gets_a_clear_error(make, exc, match):
    x, g, b, W, c = make(*(t.detach() for t in _case(6, seed=19)))
    with pytest.raises(exc, match=match):
        normkit.layer_norm_linear(x, (6,), g, b, W, c)


@IS_RMS
def test_torch_compile_fullgraph(is_rms):
    """The backward takes the reference formula under Dynamo (it cannot trace
    torch.autograd.grad); eager takes the kernels' backward: both must agree."""
    torch._dynamo.reset()
    case = _case(16, out_features=4, seed=20)
    leaves = _leaves(is_rms, *case)
    compiled = torch.compile(lambda *a: _fused(is_rms, *a), fullgraph=True, backend="aot_eager")
    out_c, out_e = compiled(*case), _fused(is_rms, *case)
    torch.testing.assert_close(out_c, out_e)
    dout = randn(out_e.shape, seed=21)
    for gc, ge in zip(torch.autograd.grad(out_c, leaves, dout), torch.autograd.grad(out_e, leaves, dout)):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(prenorm="yes"), TypeError, r"prenorm must be a bool, got 'yes'"),
        (dict(residual_in_fp32=1), TypeError, r"residual_in_fp32 must be a bool, got 1"),
        (dict(residual="r"), TypeError, r"residual"),
        (dict(residual=torch.zeros(2, 3)), ValueError, r"residual"),
    ],
)
def test_bad_residual_options_get_a_clear_error(kwargs, exc, match):
    x, g, b, W, c = (t.detach() for t in _case(6, seed=20))
    with pytest.raises(exc, match=match):
        normkit.layer_norm_linear(x, (6,), g, b, W, c, **kwargs)


@IS_RMS
def test_residual_and_prenorm_match_the_unfused_calls(is_rms):
    """``(out, s)`` with a residual: ``s = x + residual`` (the next block's residual stream) and
    ``out = F.linear(norm(s), W, c)``, forward and every gradient."""
    x, g, b, W, c = _case(50, seed=21)
    r = randn(tuple(x.shape), seed=22, requires_grad=True)
    if is_rms:
        out, s = normkit.rms_norm_linear(x, (50,), g, W, c, residual=r, prenorm=True)
        s_ref = x + r
        out_ref = F.linear(normkit.rms_norm(s_ref, (50,), g), W, c)
    else:
        out, s = normkit.layer_norm_linear(x, (50,), g, b, W, c, residual=r, prenorm=True)
        s_ref = x + r
        out_ref = F.linear(normkit.layer_norm(s_ref, (50,), g, b), W, c)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(out, out_ref)
    dout, ds = randn(tuple(out.shape), seed=23), randn(tuple(s.shape), seed=24)
    leaves = [t for t in (x, r, g, None if is_rms else b, W, c) if t is not None]
    got = torch.autograd.grad((out * dout).sum() + (s * ds).sum(), leaves)
    want = torch.autograd.grad((out_ref * dout).sum() + (s_ref * ds).sum(), leaves)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
