"""The reference defines the semantics: it must agree with torch.nn.functional, with a float64
evaluation, and pass gradcheck for every input of every fused variant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normkit import reference as ref

from helpers import params, randn, tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, nshape", [((7, 1), (1,)), ((3, 3), (3,)), ((5, 1000), (1000,)), ((2, 4097), (4097,)), ((2, 3, 4, 5), (4, 5)), ((6, 2, 3, 5), (2, 3, 5))])
def test_matches_torch_functional(dtype, shape, nshape):
    x = randn(shape, dtype, seed=sum(shape))
    w, b = params(nshape, dtype)
    torch.testing.assert_close(ref.layer_norm(x, nshape, w, b, 1e-5), F.layer_norm(x, nshape, w, b, 1e-5), **tolerance(dtype))
    torch.testing.assert_close(ref.rms_norm(x, nshape, w), F.rms_norm(x, nshape, w), **tolerance(dtype))
    torch.testing.assert_close(ref.layer_norm(x, nshape), F.layer_norm(x, nshape), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_uses_float32_statistics(dtype):
    """Statistics in fp32: the bf16/fp16 result is the fp32 result rounded once."""
    x = randn((16, 1000), dtype, seed=2, offset=3.0)
    w, b = params((1000,), dtype)
    want = ref.layer_norm(x.float(), (1000,), w.float(), b.float()).to(dtype)
    got = ref.layer_norm(x, (1000,), w, b)
    assert got.dtype == dtype
    assert torch.equal(got, want)


def test_fused_variants_equal_their_unfused_composition():
    x, r = randn((9, 33), seed=3), randn((9, 33), seed=4)
    w, b = params((33,))
    y, s = ref.layer_norm(x, 33, w, b, residual=r, prenorm=True)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, F.layer_norm(x + r, (33,), w, b))
    keep = torch.rand(9, 33, generator=torch.Generator().manual_seed(0)) > 0.25
    y, s = ref.rms_norm(x, 33, w, 1e-6, residual=r, prenorm=True, keep_mask=keep, dropout_p=0.25)
    torch.testing.assert_close(s, x * keep / 0.75 + r)
    torch.testing.assert_close(y, F.rms_norm(x * keep / 0.75 + r, (33,), w, 1e-6))


def test_fused_sum_is_rounded_like_the_unfused_add():
    x, r = randn((4, 64), torch.bfloat16, seed=5), randn((4, 64), torch.bfloat16, seed=6)
    y, s = ref.layer_norm(x, 64, residual=r, prenorm=True)
    assert torch.equal(s, x + r)
    assert torch.equal(y, ref.layer_norm(x + r, 64))


def test_large_mean_two_pass_variance():
    """At mean 1e4 the naive E[x^2] - E[x]^2 in float32 is wrong by more than the variance."""
    x = randn((4, 1000), seed=8, offset=1e4)
    naive_var = (x * x).mean(-1) - x.mean(-1) ** 2
    true_var = x.double().var(-1, unbiased=False)
    assert (naive_var.double() - true_var).abs().max() > 0.5  # the trap is real
    y = ref.layer_norm(x, 1000)
    y64 = ref.layer_norm(x.double(), 1000)
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=5e-3)


def test_float64_stays_float64():
    x = randn((3, 10), torch.float64, seed=9)
    y, _, mean, rstd = ref.norm_forward(x, None, None, None, 1e-5, False, None, 0.0, False)
    assert y.dtype == mean.dtype == rstd.dtype == torch.float64


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("prenorm", [False, True])
def test_gradcheck_every_input(is_rms, prenorm):
    x = randn((3, 5), torch.float64, seed=10, requires_grad=True)
    r = randn((3, 5), torch.float64, seed=11, requires_grad=True)
    w, b = (t.double().requires_grad_(True) for t in params((5,), torch.float64))
    keep = torch.tensor([[True, False, True, True, True]] * 3)

    def fn(x, r, w, b):
        if is_rms:
            return ref.rms_norm(x, 5, w, 1e-5, residual=r, prenorm=prenorm, keep_mask=keep, dropout_p=0.2)
        return ref.layer_norm(x, 5, w, b, 1e-5, residual=r, prenorm=prenorm, keep_mask=keep, dropout_p=0.2)

    assert torch.autograd.gradcheck(fn, (x, r, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("with_dsum", [False, True])
def test_explicit_backward_formula_matches_autograd(is_rms, with_dsum):
    """norm_backward (the formula kernels implement) equals autograd through the composite."""
    x = randn((6, 50), torch.float64, seed=12, requires_grad=True)
    r = randn((6, 50), torch.float64, seed=13, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in params((50,), torch.float64))
    keep = torch.rand(6, 50, generator=torch.Generator().manual_seed(1)) > 0.1
    dy, dsum = randn((6, 50), torch.float64, seed=14), randn((6, 50), torch.float64, seed=15)
    bias = None if is_rms else b
    y, s, mean, rstd = ref.norm_forward(x, r, w, bias, 1e-5, is_rms, keep, 0.1, True)
    dx, dres, dw, db = ref.norm_backward(dy, dsum if with_dsum else None, s, w, mean, rstd, is_rms, keep, 0.1)
    fn = ref.rms_norm if is_rms else ref.layer_norm
    args = (w, 1e-5) if is_rms else (w, b, 1e-5)
    y2, s2 = fn(x, 50, *args, residual=r, prenorm=True, keep_mask=keep, dropout_p=0.1)
    loss = (y2 * dy).sum() + ((s2 * dsum).sum() if with_dsum else 0)
    leaves = (x, r, w) if is_rms else (x, r, w, b)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(y, y2)
    for got, want in zip((dx, dres, dw, db), grads):
        torch.testing.assert_close(got, want)


def test_default_rms_eps_is_torchs():
    assert ref.default_rms_eps(torch.bfloat16) == torch.finfo(torch.float32).eps
    x = randn((2, 8), torch.bfloat16, seed=16) * 1e-3
    torch.testing.assert_close(ref.rms_norm(x, 8), F.rms_norm(x, (8,)), **tolerance(torch.bfloat16))
