"""The public functional API: validation errors, edge cases, dispatch and the custom op."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit import reference as ref
from normkit.backends import Backend, get_backend, register_backend, select_backend

from helpers import params, randn


# --- errors name the argument and say expected vs. got


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x: normkit.layer_norm(x, 5), ValueError, r"normalized_shape=\[5\].*\[\*, 5\].*\[2, 4\]"),
        (lambda x: normkit.layer_norm(x, (3, 4)), ValueError, r"normalized_shape=\[3, 4\]"),
        (lambda x: normkit.layer_norm(x, 4, torch.ones(5)), ValueError, r"weight.*\[5\].*\[4\]"),
        (lambda x: normkit.layer_norm(x, 4, None, torch.ones(2, 2)), ValueError, r"bias.*\[2, 2\]"),
        (lambda x: normkit.rms_norm(x, 4, torch.ones(3)), ValueError, r"weight.*\[3\]"),
        (lambda x: normkit.layer_norm(x, 4, eps="1e-5"), TypeError, r"eps must be a real number"),
        (lambda x: normkit.layer_norm(x, -4), ValueError, r"non-negative sizes, got \[-4\]"),
        (lambda x: normkit.layer_norm(x, 4, eps=torch.tensor([1e-5, 1e-5])), TypeError, r"eps must be a real number"),
        (lambda x: normkit.layer_norm(x, ()), ValueError, r"at least one dimension"),
        (lambda x: normkit.layer_norm(x, 4.0), TypeError, r"normalized_shape must be an int"),
        (lambda x: normkit.layer_norm(x.long(), 4), TypeError, r"floating dtype.*torch.int64"),
        (lambda x: normkit.layer_norm(x.numpy(), 4), TypeError, r"input must be a torch.Tensor.*ndarray"),
        (lambda x: normkit.layer_norm(x, 4, torch.ones(4, dtype=torch.int32)), TypeError, r"weight must have a floating dtype"),
        (lambda x: normkit.layer_norm(x, 4, residual=torch.ones(2, 5)), ValueError, r"residual must have the input's shape \[2, 4\], got \[2, 5\]"),
        (lambda x: normkit.layer_norm(x, 4, residual=x.double()), TypeError, r"residual must have the input's dtype torch.float32, got torch.float64"),
        (lambda x: normkit.layer_norm(x, 4, dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        (lambda x: normkit.layer_norm(x, 4, dropout_p=-0.1), ValueError, r"dropout_p"),
        (lambda x: normkit.layer_norm(x, 4, torch.ones(4, device="meta")), ValueError, r"weight is on meta but input is on cpu"),
        (lambda x: normkit.layer_norm(x, 4, residual=torch.ones(2, 4, device="meta")), ValueError, r"residual is on meta"),
    ],
)
def test_bad_input_gets_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call(randn((2, 4), seed=0))


def test_zero_rows_return_empty_outputs():
    x = torch.randn(0, 3, 8, requires_grad=True)
    y = normkit.layer_norm(x, 8, torch.ones(8), torch.zeros(8))
    assert y.shape == (0, 3, 8)
    y, s = normkit.rms_norm(x, 8, residual=torch.randn(0, 3, 8), prenorm=True)
    assert y.shape == s.shape == (0, 3, 8)


def test_accepts_torch_size_and_lists():
    x = randn((3, 4, 5), seed=1)
    want = F.layer_norm(x, (4, 5))
    for shape in ([4, 5], torch.Size([4, 5]), x.shape[1:]):
        torch.testing.assert_close(normkit.layer_norm(x, shape), want)


def test_mixed_parameter_dtype_like_torch():
    """bf16 activations with fp32 parameters (autocast-style) give bf16 output and fp32 grads."""
    x = randn((4, 64), torch.bfloat16, seed=2, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in params((64,)))
    y = normkit.layer_norm(x, 64, w, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, b), rtol=2e-2, atol=2e-2)


def test_prenorm_without_residual_returns_the_input_sum():
    x = randn((3, 7), seed=3, requires_grad=True)
    y, s = normkit.layer_norm(x, 7, prenorm=True)
    assert torch.equal(s, x)
    (y.sum() + (s * 2).sum()).backward()
    want = torch.autograd.grad(F.layer_norm(x, (7,)).sum(), x)[0] + 2
    torch.testing.assert_close(x.grad, want)


def test_dropout_is_reproducible_with_torch_manual_seed():
    x, r = randn((8, 100), seed=4), randn((8, 100), seed=5)
    torch.manual_seed(123)
    a = normkit.layer_norm(x, 100, residual=r, dropout_p=0.5)
    torch.manual_seed(123)
    b = normkit.layer_norm(x, 100, residual=r, dropout_p=0.5)
    assert torch.equal(a, b)


# --- backends and dispatch


def test_reference_is_always_listed():
    assert "reference" in normkit.backends.available()
    with pytest.warns(DeprecationWarning, match="normkit.backends.available"):
        assert normkit.backends() == normkit.backends.available()  # the 0.1 call, for one release
    assert get_backend("reference").is_available()


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown normkit backend 'nope'.*reference"):
        with normkit.use_backend("nope"):
            pass


def test_use_backend_forces_and_restores():
    x = randn((2, 8), seed=6)
    default = select_backend(x).name
    with normkit.use_backend("reference"):
        assert select_backend(x).name == "reference"
    assert select_backend(x).name == default


class _CountingBackend(Backend):
    """A backend that only takes float32 and counts its calls, to observe dispatch."""

    name = "counting"
    default_for = ()

    def __init__(self):
        self.calls = 0

    def supports(self, x, dropout_p):
        return x.dtype == torch.float32

    def fused_forward(self, *args):
        self.calls += 1
        return get_backend("reference").fused_forward(*args)

    def fused_backward(self, *args):
        self.calls += 1
        return get_backend("reference").fused_backward(*args)


def test_registered_backend_runs_and_unsupported_falls_back(monkeypatch):
    counting = _CountingBackend()
    register_backend(counting)
    x = randn((4, 16), seed=7, requires_grad=True)
    with normkit.use_backend("counting"):
        normkit.layer_norm(x, 16).sum().backward()
        assert counting.calls == 2
        y16 = normkit.layer_norm(x.detach().half(), 16)  # unsupported: the reference runs
    assert counting.calls == 2
    torch.testing.assert_close(y16, F.layer_norm(x.detach().half(), (16,)))
    monkeypatch.setenv("NORMKIT_BACKEND", "counting")
    normkit.layer_norm(x.detach(), 16)
    assert counting.calls == 3


def test_environment_variable_selects_backend_in_a_fresh_process():
    code = "import torch, normkit; from normkit.backends import select_backend; print(select_backend(torch.ones(2, 2)).name)"
    out = subprocess.run([sys.executable, "-c", code], env={"NORMKIT_BACKEND": "reference", "PATH": ""}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def test_import_normkit_is_light():
    # (triton is not checked: torch's own torch.library/compiler imports pull it in when present.)
    code = "import sys, normkit; print(any(m in sys.modules for m in ('matplotlib', 'sklearn', 'pandas', 'onnx')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the custom op under autograd and torch.compile


def test_gradcheck_through_the_custom_op():
    x = randn((3, 6), torch.float64, seed=8, requires_grad=True)
    r = randn((3, 6), torch.float64, seed=9, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in params((6,), torch.float64))
    with normkit.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda x, r, w, b: normkit.layer_norm(x, 6, w, b, residual=r, prenorm=True), (x, r, w, b))
        assert torch.autograd.gradcheck(lambda x, r, w: normkit.rms_norm(x, 6, w, 1e-5, residual=r, prenorm=True), (x, r, w))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_eager_path_gradients_when_only_the_sum_is_used(backend):
    """The eager autograd Function does not materialize unused gradients: a loss on the
    prenorm sum alone (y unused) and on y alone must both give the reference's gradients."""
    from helpers import backend_or_skip

    backend_or_skip(backend)
    x, r = randn((5, 7), seed=14, requires_grad=True), randn((5, 7), seed=15, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in params((7,)))
    for pick in (0, 1):
        with normkit.use_backend(backend):
            out = normkit.layer_norm(x, 7, w, b, residual=r, prenorm=True)[pick]
        expected = ref.layer_norm(x, 7, w, b, residual=r, prenorm=True)[pick]
        dy = randn((5, 7), seed=16 + pick)
        got = torch.autograd.grad(out, (x, r, w, b), dy, allow_unused=True)
        want = torch.autograd.grad(expected, (x, r, w, b), dy, allow_unused=True)
        for g, e in zip(got, want):
            if e is None or not e.abs().sum():
                assert g is None or not g.abs().sum(), "gradient where the reference has none"
            else:
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_eager_path_skips_the_custom_op_and_compile_uses_it(monkeypatch):
    """Eager calls go through the low-overhead autograd Function; the custom op is what
    torch.compile sees."""
    from normkit import ops

    calls = []
    monkeypatch.setattr(ops, "_norm_fwd", lambda *a: calls.append(a) or torch.ops.normkit.norm_fwd(*a))
    x = randn((3, 8), seed=17, requires_grad=True)
    normkit.layer_norm(x, 8).sum().backward()
    assert not calls and x.grad is not None


def test_custom_op_passes_torch_opcheck():
    x, r = randn((4, 9), seed=10), randn((4, 9), seed=11)
    w, b = params((9,))
    f32, bf16 = torch.float32, torch.bfloat16
    x1, rowscale = randn((4, 9), seed=12), randn((4,), seed=13)
    for args in [
        (x, r, None, None, w, b, None, None, False, 1e-5, 0.0, f32, f32, True, False, "reference"),
        (x, None, None, None, w, None, None, None, True, 1e-6, 0.0, f32, f32, False, False, "reference"),
        (x, r, x1, None, w, b, w, b, False, 1e-5, 0.0, f32, bf16, True, False, "reference"),
        (x, r, None, rowscale, w, None, None, None, True, 1e-5, 0.0, torch.float64, f32, True, False, "reference"),
    ]:
        torch.library.opcheck(torch.ops.normkit.norm_fwd.default, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph(backend):
    from helpers import backend_or_skip

    backend_or_skip(backend)
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = normkit.nn.LayerNorm(32)
            self.rms = normkit.nn.RMSNorm(32)
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x, h):
            y, h = self.ln(self.fc(x), h, prenorm=True)
            return self.rms(y) + h

    model = Block()
    x, h = randn((5, 32), seed=12, requires_grad=True), randn((5, 32), seed=13)
    with normkit.use_backend(backend):
        eager = model(x, h)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, h)
    torch.testing.assert_close(compiled, eager)
    ge = torch.autograd.grad(eager.sum(), (x, model.ln.weight))
    gc = torch.autograd.grad(compiled.sum(), (x, model.ln.weight))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_input_and_residual_gradients_never_share_memory(backend):
    """dx and dresidual are equal without dropout, but must be separate tensors: a shared one
    would be accumulated twice by a second backward (gradient accumulation)."""
    from helpers import backend_or_skip

    backend_or_skip(backend)
    x, r = randn((4, 8), seed=19, requires_grad=True), randn((4, 8), seed=20, requires_grad=True)
    dy = randn((4, 8), seed=21)
    with normkit.use_backend(backend):
        for _ in range(2):
            normkit.layer_norm(x, 8, residual=r).backward(dy)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    (once,) = torch.autograd.grad(ref.layer_norm(x, 8, residual=r), x, dy)
    torch.testing.assert_close(x.grad, 2 * once)
    torch.testing.assert_close(r.grad, 2 * once)


def test_tiny_layer_norm_never_goes_to_aten(monkeypatch):
    """ATen's CPU layer norm loses accuracy on rows with a large mean; with 0.01 spread around
    1e5 normkit's inference output must match its training output and the reference."""
    monkeypatch.setattr(torch.nn.functional, "layer_norm", lambda *a, **k: pytest.fail("ATen layer norm used"))
    x = randn((4, 4096), seed=28, offset=1e5, scale=0.01)
    with torch.no_grad():
        inference = normkit.layer_norm(x, 4096)
    training = normkit.layer_norm(x.clone().requires_grad_(), 4096).detach()
    assert torch.equal(inference, training)
    truth = ref.layer_norm(x.double(), 4096)
    err, ref_err = (inference.double() - truth).abs().max(), (ref.layer_norm(x, 4096).double() - truth).abs().max()
    assert err <= ref_err and err < 1e-4, (err, ref_err)  # at least as accurate as the float32 reference


def test_torch_jit_trace_records_the_custom_op():
    """Under torch.jit.trace shapes are traced values: the call must go through the custom op
    (whose trace is correct on new inputs), not a backend that needs Python ints."""
    w = params((1024,), seed=29)[0]
    traced = torch.jit.trace(lambda x: normkit.layer_norm(x, 1024, w), randn((256, 1024), seed=30), check_trace=False)
    assert "normkit::norm_fwd" in str(traced.graph)
    x = randn((300, 1024), seed=31)
    torch.testing.assert_close(traced(x), ref.layer_norm(x, 1024, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("n", [3, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constant_rows_normalize_to_the_bias_like_torch(backend, n, dtype):
    """A constant row has variance 0: its output is exactly the bias (eps > 0), or NaN at
    eps = 0 (0 * inf), as torch gives. A rounded row mean would leave residues that rstd
    (1e6 at eps = 1e-12) amplifies to +-0.06."""
    from helpers import backend_or_skip

    backend_or_skip(backend)
    values = torch.tensor([0.1, -3.3, 1e4 + 0.1, 7.0 / 3.0], dtype=torch.float64)
    x = values[:, None].expand(4, n).to(dtype).contiguous()
    b = randn((n,), dtype, seed=4)
    with normkit.use_backend(backend):
        y = normkit.layer_norm(x, (n,), None, b, eps=1e-12)
        y0 = normkit.layer_norm(x, (n,), eps=0.0)
        y_res, _ = normkit.layer_norm(x, (n,), None, b, eps=1e-12, residual=torch.zeros_like(x) + x, prenorm=True)
    assert torch.equal(y, b.expand(4, n)), f"max deviation {(y.double() - b.double()).abs().max():.3g}"
    assert torch.equal(y_res, b.expand(4, n))
    assert torch.isnan(y0).all() and torch.isnan(torch.nn.functional.layer_norm(x.float(), (n,), eps=0.0)).all()
