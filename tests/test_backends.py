"""One suite of cases run against every backend: forward and all gradients vs a float64 truth.

Each backend (``reference``, ``cpu`` (C++, ``normkit._C``), ``triton`` — on CPU tensors through
``TRITON_INTERPRET=1`` when there is no GPU) is forced with :func:`normkit.use_backend`; a case
whose dtype a backend does not support is skipped here (the fallback is tested elsewhere), and
every case checks that the forced backend really ran.
"""

from __future__ import annotations

import math

import pytest
import torch

import normkit
from normkit import reference as ref
from normkit.backends import select_backend

from helpers import assert_close_to_truth, backend_or_skip, params, randn

BACKENDS = ["reference", "cpu", "triton"]
WIDTHS = [1, 3, 1000, 4097]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = ["plain", "residual_prenorm", "no_affine"]


def _require_runs(name: str, x2d: torch.Tensor, dropout_p: float = 0.0) -> None:
    with normkit.use_backend(name):
        chosen = select_backend(x2d, dropout_p).name
    if chosen != name:
        pytest.skip(f"backend {name!r} does not support {x2d.dtype} on {x2d.device}; falls back to {chosen!r}")


def _forward_backward(fn, x, r, w, b, is_rms, prenorm, dy, ds, eps):
    """Outputs and gradients of ``fn`` (normkit.layer_norm-like or the reference)."""
    leaves = [t for t in (x, r, w, b) if t is not None]
    kwargs = dict(residual=r, prenorm=prenorm)
    n = x.shape[-1]
    out = fn(x, (n,), w, eps, **kwargs) if is_rms else fn(x, (n,), w, b, eps, **kwargs)
    y, s = out if prenorm else (out, None)
    loss = (y.double() * dy).sum() + ((s.double() * ds).sum() if prenorm else 0.0)
    grads = torch.autograd.grad(loss, leaves)
    return [y] + ([s] if prenorm else []) + list(grads)


def _make(rows, n, dtype, variant, is_rms, *, seed=0, offset=0.0):
    x = randn((rows, n), dtype, seed=seed, offset=offset, requires_grad=True)
    r = randn((rows, n), dtype, seed=seed + 10, requires_grad=True) if variant == "residual_prenorm" else None
    if variant == "no_affine":
        w = b = None
    else:
        w, b = params((n,), dtype, seed=seed + 20)
        w.requires_grad_(True)
        b = None if is_rms else b.requires_grad_(True)
    dy = randn((rows, n), torch.float64, seed=seed + 30)
    ds = randn((rows, n), torch.float64, seed=seed + 40)
    return x, r, w, b, dy, ds


def _leaf(t, dtype=torch.float64):
    """A fresh leaf copy of ``t`` in ``dtype`` (``None`` stays ``None``)."""
    return None if t is None else t.detach().to(dtype).requires_grad_(True)


def _check_against_truth(name, rows, n, dtype, variant, is_rms, *, offset=0.0, seed=0):
    backend_or_skip(name)
    x, r, w, b, dy, ds = _make(rows, n, dtype, variant, is_rms, seed=seed, offset=offset)
    _require_runs(name, x.detach())
    prenorm = variant == "residual_prenorm"
    eps = 1e-5 if not is_rms else 1e-6
    public = normkit.rms_norm if is_rms else normkit.layer_norm
    reference = ref.rms_norm if is_rms else ref.layer_norm
    with normkit.use_backend(name):
        got = _forward_backward(public, x, r, w, b, is_rms, prenorm, dy, ds, eps)
    truth = _forward_backward(reference, *(_leaf(t) for t in (x, r, w, b)), is_rms, prenorm, dy, ds, eps)
    # PyTorch's own error in this dtype: the reference composite run in the input dtype.
    baseline = _forward_backward(reference, *(_leaf(t, t.dtype) if t is not None else None for t in (x, r, w, b)), is_rms, prenorm, dy, ds, eps)
    names = ["y"] + (["s"] if prenorm else []) + [k for k, t in zip(("dx", "dresidual", "dweight", "dbias"), (x, r, w, b)) if t is not None]
    for what, g, t, base in zip(names, got, truth, baseline):
        assert g.dtype == base.dtype and g.shape == t.shape, f"{what}: got {g.dtype}{list(g.shape)}"
        # dweight/dbias are sums over rows: their rounding grows like sqrt(rows) * |value|.
        floor = 2e-5 * math.sqrt(rows) if what in ("dweight", "dbias") else 2e-5
        assert_close_to_truth(g, t, base, floor=floor, what=f"{name} {what}")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", WIDTHS)
def test_forward_and_gradients_match_float64(name, is_rms, variant, dtype, n):
    rows = 37 if n < 4097 else 5
    _check_against_truth(name, rows, n, dtype, variant, is_rms, seed=n)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("rows", [1, 3, 65])
def test_row_counts(name, is_rms, rows):
    _check_against_truth(name, rows, 256, torch.float32, "residual_prenorm", is_rms, seed=rows)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_mean_is_exact(name, dtype):
    """x = 1e4 + randn: E[x^2] - E[x]^2 in float32 loses every digit of the variance."""
    _check_against_truth(name, 16, 1000, dtype, "plain", False, offset=1e4, seed=7)


@pytest.mark.parametrize("name", BACKENDS)
def test_large_mean_output_is_unit_variance(name):
    backend_or_skip(name)
    x = randn((8, 4097), seed=3, offset=1e4)
    _require_runs(name, x)
    with normkit.use_backend(name):
        y = normkit.layer_norm(x, (4097,))
    std = y.double().std(-1, unbiased=False)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-3), f"row std {std.min():.4f}..{std.max():.4f}"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_non_contiguous_and_multi_dim(name, is_rms):
    backend_or_skip(name)
    base = randn((6, 5, 7, 9), seed=11, requires_grad=True)
    x = base.transpose(0, 2)  # (7, 5, 6, 9), non-contiguous; normalize over (6, 9)
    assert not x.is_contiguous()
    w, b = params((6, 9))
    w.requires_grad_(True)
    _require_runs(name, x.detach().reshape(-1, 54))
    fn = (lambda t, w: normkit.rms_norm(t, (6, 9), w)) if is_rms else (lambda t, w: normkit.layer_norm(t, (6, 9), w, b))
    rfn = (lambda t, w: ref.rms_norm(t, (6, 9), w)) if is_rms else (lambda t, w: ref.layer_norm(t, (6, 9), w, b.double()))
    with normkit.use_backend(name):
        y = fn(x, w)
    dy = randn(y.shape, seed=12)
    gx, gw = torch.autograd.grad((y * dy).sum(), (base, w))
    x64, w64 = base.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y64 = rfn(x64.transpose(0, 2), w64)
    tx, tw = torch.autograd.grad((y64 * dy.double()).sum(), (x64, w64))
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), tx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw.double(), tw, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_backward_is_deterministic(name, is_rms):
    backend_or_skip(name)
    x, r, w, b, dy, _ = _make(300, 1000, torch.float32, "plain", is_rms, seed=5)
    _require_runs(name, x.detach())
    leaves = [t for t in (x, w, b) if t is not None]

    def grads():
        with normkit.use_backend(name):
            y = normkit.rms_norm(x, 1000, w, 1e-6) if is_rms else normkit.layer_norm(x, 1000, w, b)
        return torch.autograd.grad(y, leaves, dy.float())

    first, second = grads(), grads()
    for a, c in zip(first, second):
        assert torch.equal(a, c), "two identical backward passes gave different bits"


@pytest.mark.parametrize("name", BACKENDS)
def test_nan_row_does_not_leak(name):
    backend_or_skip(name)
    x = randn((5, 300), seed=9)
    x[2, 17] = float("nan")
    x[3, 5] = float("inf")
    _require_runs(name, x)
    w, b = params((300,))
    with normkit.use_backend(name):
        y = normkit.layer_norm(x, (300,), w, b)
    clean = [0, 1, 4]
    torch.testing.assert_close(y[clean], ref.layer_norm(x[clean], (300,), w, b), rtol=1e-5, atol=2e-5)
    assert torch.isnan(y[2]).all()


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_dropout_matches_the_mask_it_applied(name, is_rms):
    """The keep mask is recovered from the prenorm sum (s - r is 0 exactly where x was
    dropped); y, dx and dresidual must then follow the reference with that mask."""
    backend_or_skip(name)
    p, rows, n = 0.3, 64, 517
    x = randn((rows, n), seed=21, requires_grad=True)
    r = randn((rows, n), seed=22, requires_grad=True)
    w, b = params((n,))
    b = None if is_rms else b
    _require_runs(name, x.detach(), p)
    fn = normkit.rms_norm if is_rms else normkit.layer_norm
    args = (w, 1e-6) if is_rms else (w, b, 1e-5)
    with normkit.use_backend(name):
        y, s = fn(x, (n,), *args, residual=r, prenorm=True, dropout_p=p)
    keep = (s - r).detach() != 0
    kept = keep.double().mean().item()
    assert abs(kept - (1 - p)) < 0.02, f"kept fraction {kept:.3f}, expected {1 - p}"
    torch.testing.assert_close(s, x * keep / (1 - p) + r, rtol=1e-6, atol=1e-6)
    rfn = ref.rms_norm if is_rms else ref.layer_norm
    dy, ds = randn((rows, n), seed=23), randn((rows, n), seed=24)
    gx, gr = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), (x, r))
    x2, r2 = x.detach().requires_grad_(True), r.detach().requires_grad_(True)
    y2, s2 = rfn(x2, (n,), *args, residual=r2, prenorm=True, keep_mask=keep, dropout_p=p)
    tx, tr = torch.autograd.grad((y2 * dy).sum() + (s2 * ds).sum(), (x2, r2))
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gx, tx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gr, tr, rtol=1e-4, atol=1e-4)
    # A second call draws a different mask; eval mode (training=False) applies none.
    with normkit.use_backend(name):
        _, s_again = fn(x, (n,), *args, residual=r, prenorm=True, dropout_p=p)
        _, s_eval = fn(x, (n,), *args, residual=r, prenorm=True, dropout_p=p, training=False)
    assert not torch.equal(s_again, s)
    torch.testing.assert_close(s_eval, x + r)
