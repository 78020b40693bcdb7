"""Every autograd mode a torch user may reach normkit with, against torch's own answer.

Double backward (``create_graph=True``: gradient penalties, Hessians, ``gradgradcheck``),
forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``), ``torch.func`` transforms
(``grad``, ``vmap``, ``jacrev``), empty inputs, and the drop-in details (eps as torch takes it,
channels_last, ``except RuntimeError``, TorchScript, dynamic shapes under compile). Each is run
on every backend: float64 on the reference and on cpu (C++), float32 on triton (through
``TRITON_INTERPRET=1``), compared with torch computed in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normkit
from normkit import reference as ref
from normkit.backends import select_backend

from helpers import backend_or_skip, randn

BACKENDS = ["reference", "cpu", "triton"]
DTYPE = {"reference": torch.float64, "cpu": torch.float64, "triton": torch.float32}
# float32 kernels against a float64 truth: second derivatives carry rstd^2 factors.
TOL = {torch.float64: dict(rtol=1e-8, atol=1e-8), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def _setup(backend, n=7, rows=4, seed=0):
    backend_or_skip(backend)
    dtype = DTYPE[backend]
    x = randn((rows, n), dtype, seed=seed, offset=0.5, scale=1.5, requires_grad=True)
    w = randn((n,), dtype, seed=seed + 1, offset=1.0, scale=0.5, requires_grad=True)
    b = randn((n,), dtype, seed=seed + 2, scale=0.5, requires_grad=True)
    r = randn((rows, n), dtype, seed=seed + 3, requires_grad=True)
    with normkit.use_backend(backend):
        assert select_backend(x.detach()).name == backend, "the forced backend must run these cases"
    return x, w, b, r


def _f64(*ts):
    return [t.detach().double().requires_grad_(True) for t in ts]


def _nk(is_rms, residual=False):
    """A normkit call and torch's equivalent, ``f(x, w, b, r) -> (y, s)``."""

    def nk(x, w, b, r):
        kw = dict(residual=r, prenorm=True) if residual else {}
        out = normkit.rms_norm(x, (x.shape[-1],), w, 1e-5, **kw) if is_rms else normkit.layer_norm(x, (x.shape[-1],), w, b, 1e-5, **kw)
        return out if residual else (out, x)

    def th(x, w, b, r):
        s = x + r if residual else x
        y = TF.rms_norm(s, (x.shape[-1],), w, 1e-5) if is_rms else TF.layer_norm(s, (x.shape[-1],), w, b, 1e-5)
        return y, s

    return nk, th


def _penalty(f, x, w, b, r, coef):
    """A WGAN-GP-style penalty: the norm of the input gradient, differentiated again."""
    y, s = f(x, w, b, r)
    (gx,) = torch.autograd.grad((y * coef).sum() + (s * coef).sum(), x, create_graph=True)
    penalty = gx.pow(2).sum()
    return torch.autograd.grad(penalty, [x, w, b, r], allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gradient_penalty_matches_torch(backend, is_rms, residual):
    x, w, b, r = _setup(backend)
    coef = randn(x.shape, torch.float64, seed=9)
    nk, th = _nk(is_rms, residual)
    with normkit.use_backend(backend):
        got = _penalty(nk, x, w, b, r, coef.to(x.dtype))
    want = _penalty(th, *_f64(x, w, b, r), coef)
    for name, g, e in zip(("x", "w", "b", "r"), got, want):
        if e is None or (is_rms and name == "b") or (not residual and name == "r"):
            continue
        assert g is not None, f"no second-order gradient for {name}"
        torch.testing.assert_close(g.double(), e, **TOL[x.dtype], msg=f"d penalty / d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
def test_hessian_and_hvp_match_torch(backend, is_rms):
    x, w, b, _ = _setup(backend, n=5, rows=2)
    nk, th = _nk(is_rms)
    with normkit.use_backend(backend):
        h = torch.autograd.functional.hessian(lambda x: nk(x, w, b, None)[0].pow(3).sum(), x.detach())
        v = randn(x.shape, x.dtype, seed=5)
        _, hv = torch.autograd.functional.hvp(lambda x: nk(x, w, b, None)[0].pow(3).sum(), x.detach(), v)
    xd, wd, bd = _f64(x, w, b)
    h_want = torch.autograd.functional.hessian(lambda x: th(x, wd, bd, None)[0].pow(3).sum(), xd.detach())
    _, hv_want = torch.autograd.functional.hvp(lambda x: th(x, wd, bd, None)[0].pow(3).sum(), xd.detach(), v.double())
    assert h_want.abs().max() > 0.1, "a Hessian that is zero tests nothing"
    torch.testing.assert_close(h.double(), h_want, **TOL[x.dtype])
    torch.testing.assert_close(hv.double(), hv_want, **TOL[x.dtype])


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gradgradcheck(is_rms, residual):
    x, w, b, r = _setup("reference", n=6, rows=3)
    nk, _ = _nk(is_rms, residual)
    inputs = (x, w, r) if is_rms else (x, w, b, r)

    def f(*args):
        x, w, *rest = args
        b = None if is_rms else rest[0]
        return nk(x, w, b, rest[-1])

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_double_backward_with_dropout_uses_the_forward_mask(backend):
    """The second-order path applies the backend's own mask: read it from the prenorm output
    (``s = x * mask / (1 - p)`` without a residual) and compare with the reference composite."""
    x, w, b, _ = _setup(backend, n=33, rows=6)
    p = 0.3
    with normkit.use_backend(backend):
        y, s = normkit.layer_norm(x, (33,), w, b, dropout_p=p, prenorm=True)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        got = torch.autograd.grad(gx.pow(2).sum(), [x, w])
    keep = s.detach() != 0
    assert 0 < keep.float().mean() < 1, "some elements dropped, some kept"
    xd, wd, bd = _f64(x, w, b)
    yd = ref.layer_norm(xd, (33,), wd, bd, keep_mask=keep, dropout_p=p)
    (gxd,) = torch.autograd.grad(yd.pow(2).sum(), xd, create_graph=True)
    want = torch.autograd.grad(gxd.pow(2).sum(), [xd, wd])
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, **TOL[x.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_vmap_jacrev_jvp(backend):
    x, w, b, _ = _setup(backend, n=6, rows=3)
    x, w, b = x.detach(), w.detach(), b.detach()
    xd, wd, bd = (t.double() for t in (x, w, b))

    def nk(x):
        return normkit.layer_norm(x, (6,), w, b)

    def th(x):
        return TF.layer_norm(x, (6,), wd, bd)

    tangent = randn(x.shape, x.dtype, seed=7)
    tol = TOL[x.dtype]
    with normkit.use_backend(backend):
        torch.testing.assert_close(torch.func.grad(lambda x: nk(x).pow(3).sum())(x).double(), torch.func.grad(lambda x: th(x).pow(3).sum())(xd), **tol)
        torch.testing.assert_close(torch.func.vmap(nk)(x).double(), torch.func.vmap(th)(xd), **tol)
        torch.testing.assert_close(torch.func.jacrev(nk)(x).double(), torch.func.jacrev(th)(xd), **tol)
        _, jv = torch.func.jvp(nk, (x,), (tangent,))
        _, jv_want = torch.func.jvp(th, (xd,), (tangent.double(),))
        torch.testing.assert_close(jv.double(), jv_want, **tol)
        # per-sample gradients of the gain: vmap over grad, as in DP-SGD
        per_sample = torch.func.vmap(torch.func.grad(lambda w, x: normkit.rms_norm(x, (6,), w).pow(2).sum()), in_dims=(None, 0))(w, x)
    want = torch.func.vmap(torch.func.grad(lambda w, x: TF.rms_norm(x, (6,), w).pow(2).sum()), in_dims=(None, 0))(wd, xd)
    torch.testing.assert_close(per_sample.double(), want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
def test_forward_ad_dual_tensors(backend, is_rms):
    import torch.autograd.forward_ad as fwAD

    x, w, b, r = _setup(backend, n=9, rows=3)
    tx, tw = randn(x.shape, x.dtype, seed=11), randn(w.shape, x.dtype, seed=12)
    nk, th = _nk(is_rms, residual=True)
    with normkit.use_backend(backend), fwAD.dual_level():
        y, _ = nk(fwAD.make_dual(x.detach(), tx), fwAD.make_dual(w.detach(), tw), b.detach(), r.detach())
        tangent = fwAD.unpack_dual(y).tangent
    with fwAD.dual_level():
        yd, _ = th(fwAD.make_dual(x.detach().double(), tx.double()), fwAD.make_dual(w.detach().double(), tw.double()), b.detach().double(), r.detach().double())
        want = fwAD.unpack_dual(yd).tangent
    assert tangent is not None, "forward AD must return a tangent"
    torch.testing.assert_close(tangent.double(), want, **TOL[x.dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
def test_zero_row_input_keeps_autograd(backend, is_rms):
    backend_or_skip(backend)
    dtype = DTYPE[backend]
    module = (normkit.nn.RMSNorm if is_rms else normkit.nn.LayerNorm)(5, dtype=dtype)
    twin = (torch.nn.RMSNorm if is_rms else torch.nn.LayerNorm)(5, dtype=dtype)
    x = torch.randn(0, 3, 5, dtype=dtype, requires_grad=True)
    with normkit.use_backend(backend):
        y = module(x)
    want = twin(x)
    assert y.shape == want.shape and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(module.weight.grad, torch.zeros(5, dtype=dtype))
    assert x.grad is not None and x.grad.shape == x.shape
    # a size-0 normalized dim: an empty output, as torch gives
    assert normkit.layer_norm(torch.randn(2, 0), (0,)).shape == TF.layer_norm(torch.randn(2, 0), (0,)).shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [-0.5, 0.0, torch.tensor(1e-3)])
def test_eps_as_torch_takes_it(backend, eps):
    x, w, b, _ = _setup(backend, n=8, rows=5)
    with normkit.use_backend(backend):
        got = normkit.layer_norm(x.detach(), (8,), w.detach(), b.detach(), eps)
    want = TF.layer_norm(*(t.detach().double() for t in (x,)), (8,), w.detach().double(), b.detach().double(), eps)
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.double(), want, **TOL[x.dtype], equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rms_norm_keeps_channels_last_like_torch(backend):
    backend_or_skip(backend)
    x = torch.randn(4, 16, 32, 64).to(memory_format=torch.channels_last)  # above the ATen tiny path
    with normkit.use_backend(backend):
        y = normkit.rms_norm(x, (64,))
        ln = normkit.layer_norm(x, (64,))
    want = TF.rms_norm(x, (64,))
    assert y.stride() == want.stride() and y.is_contiguous(memory_format=torch.channels_last)
    assert ln.stride() == TF.layer_norm(x, (64,)).stride()
    torch.testing.assert_close(y, want)


def test_errors_torch_raises_as_runtime_error_are_runtime_errors():
    x = torch.randn(2, 5)
    for call in (lambda: normkit.layer_norm(x, (4,)), lambda: normkit.layer_norm(x, (5,), torch.ones(4)), lambda: normkit.rms_norm(x, (5,), residual=torch.ones(2, 4))):
        with pytest.raises(RuntimeError):  # what code written against torch catches
            call()
        with pytest.raises(ValueError):  # what normkit documents
            call()


def test_torch_jit_script_uses_torch_twins_with_shared_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), normkit.nn.LayerNorm(8), torch.nn.GELU(), normkit.nn.RMSNorm(8, eps=1e-6))
    with torch.no_grad():
        net[1].weight.normal_(1, 0.3)
        net[3].weight.normal_(1, 0.3)
    x = torch.randn(4, 8)
    want = net(x)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), want)
    assert scripted[1].weight is not None
    scripted(x).sum().backward()
    assert net[1].weight.grad is not None, "the scripted model trains the same parameters"


def test_compile_dynamic_shapes():
    torch._dynamo.reset()
    f = torch.compile(lambda x, w: normkit.layer_norm(x, x.shape[-1:], w), dynamic=True, fullgraph=True)
    for n in (5, 7):
        x = torch.randn(3, n, requires_grad=True)
        w = torch.randn(n, requires_grad=True)
        y = f(x, w)
        torch.testing.assert_close(y, TF.layer_norm(x, (n,), w))
        y.sum().backward()
        assert w.grad is not None


def test_jit_trace_with_traced_sizes():
    x = torch.randn(3, 6)
    traced = torch.jit.trace(lambda x: normkit.layer_norm(x, x.shape[-1:]), (x,))
    torch.testing.assert_close(traced(x), TF.layer_norm(x, (6,)))


# --- batched gradients: is_grads_batched, gradcheck's batched mode, vectorized jacobian/hessian.
# The backward runs under vmap with BatchedTensor gradients, which have no memory a kernel could
# read; every backward (the C++ nodes, the eager Function, the custom op) then takes its
# composite form.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_is_grads_batched_matches_per_gradient_calls(backend, is_rms, residual):
    x, w, b, r = _setup(backend, n=8, rows=4)
    nk, _ = _nk(is_rms, residual)
    grads = randn((3, 4, 8), x.dtype, seed=21)
    with normkit.use_backend(backend):
        y, _ = nk(x, w, b, r)
        inputs = (x, w, r) if residual else (x, w)
        batched = torch.autograd.grad(y, inputs, grads, is_grads_batched=True, retain_graph=True)
        for i in range(3):
            single = torch.autograd.grad(y, inputs, grads[i], retain_graph=True)
            for got, want in zip(batched, single):
                torch.testing.assert_close(got[i], want, **TOL[x.dtype])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_batched_grad(backend):
    backend_or_skip(backend)
    x = randn((3, 5), torch.float64, seed=3, offset=0.5, requires_grad=True)
    w = randn((5,), torch.float64, seed=4, offset=1.0, requires_grad=True)
    b = randn((5,), torch.float64, seed=5, requires_grad=True)
    with normkit.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x, w, b: normkit.layer_norm(x, (5,), w, b), (x, w, b), check_batched_grad=True)
        assert torch.autograd.gradcheck(lambda x, w: normkit.rms_norm(x, (5,), w), (x, w), check_batched_grad=True)
        x4 = randn((2, 3, 2, 2), torch.float64, seed=6, requires_grad=True)
        w3 = randn((3,), torch.float64, seed=7, offset=1.0, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, w: normkit.layer_norm(x, (3,), w, dim=1), (x4, w3), check_batched_grad=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True])
def test_vectorized_jacobian_and_hessian(backend, is_rms):
    x, w, b, _ = _setup(backend, n=5, rows=2)
    nk, th = _nk(is_rms)
    f = lambda x: nk(x, w, b, None)[0]  # noqa: E731
    with normkit.use_backend(backend):
        jac = torch.autograd.functional.jacobian(f, x.detach(), vectorize=True)
        hes = torch.autograd.functional.hessian(lambda x: f(x).pow(3).sum(), x.detach(), vectorize=True)
    xd, wd, bd = _f64(x, w, b)
    g = lambda x: th(x, wd, bd, None)[0]  # noqa: E731
    torch.testing.assert_close(jac.double(), torch.autograd.functional.jacobian(g, xd.detach()), **TOL[x.dtype])
    torch.testing.assert_close(hes.double(), torch.autograd.functional.hessian(lambda x: g(x).pow(3).sum(), xd.detach()), **TOL[x.dtype])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 8), (4, 16, 32, 64)])
def test_rms_norm_input_gradient_keeps_channels_last_like_torch(backend, shape):
    backend_or_skip(backend)
    x = torch.randn(*shape).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(shape[-1], requires_grad=True)
    # the upstream gradient in the output's layout (what a downstream channels_last op sends);
    # torch's composite gives the input gradient dy's layout, normkit gives x's
    dy = torch.randn(shape).to(memory_format=torch.channels_last)
    with normkit.use_backend(backend):
        (gx,) = torch.autograd.grad(normkit.rms_norm(x, (shape[-1],), w), x, dy)
    (want,) = torch.autograd.grad(TF.rms_norm(x, (shape[-1],), w), x, dy)
    assert gx.stride() == want.stride(), f"gradient strides {gx.stride()} != torch's {want.stride()}"
    torch.testing.assert_close(gx, want, rtol=1e-4, atol=1e-5)


def test_complex_rms_norm_is_torchs():
    z = torch.randn(3, 6, dtype=torch.complex64, requires_grad=True)
    w = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    got = normkit.rms_norm(z, (6,), w)
    want = TF.rms_norm(z, (6,), w)
    torch.testing.assert_close(got, want)
    g = torch.randn(3, 6, dtype=torch.complex64)
    torch.testing.assert_close(torch.autograd.grad(got, z, g)[0], torch.autograd.grad(want, z, g)[0])
    with pytest.raises(TypeError, match="floating dtype"):
        normkit.layer_norm(z, (6,))  # torch has no complex layer norm either
    with pytest.raises(TypeError, match="floating dtype"):
        normkit.rms_norm(z, (6,), residual=z)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nested_tensor_input(layout, backend):
    backend_or_skip(backend)
    w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    comps = [torch.randn(2, 8), torch.randn(3, 8) + 5.0]
    with normkit.use_backend(backend):
        nt = torch.nested.as_nested_tensor([c.clone().requires_grad_() for c in comps], layout=layout)
        y = normkit.layer_norm(nt, (8,), w, b)
        y_rms = normkit.rms_norm(nt, (8,), w)
        assert y.is_nested and y.layout == layout
        for yc, ync, c in zip(y.unbind(), y_rms.unbind(), comps):
            torch.testing.assert_close(yc, TF.layer_norm(c, (8,), w, b))
            torch.testing.assert_close(ync, TF.rms_norm(c, (8,), w))
        sum(yc.square().sum() for yc in y.unbind()).backward()
    want = torch.autograd.grad(sum(TF.layer_norm(c, (8,), w, b).square().sum() for c in comps), w)[0]
    torch.testing.assert_close(w.grad, want)
    with pytest.raises(TypeError, match="nested"):
        normkit.layer_norm(nt, (8,), residual=nt)
