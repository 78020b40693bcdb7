"""flash-attn's fused options on ``normkit.layer_norm`` / ``normkit.rms_norm``: residual_in_fp32
(and a residual of another dtype), parallel blocks (weight1/bias1, x1, rowscale),
return_dropout_mask, out_dtype / RMS bias / out= buffers, and dim=.

Each is checked against a float64 formula written here (forward and gradients), by float64
gradcheck, in bfloat16/float16 where the rounding is the point, at odd widths, with bad input,
and on the reference, cpu and triton (its interpreter without a GPU) backends.
"""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.backends import select_backend

from helpers import backend_or_skip, randn, tolerance

WIDTHS = (1, 3, 1000)
EPS = 1e-5


def _formula(x, w, b, is_rms, *, residual=None, x1=None, rowscale=None, mask=None, mask1=None, p=0.0, w1=None, b1=None, eps=EPS):
    """flash-attn's definition in float64: ``(y, y1, s)``."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    s = d(x)
    if rowscale is not None:
        s = s * d(rowscale)[..., None]
    if mask is not None:
        s = s * mask.double() / (1.0 - p)
    if x1 is not None:
        s = s + (d(x1) if mask1 is None else d(x1) * mask1.double() / (1.0 - p))
    if residual is not None:
        s = s + d(residual)
    mean = 0.0 if is_rms else s.mean(-1, keepdim=True)
    var = s.square().mean(-1, keepdim=True) if is_rms else (s - mean).square().mean(-1, keepdim=True)
    s_hat = (s - mean) / torch.sqrt(var + eps)

    def affine(g, c):
        y = s_hat if g is None else s_hat * d(g)
        return y if c is None else y + d(c)

    return affine(w, b), (None if w1 is None else affine(w1, b1)), s


def _call(is_rms, x, w, b, **kw):
    n = x.shape[-1] if kw.get("dim") is None else x.shape[kw["dim"]]
    if is_rms:
        return normkit.rms_norm(x, (n,), w, EPS, bias=b, **kw)
    return normkit.layer_norm(x, (n,), w, b, EPS, **kw)


def _params(n, dtype=torch.float32, seed=0, requires_grad=False):
    w = randn((n,), dtype, seed=seed, scale=0.5, offset=1.0, requires_grad=requires_grad)
    b = randn((n,), dtype, seed=seed + 1, scale=0.5, requires_grad=requires_grad)
    return w, b


def _grads_match(outputs, want, leaves, leaves64, cotangents, *, rtol=1e-4, atol=1e-4):
    got = torch.autograd.grad(outputs, leaves, cotangents)
    ref = torch.autograd.grad(want, leaves64, [c.double() for c in cotangents])
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}: {m}")


def _leaves64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


IS_RMS = pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])


# --- residual_in_fp32 and a residual of another dtype


@IS_RMS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_in_fp32_sums_and_normalizes_in_float32(is_rms, dtype):
    """A constant 256 plus a small residual: in 16 bits the sum rounds to steps of 0.125..2;
    the float32 sum keeps it, and y is the float32 norm of that sum rounded once. For layer norm
    the centring amplifies the 16-bit rounding: y follows the exact sum ten times closer."""
    n = 1000
    x = torch.full((4, n), 256.0, dtype=dtype)
    r = randn((4, n), dtype, seed=1, scale=0.3)
    w, b = _params(n, dtype, seed=2)
    y, s = _call(is_rms, x, w, None if is_rms else b, residual=r, prenorm=True, residual_in_fp32=True)
    assert y.dtype == dtype and s.dtype == torch.float32
    assert torch.equal(s, x.float() + r.float())
    want, _, _ = _formula(x, w, None if is_rms else b, is_rms, residual=r)
    torch.testing.assert_close(y.double(), want, **tolerance(dtype))
    assert torch.equal(y, _call(is_rms, s, w, None if is_rms else b).to(dtype))
    y16, s16 = _call(is_rms, x, w, None if is_rms else b, residual=r, prenorm=True)
    assert s16.dtype == dtype
    if not is_rms:
        assert (y16.double() - want).abs().max() > 10 * (y.double() - want).abs().max()


@IS_RMS
def test_residual_in_fp32_without_residual_returns_the_input_in_float32(is_rms):
    x = randn((3, 7), torch.bfloat16, seed=3)
    w, _ = _params(7, torch.bfloat16)
    y, s = _call(is_rms, x, w, None, prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.float32 and torch.equal(s, x.float())
    assert torch.equal(y, _call(is_rms, x, w, None))  # normalizing x.float() is normalizing x


@IS_RMS
@pytest.mark.parametrize(
    "x_dtype, r_dtype, s_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),  # the float32 residual stream
        (torch.float16, torch.float32, torch.float32),
        (torch.float32, torch.float64, torch.float64),  # the residual's dtype, at least float32
        (torch.float32, torch.bfloat16, torch.float32),  # flash-attn would keep bfloat16 here
        (torch.bfloat16, torch.float16, torch.float32),
    ],
)
def test_a_residual_of_another_dtype_with_residual_in_fp32(is_rms, x_dtype, r_dtype, s_dtype):
    n = 33
    x = randn((5, n), x_dtype, seed=4, requires_grad=True)
    r = randn((5, n), r_dtype, seed=5, requires_grad=True)
    w, b = _params(n, torch.float32, seed=6, requires_grad=True)
    b = None if is_rms else b
    y, s = _call(is_rms, x, w, b, residual=r, prenorm=True, residual_in_fp32=True)
    assert y.dtype == x_dtype and s.dtype == s_dtype
    torch.testing.assert_close(s.double(), x.double() + r.double(), rtol=1e-6, atol=1e-6)
    x64, r64, w64 = _leaves64(x, r, w)
    b64 = None if b is None else _leaves64(b)[0]
    want, _, s64 = _formula(x64, w64, b64, is_rms, residual=r64)
    torch.testing.assert_close(y.double(), want, **tolerance(x_dtype))
    dy, ds = randn((5, n), seed=7), randn((5, n), seed=8)
    leaves = [t for t in (x, r, w, b) if t is not None]
    leaves64 = [t for t in (x64, r64, w64, b64) if t is not None]
    wide = x_dtype in (torch.float32, torch.float64) and r_dtype in (torch.float32, torch.float64)
    tol = dict(rtol=1e-4, atol=1e-4) if wide else dict(rtol=3e-2, atol=5e-2)
    _grads_match([y, s], [want, s64], leaves, leaves64, [dy.to(y.dtype), ds.to(s.dtype)], **tol)
    assert r.grad is None  # (grad() above does not accumulate)


def test_a_residual_of_another_dtype_without_the_flag_keeps_the_error():
    x, r = randn((2, 4), torch.bfloat16), randn((2, 4), torch.float32, seed=1)
    for call in (
        lambda: normkit.layer_norm(x, (4,), residual=r),
        lambda: normkit.rms_norm(x, (4,), residual=r, out_dtype=torch.float32),  # another option: same rule
    ):
        with pytest.raises(TypeError, match=r"residual must have the input's dtype torch.bfloat16, got torch.float32 \(pass residual_in_fp32=True"):
            call()
    with pytest.raises(TypeError, match="residual_in_fp32 must be a bool, got 1"):
        normkit.layer_norm(x, (4,), residual=r, residual_in_fp32=1)
    with pytest.raises(TypeError, match="residual must have a floating dtype"):
        normkit.layer_norm(x, (4,), residual=r.long(), residual_in_fp32=True)


@IS_RMS
def test_residual_in_fp32_gradcheck(is_rms):
    x, r = randn((3, 6), torch.float64, seed=9, requires_grad=True), randn((3, 6), torch.float64, seed=10, requires_grad=True)
    w, b = _params(6, torch.float64, seed=11, requires_grad=True)
    f = lambda x, r, w, b: _call(is_rms, x, w, b, residual=r, prenorm=True, residual_in_fp32=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, r, w, b))


# --- parallel blocks: weight1/bias1, x1, rowscale


@IS_RMS
@pytest.mark.parametrize("n", WIDTHS)
def test_weight1_bias1_two_outputs_of_one_normalized_sum(is_rms, n):
    x, r = randn((2, 3, n), seed=n, requires_grad=True), randn((2, 3, n), seed=n + 1, requires_grad=True)
    w, b = _params(n, seed=n + 2, requires_grad=True)
    w1, b1 = _params(n, seed=n + 4, requires_grad=True)
    y, y1, s = _call(is_rms, x, w, b, residual=r, prenorm=True, weight1=w1, bias1=b1)
    leaves = [x, r, w, b, w1, b1]
    x64, r64, w64, b64, w164, b164 = leaves64 = _leaves64(*leaves)
    want, want1, s64 = _formula(x64, w64, b64, is_rms, residual=r64, w1=w164, b1=b164)
    for got, ref in ((y, want), (y1, want1), (s, s64)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=2e-5)
    cot = [randn(x.shape, seed=n + 10 + i) for i in range(3)]
    _grads_match([y, y1, s], [want, want1, s64], leaves, leaves64, cot)
    # the output order without prenorm, and with a gain only
    y_, y1_ = _call(is_rms, x, w, b, residual=r, weight1=w1)
    assert torch.equal(y_, y)
    torch.testing.assert_close(y1_.double(), _formula(x64, w64, b64, is_rms, residual=r64, w1=w164)[1], rtol=1e-5, atol=2e-5)


@IS_RMS
@pytest.mark.parametrize("n", WIDTHS)
def test_x1_is_added_into_the_sum(is_rms, n):
    x, x1, r = (randn((4, n), seed=n + i, requires_grad=True) for i in range(3))
    w, b = _params(n, seed=n + 5, requires_grad=True)
    y, s = _call(is_rms, x, w, b, x1=x1, residual=r, prenorm=True)
    leaves = [x, x1, r, w, b]
    x64, x164, r64, w64, b64 = leaves64 = _leaves64(*leaves)
    want, _, s64 = _formula(x64, w64, b64, is_rms, x1=x164, residual=r64)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=1e-6)
    _grads_match([y, s], [want, s64], leaves, leaves64, [randn((4, n), seed=n + 20), randn((4, n), seed=n + 21)])


@IS_RMS
@pytest.mark.parametrize("n", WIDTHS)
def test_rowscale_scales_each_row_of_x(is_rms, n):
    x, r = randn((2, 3, n), seed=n, requires_grad=True), randn((2, 3, n), seed=n + 1, requires_grad=True)
    rho = randn((2, 3), seed=n + 2, offset=1.0, scale=0.5, requires_grad=True)
    w, b = _params(n, seed=n + 3, requires_grad=True)
    y, s = _call(is_rms, x, w, b, residual=r, rowscale=rho, prenorm=True)
    leaves = [x, r, rho, w, b]
    x64, r64, rho64, w64, b64 = leaves64 = _leaves64(*leaves)
    want, _, s64 = _formula(x64, w64, b64, is_rms, residual=r64, rowscale=rho64)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=1e-6)
    _grads_match([y, s], [want, s64], leaves, leaves64, [randn(x.shape, seed=n + 20), randn(x.shape, seed=n + 21)])


@IS_RMS
def test_parallel_block_gradcheck_with_dropout_replayed(is_rms):
    """x1, weight1/bias1 and dropout together; the mask is fixed by seeding before each call."""
    x, x1, r = (randn((3, 5), torch.float64, seed=20 + i, requires_grad=True) for i in range(3))
    w, b = _params(5, torch.float64, seed=23, requires_grad=True)
    w1, b1 = _params(5, torch.float64, seed=25, requires_grad=True)

    def f(x, x1, r, w, b, w1, b1):
        torch.manual_seed(0)
        return _call(is_rms, x, w, b, x1=x1, residual=r, weight1=w1, bias1=b1, prenorm=True, dropout_p=0.3)

    assert torch.autograd.gradcheck(f, (x, x1, r, w, b, w1, b1))
    rho = randn((3,), torch.float64, seed=27, offset=1.0, requires_grad=True)
    g = lambda x, rho, r, w, b: (torch.manual_seed(1), _call(is_rms, x, w, b, rowscale=rho, residual=r, dropout_p=0.3))[1]  # noqa: E731
    assert torch.autograd.gradcheck(g, (x, rho, r, w, b))


def test_zero_centered_weight_applies_to_weight1_and_llama_mode_to_both_branches():
    x = randn((4, 9), torch.bfloat16, seed=30)
    w, w1 = randn((9,), seed=31, scale=0.2), randn((9,), seed=32, scale=0.2)
    y, y1 = normkit.layer_norm(x, (9,), w, None, weight1=w1, zero_centered_weight=True)
    assert torch.equal(y, normkit.layer_norm(x, (9,), 1 + w))
    assert torch.equal(y1, normkit.layer_norm(x, (9,), 1 + w1))
    wb, w1b = (1 + w).bfloat16(), (1 + w1).bfloat16()
    with normkit.use_backend("reference"):
        y, y1 = normkit.rms_norm(x, (9,), wb, 1e-6, weight1=w1b, casting_mode="llama")
        assert torch.equal(y, normkit.rms_norm(x, (9,), wb, 1e-6, casting_mode="llama"))
        assert torch.equal(y1, normkit.rms_norm(x, (9,), w1b, 1e-6, casting_mode="llama"))


# --- return_dropout_mask


@IS_RMS
@pytest.mark.parametrize("n", WIDTHS)
def test_the_returned_masks_are_the_ones_used(is_rms, n):
    p = 0.25
    x, x1, r = (randn((8, n), seed=n + i, requires_grad=True) for i in range(3))
    w, b = _params(n, seed=n + 3, requires_grad=True)
    torch.manual_seed(n)
    y, s, m, m1 = _call(is_rms, x, w, b, x1=x1, residual=r, prenorm=True, dropout_p=p, return_dropout_mask=True)
    assert m.dtype == m1.dtype == torch.bool and m.shape == m1.shape == x.shape
    if n == 1000:
        assert abs(m.float().mean().item() - (1 - p)) < 0.02 and abs(m1.float().mean().item() - (1 - p)) < 0.02
        assert not torch.equal(m, m1), "x and x1 draw independent masks"
    leaves = [x, x1, r, w, b]
    x64, x164, r64, w64, b64 = leaves64 = _leaves64(*leaves)
    want, _, s64 = _formula(x64, w64, b64, is_rms, x1=x164, residual=r64, mask=m, mask1=m1, p=p)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(s.double(), s64, rtol=1e-6, atol=1e-6)
    _grads_match([y, s], [want, s64], leaves, leaves64, [randn((8, n), seed=n + 9), randn((8, n), seed=n + 10)])
    torch.manual_seed(n)  # torch's generator: reproducible
    again = _call(is_rms, x, w, b, x1=x1, residual=r, prenorm=True, dropout_p=p, return_dropout_mask=True)
    assert torch.equal(again[2], m) and torch.equal(again[3], m1) and torch.equal(again[0], y)


def test_masks_are_none_without_dropout_or_x1_and_the_order_is_flash_attns():
    x, w = randn((3, 6), seed=40), torch.ones(6)
    y, m, m1 = normkit.layer_norm(x, (6,), w, return_dropout_mask=True)
    assert m is None and m1 is None and torch.equal(y, normkit.layer_norm(x, (6,), w))
    y, m, m1 = normkit.layer_norm(x, (6,), w, dropout_p=0.5, training=False, return_dropout_mask=True)
    assert m is None and m1 is None and torch.equal(y, normkit.layer_norm(x, (6,), w))
    y, y1, s, m, m1 = normkit.rms_norm(x, (6,), w, weight1=w, prenorm=True, dropout_p=0.5, return_dropout_mask=True)
    assert m.shape == x.shape and m1 is None and torch.equal(y, y1)
    torch.testing.assert_close(s, x * m / 0.5)


# --- out_dtype, RMS bias, out= / residual_out=


@IS_RMS
def test_out_dtype_from_float32_is_one_cast_of_the_float32_result(is_rms):
    x = randn((5, 1000), seed=50)
    w, b = _params(1000, seed=51)
    b = None if is_rms else b
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        got = _call(is_rms, x, w, b, out_dtype=dt)
        assert got.dtype == dt and torch.equal(got, _call(is_rms, x, w, b).to(dt))


@IS_RMS
def test_out_dtype_from_16_bits_rounds_once(is_rms):
    """bfloat16 in, float32 out: the float32 result, not a widened bfloat16 one."""
    x = randn((6, 1000), torch.bfloat16, seed=52, requires_grad=True)
    w, b = _params(1000, torch.bfloat16, seed=53, requires_grad=True)
    b = None if is_rms else b
    y = _call(is_rms, x, w, b, out_dtype=torch.float32)
    want, _, _ = _formula(x, w, b, is_rms)
    assert y.dtype == torch.float32
    err, err16 = (y.double() - want).abs().max().item(), (_call(is_rms, x, w, b).double() - want).abs().max().item()
    assert err < 1e-5 < err16 / 10, (err, err16)
    fp16 = _call(is_rms, x, w, b, out_dtype=torch.float16)
    assert fp16.dtype == torch.float16 and torch.equal(fp16, y.half())
    dy = randn(y.shape, seed=54)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = _leaves64(x, w)
    ref = torch.autograd.grad(_formula(x64, w64, None if b is None else b.double(), is_rms)[0], (x64, w64), dy.double())
    torch.testing.assert_close(gx.double(), ref[0], **tolerance(torch.bfloat16))
    torch.testing.assert_close(gw.double(), ref[1], rtol=2e-2, atol=0.2)


@pytest.mark.parametrize("n", WIDTHS)
def test_rms_norm_bias(n):
    x, r = randn((4, n), seed=n, requires_grad=True), randn((4, n), seed=n + 1, requires_grad=True)
    w, b = _params(n, seed=n + 2, requires_grad=True)
    y, s = normkit.rms_norm(x, (n,), w, EPS, bias=b, residual=r, prenorm=True)
    leaves = [x, r, w, b]
    x64, r64, w64, b64 = leaves64 = _leaves64(*leaves)
    want, _, s64 = _formula(x64, w64, b64, True, residual=r64)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    _grads_match([y, s], [want, s64], leaves, leaves64, [randn((4, n), seed=n + 5), randn((4, n), seed=n + 6)])
    y64 = lambda x, w, b: normkit.rms_norm(x, (n,), w, EPS, bias=b)  # noqa: E731
    if n <= 3:
        assert torch.autograd.gradcheck(y64, tuple(_leaves64(x, w, b)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_bias_in_16_bits_is_rounded_once(dtype):
    x = randn((6, 1000), dtype, seed=60)
    w, b = _params(1000, dtype, seed=61)
    with normkit.use_backend("reference"):
        got = normkit.rms_norm(x, (1000,), w, EPS, bias=b)
        once = (normkit.rms_norm(x.float(), (1000,), w, EPS) + b.float()).to(dtype)
    assert got.dtype == dtype and torch.equal(got, once)


@IS_RMS
def test_out_and_residual_out_buffers(is_rms):
    x, r = randn((3, 4, 8), seed=70, requires_grad=True), randn((3, 4, 8), seed=71)
    w, b = _params(8, seed=72)
    out, res_out = torch.empty(3, 4, 8), torch.empty(3, 4, 8)
    y, s = _call(is_rms, x, w, b, residual=r, prenorm=True, out=out, residual_out=res_out)
    assert y is out and s is res_out
    want_y, want_s = _call(is_rms, x, w, b, residual=r, prenorm=True)
    assert torch.equal(out, want_y) and torch.equal(res_out, want_s)
    (gx,) = torch.autograd.grad(y.sum() + s.sum(), x)  # gradients flow through the buffers
    (want_gx,) = torch.autograd.grad(want_y.sum() + want_s.sum(), x)
    torch.testing.assert_close(gx, want_gx)
    out16 = torch.empty(3, 4, 8, dtype=torch.bfloat16)
    assert _call(is_rms, x, w, b, out=out16, out_dtype=torch.bfloat16) is out16


@IS_RMS
@pytest.mark.parametrize("grad", [False, True])
def test_out1_receives_the_second_branch(is_rms, grad):
    """out1= is y1's buffer: written by the kernel without gradients, filled by a differentiable
    copy with them; either way the call's y1, bit for bit."""
    x = randn((3, 4, 8), seed=73, requires_grad=grad)
    w, b = _params(8, seed=74)
    w1, b1 = _params(8, seed=76)
    out, out1 = torch.empty(3, 4, 8), torch.empty(3, 4, 8)
    y, y1 = _call(is_rms, x, w, b, weight1=w1, bias1=b1, out=out, out1=out1)
    assert y is out and y1 is out1
    want_y, want_y1 = _call(is_rms, x, w, b, weight1=w1, bias1=b1)
    assert torch.equal(y, want_y) and torch.equal(y1, want_y1)
    if grad:
        (gx,) = torch.autograd.grad(y.sum() + 2 * y1.sum(), x)
        (want_gx,) = torch.autograd.grad(want_y.sum() + 2 * want_y1.sum(), x)
        torch.testing.assert_close(gx, want_gx)
    out1_16 = torch.empty(3, 4, 8, dtype=torch.bfloat16)
    _, y1_16 = _call(is_rms, x, w, b, weight1=w1, out_dtype=torch.bfloat16, out1=out1_16)
    assert y1_16 is out1_16


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(out=torch.empty(2, 5)), ValueError, r"out must have the result's shape \[2, 4\], got \[2, 5\]"),
        (dict(out=torch.empty(2, 4, dtype=torch.float64)), TypeError, r"out must have the result's dtype torch.float32, got torch.float64"),
        (dict(out=torch.empty(2, 4), out_dtype=torch.bfloat16), TypeError, r"out must have the result's dtype torch.bfloat16"),
        (dict(out=torch.empty(2, 4, device="meta")), ValueError, r"out is on meta but input is on cpu"),
        (dict(out=[0.0]), TypeError, r"out must be a torch.Tensor or None, got list"),
        (dict(residual_out=torch.empty(2, 4)), ValueError, r"residual_out= receives the prenorm sum, so it needs prenorm=True"),
        (dict(out1=torch.empty(2, 4)), ValueError, r"out1= receives y1 = x_hat \* weight1 \+ bias1, so it needs weight1, but got weight1=None"),
        (dict(out1=torch.empty(2, 4, dtype=torch.float64), weight1=torch.ones(4)), TypeError, r"out1 must have the result's dtype torch.float32, got torch.float64"),
        (dict(out1=torch.empty(4, 2), weight1=torch.ones(4)), ValueError, r"out1 must have the result's shape \[2, 4\], got \[4, 2\]"),
        (dict(residual_out=torch.empty(2, 4, dtype=torch.bfloat16), prenorm=True), TypeError, r"residual_out must have the result's dtype torch.float32"),
        (dict(residual_out=torch.empty(2, 4), prenorm=True, residual_in_fp32=True, residual=torch.ones(2, 4, dtype=torch.float64)), TypeError, r"residual_out must have the result's dtype torch.float64"),
        (dict(out_dtype=torch.int32), TypeError, r"out_dtype must be None or one of float16, bfloat16, float32, float64, got torch.int32"),
        (dict(out_dtype="bf16"), TypeError, r"out_dtype must be None or one of"),
        (dict(weight1=torch.ones(4), weight=None), ValueError, r"weight1 is the second branch's gain .* needs the first branch's weight too, but got weight=None"),
        (dict(bias1=torch.ones(4)), ValueError, r"bias1 is the second branch's bias and needs weight1, but got weight1=None"),
        (dict(weight1=torch.ones(5)), ValueError, r"Expected weight1 to be of same shape as normalized_shape, but got weight1 of shape \[5\]"),
        (dict(weight1=torch.ones(4), bias1=torch.ones(3)), ValueError, r"Expected bias1 to be of same shape"),
        (dict(x1=torch.ones(2, 5)), ValueError, r"x1 must have the input's shape \[2, 4\], got \[2, 5\]"),
        (dict(x1=torch.ones(2, 4, dtype=torch.float64)), TypeError, r"x1 must have the input's dtype torch.float32, got torch.float64"),
        (dict(x1=torch.ones(2, 4, device="meta")), ValueError, r"x1 is on meta but input is on cpu"),
        (dict(rowscale=torch.ones(4)), ValueError, r"rowscale must have the input's shape without the normalized dims, \[2\], got \[4\]"),
        (dict(rowscale=torch.ones(2, 1)), ValueError, r"rowscale must have the input's shape without the normalized dims"),
        (dict(rowscale=torch.ones(2, dtype=torch.int64)), TypeError, r"rowscale must have a floating dtype"),
        (dict(rowscale=torch.ones(2), x1=torch.ones(2, 4)), ValueError, r"rowscale cannot be combined with x1"),
        (dict(return_dropout_mask=1), TypeError, r"return_dropout_mask must be a bool, got 1"),
        (dict(dim=2), ValueError, r"dim=2 is out of range for an input with 2 dims \(expected -2 <= dim < 2\)"),
        (dict(dim=0), ValueError, r"Given normalized_shape=\[4\] and dim=0, expected input dims 0..0 to be \[4\], but got input of size \[2, 4\]"),
        (dict(dim=1.0), TypeError, r"dim must be an int or None, got 1.0"),
        (dict(dropout_p=1.0, x1=torch.ones(2, 4)), ValueError, r"dropout_p must be in \[0, 1\)"),
    ],
)
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_bad_input_gets_a_clear_error(kwargs, exc, match, is_rms):
    kwargs = dict(kwargs)
    weight = kwargs.pop("weight", torch.ones(4))
    x = randn((2, 4), seed=80)
    with pytest.raises(exc, match=match):
        if is_rms:
            normkit.rms_norm(x, (4,), weight, **kwargs)
        else:
            normkit.layer_norm(x, (4,), weight, **kwargs)


def test_rms_bias_errors():
    x = randn((2, 4), seed=81)
    with pytest.raises(ValueError, match=r"Expected bias to be of same shape as normalized_shape, but got bias of shape \[3\]"):
        normkit.rms_norm(x, (4,), torch.ones(4), bias=torch.ones(3))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None, got float"):
        normkit.rms_norm(x, (4,), torch.ones(4), bias=1.0)


# --- dim=


@pytest.mark.parametrize("n", WIDTHS)
def test_dim_normalizes_channels_of_nchw(n):
    x = randn((2, n, 3, 5), seed=n, requires_grad=True)
    w, b = _params(n, seed=n + 1, requires_grad=True)
    y = normkit.layer_norm(x, (n,), w, b, dim=1)
    assert y.shape == x.shape
    x64, w64, b64 = _leaves64(x, w, b)
    want = _formula(x64.movedim(1, -1), w64, b64, False)[0].movedim(-1, 1)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    _grads_match([y], [want], [x, w, b], [x64, w64, b64], [randn(x.shape, seed=n + 3)])
    assert torch.equal(normkit.layer_norm(x, (n,), w, b, dim=-3), y)
    rms = normkit.rms_norm(x, (n,), w, EPS, dim=1)
    torch.testing.assert_close(rms.double(), _formula(x64.movedim(1, -1), w64, None, True)[0].movedim(-1, 1), rtol=1e-5, atol=2e-5)


def test_dim_with_two_middle_dims_residual_rowscale_and_gradcheck():
    x, r = randn((2, 3, 4, 5), torch.float64, seed=90, requires_grad=True), randn((2, 3, 4, 5), torch.float64, seed=91, requires_grad=True)
    rho = randn((2, 5), torch.float64, seed=92, offset=1.0, requires_grad=True)  # the dims left: 0 and 3
    w, b = _params(12, torch.float64, seed=93)
    w, b = w.reshape(3, 4).requires_grad_(), b.reshape(3, 4).requires_grad_()
    y, s = normkit.layer_norm(x, (3, 4), w, b, residual=r, rowscale=rho, prenorm=True, dim=1)
    flat = lambda t: t.movedim((1, 2), (2, 3)).reshape(2, 5, 12)  # noqa: E731
    want, _, s64 = _formula(flat(x), w.reshape(12), b.reshape(12), False, residual=flat(r), rowscale=rho)
    torch.testing.assert_close(flat(y), want)
    torch.testing.assert_close(flat(s), s64)
    f = lambda x, r, rho, w, b: normkit.layer_norm(x, (3, 4), w, b, residual=r, rowscale=rho, prenorm=True, dim=-3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, r, rho, w, b))
    # the default dim is the plain call
    assert torch.equal(normkit.layer_norm(x, (4, 5), dim=2), normkit.layer_norm(x, (4, 5)))


@IS_RMS
def test_zero_rows_with_every_option(is_rms):
    x = torch.randn(0, 3, 8, requires_grad=True)
    w = torch.ones(8)
    y, y1, s, m, m1 = _call(
        is_rms, x, w, torch.zeros(8), weight1=w, x1=torch.randn(0, 3, 8), residual=torch.randn(0, 3, 8, dtype=torch.float64),
        residual_in_fp32=True, prenorm=True, dropout_p=0.5, return_dropout_mask=True, out_dtype=torch.bfloat16,
    )
    assert y.shape == y1.shape == s.shape == m.shape == m1.shape == (0, 3, 8)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float64
    (gx,) = torch.autograd.grad(y.float().sum() + s.sum(), x)
    assert gx.shape == x.shape


# --- every backend runs the options


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", WIDTHS)
@IS_RMS
def test_options_on_every_backend(backend, dtype, n, is_rms):
    backend_or_skip(backend)
    with normkit.use_backend(backend):
        chosen = select_backend(torch.empty(2, n, dtype=dtype)).name
    if chosen != backend:
        pytest.skip(f"backend {backend!r} does not run {dtype}; falls back to {chosen!r}")
    p = 0.2
    x, x1 = randn((2, n, 3), dtype, seed=n, requires_grad=True), randn((2, n, 3), dtype, seed=n + 1, requires_grad=True)
    r = randn((2, n, 3), torch.float32, seed=n + 2, requires_grad=True)  # a float32 residual stream
    w, b = _params(n, dtype, seed=n + 3, requires_grad=True)
    w1, b1 = _params(n, dtype, seed=n + 5, requires_grad=True)
    torch.manual_seed(n)
    with normkit.use_backend(backend):
        y, y1, s, m, m1 = _call(
            is_rms, x, w, b, residual=r, x1=x1, weight1=w1, bias1=b1, prenorm=True, residual_in_fp32=True,
            dropout_p=p, return_dropout_mask=True, dim=1,
        )
        leaves = [x, x1, r, w, b, w1, b1]
        cot = [randn(x.shape, seed=n + 10 + i).to(t.dtype) for i, t in enumerate((y, y1, s))]
        got = torch.autograd.grad([y, y1, s], leaves, cot)
    assert s.dtype == torch.float32 and y.dtype == y1.dtype == dtype
    leaves64 = _leaves64(*leaves)
    last = lambda t: t.movedim(1, -1)  # noqa: E731
    x64, x164, r64, w64, b64, w164, b164 = leaves64
    want, want1, s64 = _formula(last(x64), w64, b64, is_rms, residual=last(r64), x1=last(x164), mask=last(m), mask1=last(m1), p=p, w1=w164, b1=b164)
    tol = tolerance(dtype) if dtype != torch.float32 else dict(rtol=1e-5, atol=3e-5)
    for got_t, ref in ((y, want), (y1, want1), (s, s64)):
        torch.testing.assert_close(last(got_t).double(), ref, **tol)
    ref_grads = torch.autograd.grad([want, want1, s64], leaves64, [last(c.double()) for c in cot])
    gtol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=0.1 * max(1.0, n**0.5))
    for i, (g, ref) in enumerate(zip(got, ref_grads)):
        torch.testing.assert_close(g.double(), ref, **gtol, msg=lambda msg: f"gradient {i} on {backend}: {msg}")


def test_torch_compile_fullgraph_with_options():
    torch._dynamo.reset()
    x = randn((3, 16), torch.bfloat16, seed=100, requires_grad=True)
    r = randn((3, 16), torch.float32, seed=101)
    w, w1 = randn((16,), seed=102, offset=1.0), randn((16,), seed=103, offset=1.0)

    def f(x, r, w, w1):
        return normkit.rms_norm(x, (16,), w, 1e-6, residual=r, prenorm=True, residual_in_fp32=True, weight1=w1, bias=w1, out_dtype=torch.float32)

    eager = f(x, r, w, w1)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, r, w, w1)
    for e, c in zip(eager, compiled):
        assert e.dtype == c.dtype
        torch.testing.assert_close(c, e)
    ge = torch.autograd.grad(sum(t.sum() for t in eager), x)[0]
    gc = torch.autograd.grad(sum(t.sum() for t in compiled), x)[0]
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_out_is_written_by_the_kernel_without_a_copy(monkeypatch, is_rms, with_residual):
    """Without gradients on the native route, ``out=`` is the kernel's own output buffer: the
    same bits as the allocating call, and no ``copy_`` into it."""
    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip("needs normkit._C")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, 33, generator=g) + 3.0
    r = torch.randn(5, 7, 33, generator=g) if with_residual else None
    w, b = torch.randn(7, 33, generator=g), torch.randn(7, 33, generator=g)
    fn = normkit.rms_norm if is_rms else normkit.layer_norm
    kw = dict(residual=r)
    want = fn(x, (7, 33), w, **kw) if is_rms else fn(x, (7, 33), w, b, **kw)
    out = torch.full_like(x, float("nan"))
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(self) or real_copy(self, src, *a, **k))
    got = fn(x, (7, 33), w, out=out, **kw) if is_rms else fn(x, (7, 33), w, b, out=out, **kw)
    monkeypatch.undo()
    assert got is out and not copies, "out= must be written by the kernel, not copied into"
    assert torch.equal(out, want)
    # with gradients the composition runs, and out carries them
    xg = x.clone().requires_grad_()
    out2 = torch.empty_like(x)
    y2 = fn(xg, (7, 33), w, out=out2, **kw) if is_rms else fn(xg, (7, 33), w, b, out=out2, **kw)
    assert y2.grad_fn is not None
    torch.testing.assert_close(y2.detach(), want)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plain_call_into_buffers_takes_the_native_call(monkeypatch, is_rms, dtype):
    """out= / residual_out= on a plain call without gradients run in the one C++ call of the
    native route (``_C.try_norm``), as the allocating call does, not the Python path of the
    options (which cost ~40 us a call): the Python path is made to fail, and the call still
    returns the buffers, filled with the allocating call's bits."""
    from normkit import dispatch
    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip("needs normkit._C")
    x, r = randn((3, 5, 47), dtype, seed=120) + 50.0, randn((3, 5, 47), dtype, seed=121)
    w, b = _params(47, seed=122)
    b = None if is_rms else b  # (an RMS bias is an option of the Python path)
    want_y, want_s = _call(is_rms, x, w, b, residual=r, prenorm=True)
    want_plain = _call(is_rms, x, w, b)

    def no_python_path(*args, **kwargs):
        raise AssertionError("the buffers took the Python path of the options")

    monkeypatch.setattr(dispatch, "fused_norm", no_python_path)
    out, res_out = torch.empty_like(x), torch.empty_like(x)
    y, s = _call(is_rms, x, w, b, residual=r, prenorm=True, out=out, residual_out=res_out)
    assert y is out and s is res_out
    assert torch.equal(out, want_y) and torch.equal(res_out, want_s)
    out2 = torch.empty_like(x)
    assert _call(is_rms, x, w, b, out=out2) is out2 and torch.equal(out2, want_plain)
    y, s = _call(is_rms, x, w, b, prenorm=True, out=out2)  # no residual: s is x itself
    assert y is out2 and s is x
    # what the native call declines goes to the Python path: gradients (a differentiable copy),
    # a buffer that is not contiguous, not of the result's dtype, overlapping an input, a
    # residual_out without a sum the kernel forms
    declined = [
        dict(out=torch.empty_like(x).transpose(0, 1).contiguous().transpose(0, 1)),
        dict(out=torch.empty(x.shape, dtype=torch.float64)),
        dict(out=x),
        dict(residual=r, prenorm=True, out=torch.empty_like(x), residual_out=r),
        dict(prenorm=True, residual_out=torch.empty_like(x)),
    ]
    for kw in declined:
        with pytest.raises(AssertionError, match="took the Python path"):
            _call(is_rms, x, w, b, **kw)
    with pytest.raises(AssertionError, match="took the Python path"):
        _call(is_rms, x.clone().requires_grad_(), w, b, out=torch.empty_like(x))
    monkeypatch.undo()
    with pytest.raises(normkit.errors.NormOverlapError, match="out shares memory with input"):
        _call(is_rms, x, w, b, out=x)
    with pytest.raises(normkit.errors.NormOverlapError, match="residual_out shares memory with residual"):
        _call(is_rms, x, w, b, residual=r, prenorm=True, residual_out=r)
    with pytest.raises(TypeError, match="out must have the result's dtype"):
        _call(is_rms, x, w, b, out=torch.empty(x.shape, dtype=torch.float64))
    strided = torch.empty_like(x).transpose(0, 1).contiguous().transpose(0, 1)
    assert _call(is_rms, x, w, b, out=strided) is strided and torch.equal(strided, want_plain)


# --- one kernel call per option call (issue 23: the options are switches of one kernel)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("grad", [False, True])
def test_every_option_is_one_kernel_call_and_backward_computes_only_what_is_needed(backend, grad, monkeypatch):
    from helpers import backend_or_skip

    from normkit.backends import get_backend

    backend_or_skip(backend)
    impl = get_backend(backend)
    calls = []
    real_fwd, real_bwd = impl.fused_forward, impl.fused_backward
    monkeypatch.setattr(impl, "fused_forward", lambda *a: calls.append(("fwd", a[8])) or real_fwd(*a))
    monkeypatch.setattr(impl, "fused_backward", lambda *a: calls.append(("bwd", a[11])) or real_bwd(*a))
    if backend == "cpu":  # without gradients the call runs in one C++ call, _C.try_fused
        from normkit.backends import cpu as compiled

        real_try = compiled.extension.try_fused

        def try_fused(*a):
            res = real_try(*a)
            if res is not None:
                calls.append(("fwd", None))
            return res

        monkeypatch.setattr(compiled.extension, "try_fused", try_fused)
    x, r, x1 = randn((3, 5, 24), seed=90), randn((3, 5, 24), seed=91), randn((3, 5, 24), seed=92)
    w, b = _params(24, seed=93)
    w1, b1 = _params(24, seed=94)
    x.requires_grad_(grad)
    w1.requires_grad_(grad)  # the first gain stays frozen: no dweight is computed for it
    with normkit.use_backend(backend):
        y, y1, s = normkit.layer_norm(x, (24,), w, b, residual=r, prenorm=True, x1=x1, weight1=w1, bias1=b1,
                                      out_dtype=torch.float32, residual_in_fp32=True)
        assert [c[0] for c in calls] == ["fwd"], calls
        if grad:
            (y.sum() + 2 * y1.sum() + s.sum()).backward()
    want_y, want_y1, want_s = ref_fused(x.detach(), r, x1, w, b, w1, b1)
    torch.testing.assert_close(y.detach(), want_y)
    torch.testing.assert_close(y1.detach(), want_y1)
    torch.testing.assert_close(s.detach(), want_s)
    if grad:
        assert [c[0] for c in calls] == ["fwd", "bwd"], calls
        needs = calls[1][1]
        assert needs.x and needs.weight1 and not needs.weight and not needs.bias and not needs.residual and not needs.x1
        assert x.grad is not None and w1.grad is not None and w.grad is None


def ref_fused(x, r, x1, w, b, w1, b1):
    s = x + x1 + r
    return (torch.nn.functional.layer_norm(s, (24,), w, b), torch.nn.functional.layer_norm(s, (24,), w1, b1), s)


def test_out_and_residual_out_without_gradients_are_written_by_the_kernel(monkeypatch):
    from normkit.backends import cpu

    if cpu.extension is None:
        pytest.skip("needs normkit._C")
    x, r, x1 = randn((4, 40), seed=95), randn((4, 40), seed=96), randn((4, 40), seed=97)
    w, b = _params(40, seed=98)
    out, res_out = torch.empty(4, 40), torch.empty(4, 40)
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a, **k: copies.append(self) or real_copy(self, src, *a, **k))
    y, s = normkit.rms_norm(x, (40,), w, residual=r, x1=x1, bias=b, prenorm=True, out=out, residual_out=res_out)
    out1 = torch.empty(4, 40)
    y_again, y1 = normkit.rms_norm(x, (40,), w, residual=r, x1=x1, bias=b, weight1=w, bias1=b, out=torch.empty(4, 40),
                                   out1=out1)
    monkeypatch.undo()
    assert y is out and s is res_out and y1 is out1 and not copies
    assert torch.equal(y1, y_again)  # the same gain and bias on both branches
    want_s = x + x1 + r
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(want_s, (40,), w, normkit.reference.default_rms_eps(torch.float32)) + b)


def test_prenorm_with_dim_returns_the_pair_on_every_path():
    """dim= naming a middle dim with prenorm and no residual: (y, x), also on the strided C++ path."""
    x = randn((2, 4, 3), seed=99).double()
    w = randn((4,), seed=100).double()
    for backend in ("cpu", "reference"):
        with normkit.use_backend(backend):
            y, s = normkit.layer_norm(x, (4,), w, None, prenorm=True, dim=1)
        assert s is x
        want = torch.nn.functional.layer_norm(x.movedim(1, -1), (4,), w).movedim(-1, 1)
        torch.testing.assert_close(y, want)


def test_out_buffers_trace_under_fake_tensors():
    """out= / residual_out= under make_fx's fake mode: no data pointer is asked of a FakeTensor."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, r, w = randn((4, 8), seed=101), randn((4, 8), seed=102), randn((8,), seed=103)
    fn = lambda x, r, w, o, ro: normkit.layer_norm(x, (8,), w, None, residual=r, prenorm=True, out=o, residual_out=ro)  # noqa: E731
    graph = make_fx(fn, tracing_mode="fake")(x, r, w, torch.empty(4, 8), torch.empty(4, 8))
    o, ro = torch.empty(4, 8), torch.empty(4, 8)
    y, s = graph(x, r, w, o, ro)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + r, (8,), w))
    torch.testing.assert_close(s, x + r)


def test_backward_op_passes_opcheck_with_placeholders():
    """The backward op's absent gradients have the fake implementation's dtypes."""
    s, dy = randn((3, 6), seed=104).to(torch.bfloat16), randn((3, 6), seed=105)
    w = randn((6,), seed=106)
    mean, rstd = torch.zeros(3), torch.ones(3)
    args = (dy, None, None, s, w, None, None, mean, rstd, torch.tensor(0), False, 1e-5, 0.0, torch.bfloat16, torch.float32,
            "reference", [True, False, False, True, False, False, False], torch.bfloat16, torch.bfloat16)
    torch.library.opcheck(torch.ops.normkit.norm_bwd.default, args, test_utils=("test_schema", "test_faketensor"))


def test_a_backend_that_refuses_the_dtypes_hands_the_call_to_the_reference():
    """Triton's kernels take no float64: a float32 input with a float64 residual stream
    (residual_in_fp32) runs the reference, forward and backward, instead of failing inside it."""
    from helpers import backend_or_skip

    backend_or_skip("triton")
    x, w = randn((4, 8), seed=107).requires_grad_(), randn((8,), seed=108)
    r = randn((4, 8), seed=109).double() + 1e4
    with normkit.use_backend("triton"):
        y, s = normkit.layer_norm(x, (8,), w, None, residual=r, residual_in_fp32=True, prenorm=True)
        (y.sum() + s.sum()).backward()
    xd = x.detach().double().requires_grad_()
    want = torch.nn.functional.layer_norm(xd + r, (8,), w.double())
    (want.sum() + (xd + r).sum()).backward()
    assert y.dtype == torch.float32 and s.dtype == torch.float64
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=0, atol=1e-6)
