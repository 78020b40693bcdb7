"""The "native" route: plain eager calls on contiguous CPU tensors run normkit._C.try_norm (checks,
kernels and autograd node in C++). Its numbers are covered by the shared backend suite (which
forces "cpu", and contiguous calls then take this route); here: which calls take it, which must
not, that refused calls still get normkit's own errors, and that normkit works without it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import params, randn

import normkit
from normkit import functional as F
from normkit import ops
from normkit import reference as ref
from normkit.backends import cpu as compiled
from normkit.errors import NormShapeError

pytestmark = pytest.mark.skipif(compiled.extension is None, reason="normkit._C is not built")


def _route(x, w=None, b=None, r=None, dropout_p=0.0):
    return F.route(x, r, w, b, False, dropout_p, tuple(x.shape[-1:]))


def test_plain_eager_cpu_calls_take_the_native_route():
    x = randn((3, 5, 7), seed=1)
    w, b = params((7,), seed=2)
    assert _route(x, w, b) == "native"
    assert _route(x.to(torch.bfloat16), w, b, r=randn((3, 5, 7), seed=3).to(torch.bfloat16)) == "native"
    with normkit.use_backend("cpu"):
        assert _route(x, w, b) == "native"


@pytest.mark.parametrize(
    "case",
    ["transposed", "forced_reference", "dropout", "subclass", "fake_mode", "empty"],
)
def test_calls_the_native_route_must_not_take_go_elsewhere(case):
    x = randn((4, 6), seed=4)
    w, b = params((6,), seed=5)
    if case == "transposed":
        assert F.route(x.t(), None, None, None, False, 0.0, (4,)) != "native"
    elif case == "forced_reference":
        with normkit.use_backend("reference"):
            assert _route(x, w, b) != "native"
    elif case == "dropout":  # with gradients: the C++ node has no dropout backward
        assert _route(x.requires_grad_(True), w, b, dropout_p=0.1) != "native"
    elif case == "subclass":

        class Sub(torch.Tensor):
            pass

        assert _route(x.as_subclass(Sub), w, b) != "native"
    elif case == "fake_mode":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            fx = torch.empty(4, 6)
            assert F.native_call(fx, (6,), None, None, 1e-5, None, 0.0, True) is False
            y = normkit.layer_norm(fx, (6,))  # the custom op's fake implementation
        assert y.shape == (4, 6)
    elif case == "empty":
        assert _route(x[:0], w, b) != "native"


def test_results_equal_the_general_path_bit_for_bit():
    """The native route and the general path (autograd Function over the "cpu" backend, taken by
    a non-contiguous input) run the same kernels: same bits, forward and backward."""
    x = randn((33, 257), seed=6, offset=1e4)
    r = randn((33, 257), seed=7)
    w, b = params((257,), seed=8)
    dy, ds = randn((33, 257), seed=9), randn((33, 257), seed=10)

    def run(xx):
        xx, rr, ww, bb = (t.detach().clone().requires_grad_(True) for t in (xx, r, w, b))
        assert (F.route(xx, rr, ww, bb, False, 0.0, (257,)) == "native") == xx.is_contiguous()
        y, s = normkit.layer_norm(xx, 257, ww, bb, residual=rr, prenorm=True)
        return [y, s, *torch.autograd.grad((y * dy).sum() + (s * ds).sum(), (xx, rr, ww, bb))]

    fortran = torch.empty_strided(x.shape, (1, x.shape[0])).copy_(x)  # same values, not contiguous
    for a, c in zip(run(x), run(fortran)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "residual_prenorm", "prenorm_no_residual", "buffers", "int_shape"])
def test_dropout_without_gradients_runs_natively_with_the_general_paths_masks(monkeypatch, case, dtype, is_rms):
    """A dropout call without gradients runs in try_norm (the fused kernel, its seed drawn in C++):
    the same bits as the general path (taken here by the same values in a non-contiguous x), and
    the default generator left in the same state, so torch.manual_seed reproduces either.
    ops.run is not reached."""
    x = randn((3, 37, 129), dtype, seed=11)
    r = randn((3, 37, 129), dtype, seed=12)
    w, b = params((129,), seed=13)
    def fn(x, shape, w, b, **kw):
        return normkit.rms_norm(x, shape, w, **kw) if is_rms else normkit.layer_norm(x, shape, w, b, **kw)

    def call(x):
        kw = {"dropout_p": 0.3}
        shape = 129 if case == "int_shape" else (129,)
        if case == "residual_prenorm":
            kw.update(residual=r, prenorm=True)
        if case == "prenorm_no_residual":
            kw.update(prenorm=True)
        if case == "buffers":
            kw.update(residual=r, prenorm=True, out=torch.full_like(x, float("nan")),
                      residual_out=torch.full_like(x, float("nan")))
        torch.manual_seed(1234)
        out = fn(x, shape, w, b, **kw)
        after = torch.rand(4)  # the generator's state after the call
        if case == "buffers":
            assert out[0] is kw["out"] and out[1] is kw["residual_out"]
        return (out if isinstance(out, tuple) else (out,)), after

    calls = []
    real_run = ops.run
    monkeypatch.setattr(ops, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    with torch.no_grad():
        fast, fast_after = call(x)
        assert not calls, "the dropout call without gradients left the native route"
        slow, slow_after = call(torch.empty_strided(x.shape, (1, 3, 3 * 37), dtype=dtype).copy_(x))
        assert calls, "the general path was not taken"
    assert len(fast) == len(slow)
    for a, c in zip(fast, slow):
        assert a.dtype == c.dtype and torch.equal(a, c)
    assert torch.equal(fast_after, slow_after)
    torch.manual_seed(1234)
    other = fn(x, (129,), w, b, dropout_p=0.3, residual=r)
    torch.manual_seed(4321)
    assert not torch.equal(fn(x, (129,), w, b, dropout_p=0.3, residual=r), other)  # the seed matters


def test_dropout_with_gradients_keeps_the_general_path():
    x = randn((5, 64), seed=14).requires_grad_(True)
    w, b = params((64,), seed=15)
    assert _route(x, w, b, dropout_p=0.2) == "eager"
    assert _route(x.detach(), w, b, dropout_p=0.2) == "native"
    torch.manual_seed(3)
    y = normkit.layer_norm(x, (64,), w, b, dropout_p=0.2)
    assert y.grad_fn is not None
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(normkit.layer_norm(x.detach(), (64,), w, b, dropout_p=0.2), y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_prenorm_without_residual_returns_the_input(dtype):
    x = randn((2, 9), seed=11).to(dtype)
    y, s = normkit.rms_norm(x, 9, prenorm=True)
    assert s is x
    torch.testing.assert_close(y, ref.rms_norm(x, 9), rtol=0, atol=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda x, w: normkit.layer_norm(x, (8,), w), NormShapeError),
        (lambda x, w: normkit.layer_norm(x, (7,), torch.ones(8)), NormShapeError),
        (lambda x, w: normkit.layer_norm(x, (7,), w, eps="1e-5"), TypeError),
        (lambda x, w: normkit.layer_norm(x.int(), (7,), w), TypeError),
    ],
)
def test_refused_calls_still_get_normkits_errors(call, error):
    x = randn((3, 7), seed=12)
    w, _ = params((7,), seed=13)
    with pytest.raises(error):
        call(x, w)


def test_int_eps_and_list_shape_are_validated_then_run_natively():
    x = randn((3, 7), seed=14)
    torch.testing.assert_close(normkit.layer_norm(x, [7], eps=1), ref.layer_norm(x, (7,), eps=1.0))


def test_double_backward_through_the_native_node_matches_the_reference():
    x = randn((3, 11), seed=15, dtype=torch.float64, requires_grad=True)
    w, b = (t.double().requires_grad_(True) for t in params((11,), seed=16))
    assert torch.autograd.gradgradcheck(lambda a, g, c: normkit.layer_norm(a, 11, g, c), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda a, g: normkit.rms_norm(a, 11, g, residual=a * 2.0), (x, w))


def test_without_the_extension_normkit_runs_torchs_ops_and_says_so_once():
    code = (
        "import warnings, torch, normkit\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    x = torch.randn(4, 8)\n"
        "    y1 = normkit.layer_norm(x, 8)\n"
        "    y2 = normkit.rms_norm(x, 8)\n"
        "msgs = [w for w in seen if 'compiled CPU kernels' in str(w.message)]\n"
        "assert len(msgs) == 1, [str(w.message) for w in msgs]\n"
        "assert msgs[0].category is RuntimeWarning and \"torch's own ops\" in str(msgs[0].message), msgs[0]\n"
        "assert 'cpu' not in normkit.backends.available()\n"
        "assert normkit.backends.select_backend(x).name == 'reference'\n"
        "torch.testing.assert_close(y1, torch.nn.functional.layer_norm(x, (8,)))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NORMKIT_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_strided_parameters_of_a_multi_dim_shape():
    """A gain and bias of a 2-D normalized shape that are transposed views (not contiguous):
    forward and every gradient as the reference's."""
    x = randn((3, 4, 8), seed=20, requires_grad=True)
    w = randn((8, 4), seed=21).t().requires_grad_()
    b = randn((8, 4), seed=22).t().requires_grad_()
    assert not w.is_contiguous() and F.native_call(x, (4, 8), w, b, 1e-5, None, 0.0, True)
    dy = randn((3, 4, 8), seed=23)
    got = normkit.layer_norm(x, (4, 8), w, b)
    g_got = torch.autograd.grad(got, (x, w, b), dy)
    want = ref.layer_norm(x, (4, 8), w, b)
    g_want = torch.autograd.grad(want, (x, w, b), dy)
    torch.testing.assert_close(got, want)
    for a, c in zip(g_got, g_want):
        assert a.shape == c.shape
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


# --- the "native_dim" route: dim= and layer_norm_2d normalize middle dims in place (normkit._C.norm_dim)


def _moved_reference(x, start, shape, w, b, is_rms, eps=1e-5):
    k = len(shape)
    src, dst = tuple(range(start, start + k)), tuple(range(x.dim() - k, x.dim()))
    xm = x.movedim(src, dst)
    y = ref.rms_norm(xm, shape, w, eps) if is_rms else ref.layer_norm(xm, shape, w, b, eps)
    return y.movedim(dst, src)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("size, start, k", [((2, 5, 3, 7), 1, 1), ((3, 1, 4), 1, 1), ((2, 6, 4, 9), 1, 2), ((2, 1000, 3), 1, 1), ((4, 3, 2), 0, 1)])
def test_dim_runs_the_strided_kernel_and_matches_the_float64_truth(monkeypatch, is_rms, dtype, size, start, k):
    from helpers import assert_close_to_truth

    calls = []
    real = compiled.extension.norm_dim
    monkeypatch.setattr(compiled.extension, "norm_dim", lambda *a: calls.append(1) or real(*a))
    shape = size[start : start + k]
    x = randn(size, seed=30).to(dtype).requires_grad_()
    w = randn(shape, seed=31).requires_grad_()
    b = None if is_rms else randn(shape, seed=32).requires_grad_()
    dy = randn(size, seed=33).to(dtype)
    fn = normkit.rms_norm if is_rms else normkit.layer_norm
    y = fn(x, shape, w, eps=1e-5, dim=start) if is_rms else fn(x, shape, w, b, 1e-5, dim=start)
    assert calls, "dim= did not run normkit._C.norm_dim"
    leaves = [t for t in (x, w, b) if t is not None]
    got = [y, *torch.autograd.grad(y, leaves, dy)]
    base_y = _moved_reference(x, start, shape, w, b, is_rms)
    base = [base_y, *torch.autograd.grad(base_y, leaves, dy)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[0], leaves64[1]
    b64 = None if is_rms else leaves64[2]
    truth_y = _moved_reference(x64, start, shape, w64, b64, is_rms)
    truth = [truth_y, *torch.autograd.grad(truth_y, leaves64, dy.double())]
    for i, (g, t, c) in enumerate(zip(got, truth, base)):
        assert g.shape == t.shape and g.dtype == c.dtype
        assert_close_to_truth(g, t, c, what=f"item {i}")


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_dim_equals_the_row_kernel_on_the_moved_input(offset):
    """The strided kernel and the row kernel (on a contiguous copy with the dims moved last)
    compute the same formulas: equal to float32 rounding, forward and backward, also at a
    large mean (where both differ from the float64 truth alike)."""
    x = randn((3, 40, 6, 5), seed=34, offset=offset, requires_grad=True)
    w, b = (t.requires_grad_() for t in params((40,), seed=35))
    dy = randn((3, 40, 6, 5), seed=36)
    y = normkit.layer_norm(x, 40, w, b, dim=1)
    g = torch.autograd.grad(y, (x, w, b), dy)
    xm = x.detach().movedim(1, 3).contiguous().requires_grad_()
    ym = normkit.layer_norm(xm, 40, w, b)
    gm = torch.autograd.grad(ym, (xm, w, b), dy.movedim(1, 3).contiguous())
    torch.testing.assert_close(y, ym.movedim(3, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g[0], gm[0].movedim(3, 1), rtol=1e-5, atol=1e-5)
    for a, c in zip(g[1:], gm[1:]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-4)


def test_dim_is_bit_identical_across_thread_counts_and_differentiable_twice():
    from normkit._machine import torch_threads

    x = randn((64, 96, 40), seed=40)
    w, b = params((96,), seed=41)
    dy = randn((64, 96, 40), seed=42)

    def run():
        xx, ww, bb = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = normkit.layer_norm(xx, 96, ww, bb, dim=1)
        return [y, *torch.autograd.grad(y, (xx, ww, bb), dy)]

    first = run()
    with torch_threads(1):
        single = run()
    for a, c in zip(first, single):
        assert torch.equal(a, c)
    x64 = randn((2, 5, 3), seed=43, dtype=torch.float64, requires_grad=True)
    w64, b64 = (t.double().requires_grad_() for t in params((5,), seed=44))
    assert torch.autograd.gradgradcheck(lambda a, g, c: normkit.layer_norm(a, 5, g, c, dim=1), (x64, w64, b64))
    assert torch.autograd.gradgradcheck(lambda a, g: normkit.rms_norm(a, 5, g, dim=1), (x64, w64))
    x3 = randn((2, 3, 4, 5), seed=45, dtype=torch.float64, requires_grad=True)  # two normalized middle dims
    w3 = randn((3, 4), seed=46, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, g: normkit.layer_norm(a, (3, 4), g, dim=1), (x3, w3))


def test_layer_norm_2d_on_nchw_runs_the_strided_kernel(monkeypatch):
    from normkit.functional_channels import layer_norm_2d

    calls = []
    real = compiled.extension.norm_dim
    monkeypatch.setattr(compiled.extension, "norm_dim", lambda *a: calls.append(1) or real(*a))
    x = randn((2, 8, 5, 3), seed=50, requires_grad=True)
    w, b = (t.requires_grad_() for t in params((8,), seed=51))
    y = layer_norm_2d(x, w, b, 1e-6)
    assert calls
    want = _moved_reference(x, 1, (8,), w, b, False, eps=1e-6)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dy = randn((2, 8, 5, 3), seed=52)
    for a, c in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [7, 1000])
@pytest.mark.parametrize("dim", [None, 0])
def test_rows_with_a_large_mean_are_centred_to_float32_precision(n, dim):
    """The kernels keep the row mean as hi + lo (csrc/row_math.h): at a mean of 1e4 the output
    and every gradient stay within a few float32 ulps of the float64 truth, where centring on
    the float32 mean alone (and the float32 reference composite) errs by ~1e-3."""
    x = randn((n, 64) if dim == 0 else (64, n), seed=60, offset=1e4, requires_grad=True)
    w, b = (t.requires_grad_() for t in params((n,), seed=61))
    dy = randn(tuple(x.shape), seed=62)
    y = normkit.layer_norm(x, n, w, b, dim=dim)
    got = [y, *torch.autograd.grad(y, (x, w, b), dy)]
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = _moved_reference(leaves[0], 0, (n,), leaves[1], leaves[2], False) if dim == 0 else ref.layer_norm(leaves[0], n, leaves[1], leaves[2])
    truth = [y64, *torch.autograd.grad(y64, leaves, dy.double())]
    for i, (g, t) in enumerate(zip(got, truth)):
        scale = max(1.0, t.abs().max().item())
        err = (g.double() - t).abs().max().item() / scale
        assert err < 2e-6 * (1 if i != 2 else n ** 0.5 * 8), f"item {i}: relative error {err:.2e}"


def test_native_call_without_prenorm_returns_no_sum():
    """Without autograd the native call forms x + residual without storing it unless prenorm
    asks for it (a write of the whole sum saved); with autograd s is kept for backward."""
    x, r = randn((6, 40), seed=50), randn((6, 40), seed=51)
    w, b = params((40,), seed=52)
    ext = compiled.extension
    with torch.no_grad():
        (y,) = ext.norm(x, 40, w, b, 1e-5, False, r, False)
        y2, s = ext.norm(x, 40, w, b, 1e-5, False, r, True)
    assert torch.equal(y, y2) and torch.equal(s, x + r)
    torch.testing.assert_close(y, ref.layer_norm(x + r, (40,), w, b, 1e-5))
    xg = x.clone().requires_grad_()
    out = ext.norm(xg, 40, w, b, 1e-5, False, r, False)
    assert len(out) == 2 and torch.equal(out[0], y)  # s saved for backward, returned


def test_native_call_prenorm_must_be_a_bool():
    x = randn((3, 4), seed=53)
    with pytest.raises(TypeError, match=r"prenorm: expected a bool, got str"):
        compiled.extension.norm(x, 4, None, None, 1e-5, False, x.clone(), "yes")


FUSED_CASES = {
    "x1_residual_prenorm": dict(residual="r", x1="x1", prenorm=True),
    "rowscale_dropout_masks": dict(residual="r", rowscale="rs", dropout_p=0.25, return_dropout_mask=True),
    "x1_dropout_masks": dict(x1="x1", dropout_p=0.25, return_dropout_mask=True, prenorm=True),
    "weight1_bias1": dict(weight1="w1", bias1="b1"),
    "weight1_buffers": dict(residual="r", weight1="w1", prenorm=True, out="out", out1="out1", residual_out="res_out"),
    "out_dtype_f32": dict(out_dtype=torch.float32),
    "out_dtype_bf16_out": dict(out_dtype=torch.bfloat16, out="out"),
    "residual_in_fp32": dict(residual="r32", residual_in_fp32=True, prenorm=True),
    "residual_in_fp32_same": dict(residual="r", residual_in_fp32=True, prenorm=True, residual_out="res_out"),
    "prenorm_sum_is_input": dict(prenorm=True, out_dtype=torch.float32),
}


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(FUSED_CASES))
def test_option_calls_without_gradients_run_natively_with_the_general_paths_bits(monkeypatch, case, dtype, is_rms):
    """A call with fused options and no gradients runs in try_fused (the kernel contract's fused
    forward in one C++ call): the same outputs, bit for bit, in the same tuple, as the general
    path (plan_call, route, ops.run; taken here by the same values in a non-contiguous x), the
    buffers returned as given, and the default generator left in the same state."""
    shape = (2, 19, 67)
    t = {"r": randn(shape, dtype, seed=21), "x1": randn(shape, dtype, seed=22),
         "r32": randn(shape, torch.float32, seed=23), "rs": randn(shape[:-1], torch.float32, seed=24).abs() + 0.5}
    t["w1"], t["b1"] = params((67,), seed=25)
    w, b = params((67,), seed=26)
    opts = dict(FUSED_CASES[case])
    x = randn(shape, dtype, seed=27)

    def call(xx):
        kw = {}
        for k, v in opts.items():
            if k in ("out", "out1", "residual_out"):
                out_dtype = opts.get("out_dtype") or dtype
                sum_dtype = torch.float32 if opts.get("residual_in_fp32") else dtype
                kw[k] = torch.full(shape, float("nan"), dtype=sum_dtype if k == "residual_out" else out_dtype)
            else:
                kw[k] = t[v] if isinstance(v, str) else v
        torch.manual_seed(99)
        res = (normkit.rms_norm(xx, (67,), w, bias=b, **kw) if is_rms else normkit.layer_norm(xx, (67,), w, b, **kw))
        after = torch.rand(3)
        res = res if isinstance(res, tuple) else (res,)
        for k in ("out", "out1", "residual_out"):
            if k in kw:
                assert any(r is kw[k] for r in res), f"{k} not returned as given"
        return res, after

    calls = []
    real_run = ops.run
    monkeypatch.setattr(ops, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    with torch.no_grad():
        fast, fast_after = call(x)
        assert not calls, f"{case}: the call left the native route"
        slow, slow_after = call(torch.empty_strided(shape, (1, 2, 2 * 19), dtype=dtype).copy_(x))
        assert calls, "the general path was not taken"
    assert len(fast) == len(slow)
    for a, c in zip(fast, slow):
        assert (a is None) == (c is None)
        if a is not None:
            assert a.dtype == c.dtype and a.shape == c.shape and torch.equal(a, c), case
    assert torch.equal(fast_after, slow_after)
    if case == "prenorm_sum_is_input":
        assert fast[1] is x  # s is the input itself, as the general path returns it


@pytest.mark.parametrize("case", ["grad", "dim", "llama", "noncontiguous_x1", "bad_rowscale", "weight1_without_weight",
                                  "np_rate"])
def test_option_calls_try_fused_refuses_take_the_general_path(case):
    """What try_fused does not serve goes to plan_call, which runs it or names the error."""
    x = randn((4, 6, 8), seed=31)
    w, b = params((8,), seed=32)
    w1, b1 = params((8,), seed=33)
    ext = compiled.extension
    args = dict(x=x, normalized_shape=(8,), weight=w, bias=b, eps=1e-5, is_rms=False, residual=None, prenorm=False,
                dropout_p=0.0, residual_in_fp32=False, x1=None, weight1=w1, bias1=b1, rowscale=None,
                return_dropout_mask=False, out_dtype=None, out=None, out1=None, residual_out=None, dim=None, llama=False)
    assert ext.try_fused(**args) is not None
    if case == "grad":
        args["weight1"] = w1.clone().requires_grad_(True)
    elif case == "dim":
        args["dim"] = 2
    elif case == "llama":
        args.update(is_rms=True, llama=True)
    elif case == "noncontiguous_x1":
        args["x1"] = randn((4, 8, 6), seed=34).transpose(1, 2)
    elif case == "bad_rowscale":
        args["rowscale"] = randn((4, 7), seed=35)
    elif case == "weight1_without_weight":
        args["weight"] = None
    elif case == "np_rate":
        args["dropout_p"] = __import__("numpy").float64(0.1)
    assert ext.try_fused(**args) is None
    if case == "bad_rowscale":
        with pytest.raises(NormShapeError, match="rowscale"):
            normkit.layer_norm(x, (8,), w, b, rowscale=args["rowscale"])
    if case == "weight1_without_weight":
        with pytest.raises(ValueError, match="weight1"):
            normkit.layer_norm(x, (8,), None, b, weight1=w1)
