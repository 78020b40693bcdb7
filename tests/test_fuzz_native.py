"""Fuzzing the compiled core (normkit._C) through the public API and directly.

Every C++ entry point (norm, try_norm, try_fused, accepts, forward, backward, fused_forward / fused_backward,
norm_dim, lstm_/gru_forward / backward, column_dot) gets empty and size-1 dims, odd widths (1, 3, 1000, 4097, few rows), huge
and negative integers, NaN / Inf scalars and data, non-contiguous, expanded, negative-bit and
aliased tensors and random requires_grad patterns. Each example either matches a float64
computation (torch.nn.functional, within the error of torch's own computation in the dtype, the
rule of tests/helpers.py) or raises a *named* exception (TypeError / ValueError / RuntimeError /
IndexError with a message): never a crash, never a SystemError.

Hypothesis runs derandomized; NORMKIT_FUZZ_EXAMPLES sets the examples per test (a few by default,
so the plain test run stays short; `make sanitize` runs many more under ASan / UBSan, where a
crash or undefined behaviour in the C++ stops the run with a report).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normkit
from normkit.backends import cpu as compiled
from normkit.contract import GradNeeds
from normkit.errors import NormOverlapError

_C = compiled.extension
pytestmark = [pytest.mark.fuzz, pytest.mark.skipif(_C is None, reason="normkit._C is not built")]

EXAMPLES = int(os.environ.get("NORMKIT_FUZZ_EXAMPLES", "8"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
NAMED = (TypeError, ValueError, RuntimeError, IndexError)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HUGE = 2**64
NAN, INF = float("nan"), float("inf")


def named_error(fn):
    """``(result, None)`` or ``(None, error)`` for a named error with a message; anything else
    (SystemError, a bare exception) propagates and fails the test."""
    try:
        return fn(), None
    except NAMED as exc:
        assert not isinstance(exc, SystemError)
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None, exc


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def draw_tensor(data, shape, dtype, *, layouts=("contiguous", "transposed", "expanded", "neg", "strided"), nonfinite=False, seed=0):
    """A tensor of ``shape`` and ``dtype`` in one of ``layouts``: its logical values are fresh
    normal draws (with NaN / Inf in a few places if ``nonfinite``)."""
    layout = data.draw(st.sampled_from(layouts), label="layout")
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    numel = math.prod(shape)

    def values(sh):
        v = torch.randn(sh, generator=g, dtype=torch.float64)
        if nonfinite and v.numel():
            flat = v.view(-1)
            for k in range(min(3, flat.numel())):
                flat[int(torch.randint(flat.numel(), (1,), generator=g))] = (NAN, INF, -INF)[k]
        return v.to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return values(shape[:-2] + (shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "expanded" and numel > 0 and any(d > 1 for d in shape):
        d = max(i for i, s in enumerate(shape) if s > 1)
        small = list(shape)
        small[d] = 1
        return values(tuple(small)).expand(shape)  # zero stride along d
    if layout == "neg":
        return torch._neg_view(values(shape))  # raw data hold -x, the negative bit says so
    if layout == "strided" and len(shape) >= 1:
        return values(shape[:-1] + (2 * shape[-1],))[..., ::2]
    return values(shape)


def leaf(t, requires_grad):
    """``t`` as a leaf (the view kept: expand / neg / transpose) that may require grad."""
    if not requires_grad:
        return t
    base = t.detach().clone() if t.is_neg() else t.detach()
    if t.is_neg():
        base = torch._neg_view(base.neg())  # a leaf's neg view: same values, negative bit set
    return base.requires_grad_(True) if base.is_leaf else base.detach().requires_grad_(True)


def assert_matches(got, truth, baseline, what):
    """``got`` within 2x torch's own error of the float64 ``truth`` plus one unit of ``got``'s
    dtype (torch's rounding can be exact by luck), where ``truth`` is finite; non-finite where
    ``truth`` is."""
    floor = max(2e-5, torch.finfo(got.dtype).eps if got.dtype in (torch.float16, torch.bfloat16) else 0.0)
    got = got.detach().double()
    finite = torch.isfinite(truth)
    assert not torch.isfinite(got[~finite]).any(), f"{what}: finite where the float64 computation is not"
    assert_close_to_truth(got[finite], truth[finite], None if baseline is None else baseline.detach().double()[finite],
                          slack=2.0, floor=floor, what=what)


# --- normkit.layer_norm / rms_norm: try_norm, accepts, norm, forward, backward ------------------


@FUZZ
@given(st.data())
def test_layer_norm_and_rms_norm_match_float64_or_name_the_error(data):
    is_rms = data.draw(st.booleans(), label="is_rms")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    n = data.draw(st.sampled_from([0, 1, 3, 8, 1000, 4097]), label="n")
    lead = data.draw(st.lists(st.sampled_from([0, 1, 2, 3] if n < 1000 else [0, 1, 2]), max_size=2), label="lead")
    shape = tuple(lead) + (n,)
    nonfinite = data.draw(st.sampled_from([False, False, True]), label="nonfinite")
    x = draw_tensor(data, shape, dtype, nonfinite=nonfinite, seed=1)
    w_dtype = data.draw(st.sampled_from([dtype, torch.float32]), label="w_dtype")
    w = data.draw(st.sampled_from([None, "w"]), label="w") and draw_tensor(data, (n,), w_dtype, seed=2)
    b = None if is_rms else (data.draw(st.sampled_from([None, "b"]), label="b") and draw_tensor(data, (n,), w_dtype, seed=3))
    r = data.draw(st.sampled_from([None, "r"]), label="r") and draw_tensor(data, shape, dtype, seed=4)
    prenorm = data.draw(st.sampled_from([False, True, False, True, "no", 1, None, 0.0]), label="prenorm")
    eps = data.draw(st.sampled_from([1e-5, 1e-5, 1e-12, 0.0, 0, -1.0, NAN, INF, HUGE, True, "1e-5"]), label="eps")
    dropout_p = data.draw(st.sampled_from([0.0, 0.0, 0, HUGE, -1, NAN, 0.5]), label="dropout_p")
    training = dropout_p != 0.5 or data.draw(st.sampled_from([False]), label="training")
    grads = data.draw(st.lists(st.booleans(), min_size=4, max_size=4), label="requires_grad")
    x, w, b, r = (None if t is None else leaf(t, g and t.dtype.is_floating_point) for t, g in zip((x, w, b, r), grads))

    invalid = (
        not isinstance(prenorm, bool)
        or isinstance(eps, (bool, str))
        or (isinstance(dropout_p, int) and dropout_p != 0)
        or (isinstance(dropout_p, float) and not 0.0 <= dropout_p < 1.0)
    )

    def call():
        if is_rms:
            return normkit.rms_norm(x, (n,), w, eps, residual=r, prenorm=prenorm, dropout_p=dropout_p, training=training)
        return normkit.layer_norm(x, (n,), w, b, eps, residual=r, prenorm=prenorm, dropout_p=dropout_p, training=training)

    out, err = named_error(call)
    if invalid:
        assert err is not None and isinstance(err, (TypeError, ValueError)), f"accepted an invalid call: {out!r}"
        return
    assert err is None, f"a valid call raised {err!r}"
    y, s = out if prenorm else (out, None)

    def reference(cast):  # the float64 truth (cast=double) or torch's own computation in the dtype
        xs = x if r is None else (x.to(acc_dtype(dtype)) + r.to(acc_dtype(dtype))).to(dtype)
        src = xs.double() if cast is torch.float64 else xs
        wc = None if w is None else w.to(src.dtype)
        if is_rms:
            return F.rms_norm(src, (n,), wc, float(eps)), xs
        return F.layer_norm(src, (n,), wc, None if b is None else b.to(src.dtype), float(eps)), xs

    truth, s_ref = reference(torch.float64)
    baseline, _ = reference(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert_matches(y, truth, baseline, "y")
    if s is not None:
        assert torch.equal(s.detach().double().nan_to_num(1e300), s_ref.detach().double().nan_to_num(1e300)), "prenorm sum"
    leaves = [t for t in (x, w, b, r) if t is not None and t.requires_grad]
    if not leaves or nonfinite or y.numel() == 0:
        return
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad((y.double() * dy).sum(), leaves, allow_unused=True)
    want = torch.autograd.grad((truth * dy).sum(), leaves, allow_unused=True)
    base = torch.autograd.grad((baseline.double() * dy).sum(), leaves, allow_unused=True)
    for name, g, t, bl in zip("grad", got, want, base):
        if t is None:
            continue
        assert g is not None
        assert_matches(g, t.double(), None if bl is None else bl, f"gradient {name}")


# --- dim= and layer_norm_2d: norm_dim --------------------------------------------------------------


@FUZZ
@given(st.data())
def test_norm_over_middle_dims_matches_float64(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    outer = data.draw(st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=2), label="outer")
    c = data.draw(st.sampled_from([1, 3, 8, 33]), label="c")
    inner = data.draw(st.lists(st.sampled_from([0, 1, 2, 5]), min_size=1, max_size=2), label="inner")
    shape = tuple(outer) + (c,) + tuple(inner)
    dim = len(outer)
    is_rms = data.draw(st.booleans(), label="is_rms")
    x = draw_tensor(data, shape, dtype, seed=11)
    w = data.draw(st.sampled_from([None, "w"]), label="w") and draw_tensor(data, (c,), dtype, layouts=("contiguous", "neg", "expanded"), seed=12)
    b = None if is_rms else data.draw(st.sampled_from([None, "b"]), label="b") and draw_tensor(data, (c,), dtype, seed=13)
    eps = data.draw(st.sampled_from([1e-5, 1e-5, 0.0, -1.0, NAN]), label="eps")
    grads = data.draw(st.lists(st.booleans(), min_size=3, max_size=3), label="requires_grad")
    x, w, b = (None if t is None else leaf(t, g) for t, g in zip((x, w, b), grads))
    two_d = not is_rms and x.dim() == 4 and dim == 1 and data.draw(st.booleans(), label="layer_norm_2d")
    if two_d:
        y = normkit.layer_norm_2d(x, w, b, eps)
    elif is_rms:
        y = normkit.rms_norm(x, (c,), w, eps, dim=dim)
    else:
        y = normkit.layer_norm(x, (c,), w, b, eps, dim=dim)

    def reference(cast):
        src = x.to(cast).movedim(dim, -1)
        wc = None if w is None else w.to(cast)
        if is_rms:
            out = F.rms_norm(src, (c,), wc, eps)
        else:
            out = F.layer_norm(src, (c,), wc, None if b is None else b.to(cast), eps)
        return out.movedim(-1, dim)

    truth, baseline = reference(torch.float64), reference(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert_matches(y, truth, baseline, "y")
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    if leaves and y.numel() and 0.0 <= eps:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
        got = torch.autograd.grad((y.double() * dy).sum(), leaves)
        want = torch.autograd.grad((truth * dy).sum(), leaves)
        base = torch.autograd.grad((baseline.double() * dy).sum(), leaves)
        for g, t, bl in zip(got, want, base):
            assert_matches(g, t, bl, "gradient")
    elif leaves and x.numel() == 0:  # empty input: zero gradients of the right shapes
        grads_ = torch.autograd.grad(y.sum(), leaves, allow_unused=True)
        for g, t in zip(grads_, leaves):
            assert g is None or (g.shape == t.shape and not g.double().abs().sum())


# --- the raw entry points: argument pools ----------------------------------------------------------

INTS = [0, 1, 2, 3, -1, -(2**63), 2**63 - 1, HUGE, -HUGE, True, 1.5, "3", None]
FLOATS = [1e-5, 0.0, -1e-5, NAN, INF, -INF, HUGE, 2**2000, True, "1e-5", None]
BOOLS = [True, False, 1, 0, None, "no", 0.0]


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_eps(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        f = float(v)
    except OverflowError:  # 2**2000
        return False
    return math.isfinite(f) and f >= 0.0


@FUZZ
@given(st.data())
def test_raw_forward_and_backward_check_every_argument(data):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    rows = data.draw(st.sampled_from([0, 1, 2, 5]), label="rows")
    n = data.draw(st.sampled_from([0, 1, 3, 1000, 4097] if rows <= 2 else [0, 1, 3, 17]), label="n")
    is_rms = data.draw(st.booleans(), label="is_rms")
    x = draw_tensor(data, (rows, n), dtype, seed=21)
    r = data.draw(st.sampled_from([None, "r"]), label="r") and draw_tensor(data, (rows, n), dtype, seed=22)
    w = data.draw(st.sampled_from([None, "w"]), label="w") and draw_tensor(data, (n,), dtype, seed=23)
    b = data.draw(st.sampled_from([None, "b"]), label="b") and draw_tensor(data, (n,), dtype, seed=24)
    eps = data.draw(st.sampled_from([1e-5] * 4 + FLOATS), label="eps")
    flags = [data.draw(st.sampled_from([True, False] * 3 + BOOLS), label=f) for f in ("is_rms", "store_sum")]
    out_kind = data.draw(st.sampled_from([None, None, "fresh", "x", "r", "w", "expanded", "neg", "wrong_dtype", "1d"]), label="out")
    out = {
        None: None,
        "fresh": torch.empty(rows, n, dtype=dtype),
        "x": x,
        "r": r,
        "w": w,
        "expanded": torch.empty(1, n, dtype=dtype).expand(rows, n),
        "neg": torch._neg_view(torch.empty(rows, n, dtype=dtype)),
        "wrong_dtype": torch.empty(rows, n, dtype=torch.int32),
        "1d": torch.empty(rows * n, dtype=dtype),
    }[out_kind]
    valid = (
        x.is_contiguous()
        and (r is None or r.is_contiguous())
        and _is_eps(eps)
        and all(isinstance(f, bool) for f in flags)
        and out_kind in (None, "fresh")
        and not (out_kind == "r" and r is None)
    )
    fwd, err = named_error(lambda: _C.forward(x, r, w, b, eps, flags[0], flags[1], out))
    if out_kind in ("x", "r", "w") and out is not None and out.numel() > 1:
        assert err is not None, "an out= buffer overlapping an input was accepted"
    if not valid:
        return
    assert err is None, f"a valid call raised {err!r}"
    y, s, mean, rstd = fwd
    is_rms = flags[0]
    src = x if r is None else (x.to(acc_dtype(dtype)) + r.to(acc_dtype(dtype))).to(dtype)
    wc, bc = (None if t is None else t.double() for t in (w, b))
    truth = F.rms_norm(src.double(), (n,), wc, eps) if is_rms else F.layer_norm(src.double(), (n,), wc, bc, eps)
    if is_rms and bc is not None:
        truth = truth + bc
    assert_matches(y, truth, None if dtype in (torch.float32, torch.float64) else truth.to(dtype), "y")
    if out is not None:
        assert y.data_ptr() == out.data_ptr()
    # backward from the saved statistics, against autograd on the float64 formula
    dy = draw_tensor(data, (rows, n), dtype, seed=25)
    dsum = data.draw(st.sampled_from([None, "dsum"]), label="dsum") and draw_tensor(data, (rows, n), dtype, seed=26)
    mutation = data.draw(st.sampled_from([None, None, None, "short_rstd", "no_mean", "s_shape", "w_numel"]), label="mutation")
    rstd_arg = rstd[:-1] if mutation == "short_rstd" and rows else rstd
    mean_arg = None if mutation == "no_mean" else mean
    s_arg = src.reshape(n, rows) if mutation == "s_shape" and rows != n and rows * n else src.contiguous()
    w_arg = torch.ones(n + 1, dtype=dtype) if mutation == "w_numel" else w
    bwd, err = named_error(lambda: _C.backward(dy, dsum, s_arg, w_arg, mean_arg, rstd_arg, is_rms))
    bad = (
        not dy.is_contiguous()
        or (dsum is not None and not dsum.is_contiguous())
        or (mutation == "short_rstd" and rows)
        or (mutation == "no_mean" and not is_rms)
        or (mutation == "s_shape" and rows != n and rows * n)
        or mutation == "w_numel"
    )
    if bad:
        assert err is not None, "backward accepted an inconsistent call"
        return
    assert err is None, f"a valid backward raised {err!r}"
    dx, dw, db = bwd
    assert dx.shape == (rows, n) and dw.shape == (n,) and db.shape == (n,)
    if not n or not rows:
        assert not dw.double().abs().sum() and not db.double().abs().sum()
        return
    s64 = src.double().requires_grad_(True)
    w64 = torch.ones(n, dtype=torch.float64) if w is None else w.double()
    w64.requires_grad_(True)
    b64 = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    f = F.rms_norm(s64, (n,), w64, eps) if is_rms else F.layer_norm(s64, (n,), w64, b64, eps)
    f = f + (b64 if is_rms else 0)
    dx64, dw64, db64 = torch.autograd.grad(f, (s64, w64, b64), dy.double())
    if dsum is not None:
        dx64 = dx64 + dsum.double()
    tol = {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 5e-2)
    for name, got, want in (("dx", dx, dx64), ("dw", dw, dw64), ("db", db, db64)):
        finite = torch.isfinite(want)
        err_ = (got.double()[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
        assert err_ <= tol * max(1.0, want[finite].abs().max().item() if finite.any() else 0.0), f"{name}: {err_}"


@FUZZ
@given(st.data())
def test_try_norm_accepts_and_norm_take_any_python_objects(data):
    x = draw_tensor(data, data.draw(st.sampled_from([(2, 8), (0, 8), (3, 1), (2, 3, 4)]), label="shape"), torch.float32, seed=31)
    n = x.shape[-1]
    tensors = [x, torch.ones(n), torch._neg_view(torch.ones(n)), torch.ones(n + 1), torch.ones(n, dtype=torch.int64),
               torch.ones(n, dtype=torch.complex64), torch.ones(1).expand(n), torch.ones(x.shape)]
    pool = tensors + INTS + FLOATS + [(n,), (HUGE,), (-1,), [n], (n, n), (), torch.Size([n]), "x"]
    args = [data.draw(st.sampled_from(pool), label=f"arg{i}") for i in range(9)]
    # out= / residual_out=: None, or anything of the pool (x itself, a fresh buffer, a wrong one)
    buffers = [data.draw(st.sampled_from([None, None, torch.empty_like(x)] + pool), label=f"buffer{i}") for i in range(2)]
    shape_arg = data.draw(st.sampled_from([n, (n,), torch.Size([n]), HUGE, -HUGE, (HUGE,), [n], 1.0, "n", ()]), label="shape_arg")
    res, _ = named_error(lambda: _C.try_norm(x, shape_arg, *args[:7], out=buffers[0], residual_out=buffers[1]))
    if res is not None:  # a call it took: the result of the general path
        y = res[0] if isinstance(res, tuple) else res
        assert isinstance(y, torch.Tensor) and y.shape == x.shape
        if buffers[0] is not None:  # a buffer it took is written, not an input it reads
            assert y is buffers[0] and all(y is not t for t in [x, *args[:7]])
    ok, err = named_error(lambda: _C.accepts(x, shape_arg, args[0], args[1], args[2], args[3], args[4]))
    assert err is None and isinstance(ok, bool), "accepts must answer, not raise"
    named_error(lambda: _C.norm(x, args[0], args[1], args[2], args[3], args[4], args[5]))
    # the Python side sees no pending error after any of them
    assert (lambda: 1)() == 1


@FUZZ
@given(st.data())
def test_try_fused_takes_any_python_objects(data):
    """try_fused, the C++ route of option calls: any object in any argument either is refused (None)
    or runs a call the general path would run, with its result (the same values, checked against
    normkit.layer_norm / rms_norm on a copy of x in reversed dim order, which the general path
    takes wherever that layout is not contiguous)."""
    x = draw_tensor(data, data.draw(st.sampled_from([(2, 8), (0, 8), (3, 1), (2, 3, 4)]), label="shape"), torch.float32, seed=37)
    n = x.shape[-1]
    lead = x.shape[:-1]
    tensors = [x, torch.ones(n), torch._neg_view(torch.ones(n)), torch.ones(n + 1), torch.ones(n, dtype=torch.int64),
               torch.ones(1).expand(n), torch.randn(x.shape), torch.randn(x.shape).bfloat16(), torch.rand(lead) + 0.5,
               torch.randn(x.shape[::-1]).transpose(0, -1) if x.dim() > 1 else torch.randn(n)]
    pool = tensors + INTS + FLOATS + [(n,), (HUGE,), [n], (), "x", True, False, torch.bfloat16, torch.int32]
    names = ["weight", "bias", "eps", "is_rms", "residual", "prenorm", "dropout_p", "residual_in_fp32", "x1", "weight1",
             "bias1", "rowscale", "return_dropout_mask", "out_dtype", "out", "out1", "residual_out", "dim", "llama"]
    good = dict(weight=torch.ones(n), bias=None, eps=1e-5, is_rms=False, residual=None, prenorm=False, dropout_p=0.0,
                residual_in_fp32=False, x1=None, weight1=None, bias1=None, rowscale=None, return_dropout_mask=False,
                out_dtype=None, out=None, out1=None, residual_out=None, dim=None, llama=False)
    kw = dict(good)
    for name in data.draw(st.lists(st.sampled_from(names), max_size=4), label="changed"):
        kw[name] = data.draw(st.sampled_from([None] + pool), label=name)
    shape_arg = data.draw(st.sampled_from([n, (n,), torch.Size([n]), HUGE, (HUGE,), [n], "n"]), label="shape_arg")
    res, err = named_error(lambda: _C.try_fused(x, shape_arg, **kw))
    if res is None or err is not None:
        return
    outs = res if isinstance(res, tuple) else (res,)
    assert isinstance(outs[0], torch.Tensor) and outs[0].shape == x.shape
    if kw["dropout_p"]:
        return  # (a fresh seed: other masks; tests/test_native_route.py compares them under one seed)
    api = {k: v for k, v in kw.items() if k not in ("weight", "bias", "eps", "is_rms", "llama")}
    for k in ("out", "out1", "residual_out"):  # fresh buffers of the same kind for the second call
        api[k] = None if api[k] is None else torch.empty_like(api[k])
    xt = torch.empty(x.shape[::-1]).permute(*range(x.dim() - 1, -1, -1)).copy_(x)
    with torch.no_grad():
        if kw["is_rms"]:
            want = normkit.rms_norm(xt, shape_arg, kw["weight"], kw["eps"], bias=kw["bias"], **api)
        else:
            want = normkit.layer_norm(xt, shape_arg, kw["weight"], kw["bias"], kw["eps"], **api)
    want = want if isinstance(want, tuple) else (want,)
    assert len(want) == len(outs)
    for a, c in zip(outs, want):
        assert (a is None) == (c is None)
        if a is not None:
            assert a.dtype == c.dtype and torch.equal(a, c)


@FUZZ
@given(st.data())
def test_raw_norm_dim_checks_dims_and_scalars(data):
    shape = data.draw(st.sampled_from([(2, 3, 4), (0, 3, 2), (2, 0, 3), (1, 1, 1), (3,), (2, 5)]), label="shape")
    x = draw_tensor(data, shape, data.draw(st.sampled_from(DTYPES), label="dtype"), seed=41)
    start = data.draw(st.sampled_from([0, 1, 2] * 3 + INTS), label="start")
    k = data.draw(st.sampled_from([1, 1, 2] * 3 + INTS), label="k")
    eps = data.draw(st.sampled_from([1e-5] * 4 + FLOATS), label="eps")
    is_rms = data.draw(st.sampled_from([True, False] * 3 + BOOLS), label="is_rms")
    valid_dims = _is_int(start) and _is_int(k) and 0 <= start < x.dim() and 1 <= k <= x.dim() - start
    nsize = math.prod(shape[start:start + k]) if valid_dims else 1
    w = data.draw(st.sampled_from([None, "w", "bad"]), label="w")
    w = None if w is None else torch.randn(nsize if w == "w" else nsize + 1, dtype=x.dtype)
    req = data.draw(st.booleans(), label="requires_grad")
    x = leaf(x, req)
    y, err = named_error(lambda: _C.norm_dim(x, start, k, w, None, eps, is_rms))
    valid = valid_dims and _is_eps(eps) and isinstance(is_rms, bool) and (w is None or w.numel() == nsize)
    if not valid:
        assert err is not None, "norm_dim accepted an invalid call"
        return
    assert err is None, f"a valid call raised {err!r}"
    dims = tuple(range(start, start + k))
    src = x.double().movedim(dims, tuple(range(x.dim() - k, x.dim())))
    nshape = tuple(shape[start:start + k])
    wc = None if w is None else w.double().view(nshape)
    truth = F.rms_norm(src, nshape, wc, eps) if is_rms else F.layer_norm(src, nshape, wc, None, eps)
    truth = truth.movedim(tuple(range(x.dim() - k, x.dim())), dims)
    assert_matches(y, truth, None if x.dtype in (torch.float32, torch.float64) else truth.to(x.dtype), "y")
    if req:
        (g,) = torch.autograd.grad(y.double().sum() if y.numel() else y.sum(), x)
        assert g.shape == x.shape


# --- column_dot -----------------------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_column_dot_matches_float64(data):
    rows, g = data.draw(st.sampled_from([0, 1, 3, 64]), label="rows"), data.draw(st.sampled_from([0, 1, 5, 130]), label="g")
    u = draw_tensor(data, (rows, g), torch.float32, seed=51)
    v = data.draw(st.sampled_from([None, "v", "bad_shape", "bad_dtype", "1d"]), label="v")
    v = {None: None, "v": draw_tensor(data, (rows, g), torch.float32, seed=52), "bad_shape": torch.ones(rows + 1, max(g - 1, 0)),
         "bad_dtype": torch.ones(rows, g, dtype=torch.float64), "1d": torch.ones(rows * g)}[v]
    out, err = named_error(lambda: _C.column_dot(u, v))
    if v is not None and (v.dtype != torch.float32 or v.shape != (rows, g)):
        assert err is not None
        return
    assert err is None, f"a valid call raised {err!r}"
    want = (u.double() * (1.0 if v is None else v.double())).sum(0)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# --- the LN-LSTM / LN-GRU time loops ----------------------------------------------------------------

GATE_VALUES = [NAN, INF, -INF, 1e30, -1e30, 88.3762626647949, 88.38, 89.0, 44.2, -87.34, -88.0, -104.0, 0.0, 0.5, -3.0]


def _sigmoid(t):
    return torch.sigmoid(t)


def _ln(v, eps):
    mean = v.mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + eps)


@FUZZ
@given(st.data())
def test_rnn_gates_saturate_and_propagate_nan_without_undefined_behaviour(data):
    """The recurrent gain 0 makes the gate pre-activations exactly xg, so the fast exp's edges
    (NaN, +-Inf, the top of its range where the exponent would be 128) reach sigmoid / tanh
    directly; the result is checked against torch's float64 functions."""
    kind = data.draw(st.sampled_from(["lstm", "gru"]), label="kind")
    H, B = data.draw(st.sampled_from([1, 2, 5]), label="H"), data.draw(st.sampled_from([1, 2, 3]), label="B")
    G = (4 if kind == "lstm" else 3) * H
    vals = data.draw(st.lists(st.sampled_from(GATE_VALUES), min_size=B * G, max_size=B * G), label="xg")
    xg = torch.tensor(vals, dtype=torch.float32).view(B, G)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    w_hh = torch.randn(G, H)
    eps = 1e-5
    if kind == "lstm":
        w_c, b_c = torch.rand(H) + 0.5, torch.randn(H)
        out = _C.lstm_forward(xg, h0, c0, w_hh, torch.zeros(G), w_c, b_c, [(0, B)], eps)[0]
        x64 = xg.double()
        i, f, gg, o = _sigmoid(x64[:, :H]), _sigmoid(x64[:, H:2 * H]), torch.tanh(x64[:, 2 * H:3 * H]), _sigmoid(x64[:, 3 * H:])
        c = f * c0.double() + i * gg
        want = o * torch.tanh(_ln(c, eps) * w_c.double() + b_c.double())
    else:
        out = _C.gru_forward(xg, h0, w_hh, torch.zeros(G), torch.zeros(G), [(0, B)], eps)[0]
        x64 = xg.double()
        r_, z = _sigmoid(x64[:, :H]), _sigmoid(x64[:, H:2 * H])
        nn_ = torch.tanh(x64[:, 2 * H:] + r_ * 0.0)
        want = (1 - z) * nn_ + z * h0.double()
    assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN must propagate exactly where it does in float64"
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5, equal_nan=True)


@FUZZ
@given(st.data())
def test_rnn_modules_fast_path_matches_the_reference_on_extreme_inputs(data):
    kind = data.draw(st.sampled_from(["LSTM", "GRU"]), label="kind")
    T, B, I, H = (data.draw(st.sampled_from(v), label=lbl) for v, lbl in (([1, 3], "T"), ([1, 2], "B"), ([1, 3], "I"), ([1, 4], "H")))
    torch.manual_seed(61)
    m = (normkit.nn.LayerNormLSTM if kind == "LSTM" else normkit.nn.LayerNormGRU)(I, H)
    x = torch.randn(T, B, I) * data.draw(st.sampled_from([1.0, 1e4, 1e30]), label="scale")
    special = data.draw(st.sampled_from([None, NAN, INF]), label="special")
    if special is not None:
        x[data.draw(st.integers(0, T - 1), label="t"), 0, 0] = special
    outs = []
    for fast in (True, False):
        m.fast_path = fast
        with torch.no_grad():
            outs.append(m(x)[0])
    got, want = outs
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs from the reference"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)


@FUZZ
@given(st.data())
def test_raw_rnn_entry_points_check_sizes_and_steps(data):
    kind = data.draw(st.sampled_from(["lstm", "gru"]), label="kind")
    gates = 4 if kind == "lstm" else 3
    N, B, H = (data.draw(st.sampled_from(v), label=lbl) for v, lbl in (([0, 1, 4], "N"), ([1, 2], "B"), ([1, 3], "H")))
    G = gates * H
    sizes = {"xg": (N, G), "h0": (B, H), "w_hh": (G, H), "w_h": (G,), "b": (H,) if kind == "lstm" else (G,)}
    if kind == "lstm":
        sizes["w_c"] = (H,)
    bad = data.draw(st.sampled_from([None] * 6 + list(sizes) + ["steps", "eps", "dtype", "G"]), label="bad")
    t = {name: draw_tensor(data, sh, torch.float32, layouts=("contiguous", "neg", "transposed", "expanded"), seed=71 + i)
         for i, (name, sh) in enumerate(sizes.items())}
    if bad in sizes:  # one size too large or too small (a short buffer read past its end)
        delta = data.draw(st.sampled_from([1, -1]), label="delta")
        t[bad] = torch.randn(*(max(d + delta, 0) for d in sizes[bad]))
    if bad == "dtype":
        t["xg"] = t["xg"].double()
    if bad == "G":
        t["xg"] = torch.randn(N, G + 1)
    steps = [(off, min(B, N - off)) for off in range(0, N, B)]
    if bad == "steps":
        steps = data.draw(st.sampled_from([[(0, B + 1)], [(N, 1)], [(-1, 1)], [(HUGE, 1)], [(0, -1)], [(0,)], [0], "x", [(0.5, 1)]]), label="steps")
    eps = data.draw(st.sampled_from([NAN, -1.0, INF, True, "x"]), label="eps") if bad == "eps" else 1e-5
    if kind == "lstm":
        fwd = lambda: _C.lstm_forward(t["xg"], t["h0"], t["h0"] * 0.5, t["w_hh"], t["w_h"], t["w_c"], t["b"], steps, eps)  # noqa: E731
    else:
        fwd = lambda: _C.gru_forward(t["xg"], t["h0"], t["w_hh"], t["w_h"], t["b"], steps, eps)  # noqa: E731
    res, err = named_error(fwd)
    if bad is not None:
        assert err is not None, f"{kind}_forward accepted a bad {bad}"
        return
    assert err is None, f"a valid call raised {err!r}"
    saved = res[3 if kind == "lstm" else 2:]
    back = list(reversed(steps))
    bmut = data.draw(st.sampled_from([None, None, "dout", "dh", "saved", "steps"]), label="backward_bad")
    dout = torch.randn(N + (bmut == "dout"), H)
    dh = torch.randn(B, H + (bmut == "dh"))
    if bmut == "saved":
        saved = [saved[0][:, :-1]] + list(saved[1:])
    if bmut == "steps":
        back = [(0, B + 1)]
    if kind == "lstm":
        a_hat, rstd_a, g, chat, rstd_c, tc, _hprev, cprev = saved
        bwd = lambda: _C.lstm_backward(dout, dh, dh.clone(), t["w_hh"], t["w_h"], t["w_c"], a_hat, rstd_a, g, chat, rstd_c, tc, cprev, back)  # noqa: E731
    else:
        a_hat, rstd_a, g, hprev = saved
        bwd = lambda: _C.gru_backward(dout, dh, t["w_hh"], t["w_h"], t["b"], a_hat, rstd_a, g, hprev, back)  # noqa: E731
    grads, err = named_error(bwd)
    assert (err is not None) == (bmut is not None), f"backward with {bmut}: {err!r}"
    if err is None:
        assert all(torch.isfinite(v).all() for v in grads if v.numel())


# --- out= / residual_out= aliasing ---------------------------------------------------------------------


@FUZZ
@given(st.data())
def test_overlapping_out_buffers_raise_or_results_are_right(data):
    N = data.draw(st.sampled_from([1, 4, 8]), label="N")
    g = torch.Generator().manual_seed(81)
    x, r = torch.randn(3, N, generator=g), torch.randn(3, N, generator=g)
    w, b = torch.randn(N, generator=g), torch.randn(N, generator=g)
    big = torch.empty(2, 3, N)
    pool = {"fresh": torch.empty(3, N), "fresh2": torch.empty(3, N), "big0": big[0], "big1": big[1], "x": x, "r": r,
            "x_half": torch.cat([x, x])[1:4], "w": w.expand(3, N)}
    out_name = data.draw(st.sampled_from(list(pool)), label="out")
    res_name = data.draw(st.sampled_from([None] + list(pool)), label="residual_out")
    out, res_out = pool[out_name], None if res_name is None else pool[res_name]
    use_r = data.draw(st.booleans(), label="residual")
    xs, rs = x.clone(), r.clone()
    got, err = named_error(lambda: normkit.layer_norm(x, (N,), w, b, residual=r if use_r else None, prenorm=True, out=out,
                                                       residual_out=res_out))
    reads = {"x", "r", "w"} if use_r else {"x", "w"}  # "x_half" is a copy: it overlaps nothing
    clash = out_name in reads or res_name in reads or out_name == res_name
    if clash:
        assert isinstance(err, NormOverlapError), f"overlap out={out_name} residual_out={res_name} not refused: {err!r}"
        assert torch.equal(x, xs) and torch.equal(r, rs), "the inputs were written before the error"
        return
    assert err is None, f"out={out_name} residual_out={res_name} overlap nothing, yet: {err!r}"
    y, s = got
    assert y is out and (res_out is None or s is res_out)
    want_s = x + r if use_r else x
    torch.testing.assert_close(y, F.layer_norm(want_s, (N,), w, b))
    torch.testing.assert_close(s, want_s)


# --- the fused contract: normkit._C.fused_forward / fused_backward -----------------------------

DTYPE_ARGS = [torch.int32, "float32", None, 1]
FUSED_BREAKS = [None] * 6 + ["x", "r", "x1", "rowscale", "bias1", "eps", "dropout_p", "seed", "sum_dtype", "out_dtype",
                             "flag", "out", "residual_out"]


@FUZZ
@given(st.data())
def test_raw_fused_forward_and_backward_check_every_argument(data):
    """At most one argument broken (a layout, a size, a scalar, an aliased buffer): a call with
    none runs and matches the reference given the kernel's masks, a call with one raises a
    named error; then backward, with at most one inconsistency."""
    from hypothesis import event

    from normkit import reference
    from normkit.contract import KernelSpec

    broken = data.draw(st.sampled_from(FUSED_BREAKS), label="broken")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    rows = data.draw(st.sampled_from([0, 1, 2, 5]), label="rows")
    n = data.draw(st.sampled_from([0, 1, 3, 1000, 4097] if rows <= 2 else [0, 1, 3, 17]), label="n")
    ok_layouts, bad_layouts = ("contiguous", "neg"), ("transposed", "expanded", "strided")

    def tensor(name, shape, dt, seed):
        lay = bad_layouts if broken == name else ok_layouts
        return draw_tensor(data, shape, dt, layouts=lay, seed=seed)

    x = tensor("x", (rows, n), dtype, 91)
    res_dtype = data.draw(st.sampled_from(DTYPES), label="res_dtype")
    r = data.draw(st.sampled_from([None, "r"]), label="r") and tensor("r", (rows, n), res_dtype, 92)
    x1 = data.draw(st.sampled_from([None, "x1"]), label="x1") and tensor("x1", (rows, n), dtype, 93)
    rs = data.draw(st.booleans(), label="rowscale") or broken == "rowscale"
    rowscale = draw_tensor(data, (rows + (broken == "rowscale"),), torch.float32, seed=94) if rs else None
    params = [data.draw(st.sampled_from([None, "p"]), label=k) and draw_tensor(data, (n,), data.draw(st.sampled_from(DTYPES)), seed=95 + i)
              for i, k in enumerate(("w", "b", "w1", "b1"))]
    if broken == "bias1":
        params[2], params[3] = None, torch.randn(n)
    elif params[2] is None:
        params[3] = None  # bias1 comes with weight1
    bad = {"eps": [-1e-5, NAN, INF, 2**2000, True, "1e-5", None], "dropout_p": [1.0, -0.1, NAN, "0.1", None, True],
           "seed": [HUGE, -HUGE, 1.5, None, "1"], "sum_dtype": DTYPE_ARGS, "out_dtype": DTYPE_ARGS, "flag": BOOLS[2:]}
    pick = lambda name, good: data.draw(st.sampled_from(bad[name] if broken == name else good), label=name)  # noqa: E731
    eps = pick("eps", [1e-5, 0.0, 1e-12, 2.0])
    p = pick("dropout_p", [0.0, 0.0, 0.3, 0.999])
    seed = pick("seed", [0, 7, 2**31 - 1, -5, 2**63 - 1])
    sdt = pick("sum_dtype", list(DTYPES))
    odt = pick("out_dtype", list(DTYPES))
    flag_at = data.draw(st.integers(0, 2), label="flag_at")
    flags = [pick("flag", [True, False]) if k == flag_at else data.draw(st.booleans()) for k in range(3)]
    is_rms, store_sum, store_mask = flags
    out_dt = odt if isinstance(odt, torch.dtype) else torch.float32
    sum_dt = sdt if isinstance(sdt, torch.dtype) else torch.float32
    out_kind = data.draw(st.sampled_from(["x", "r", "x1", "w", "expanded", "neg", "1d", "wrong_dtype"] if broken == "out" else [None, "fresh"]), label="out")
    out = {
        None: None, "x": x, "r": r, "x1": x1, "w": params[0], "1d": torch.empty(rows * n, dtype=out_dt),
        "fresh": torch.empty(rows, n, dtype=out_dt), "wrong_dtype": torch.empty(rows, n, dtype=torch.int32),
        "expanded": torch.empty(1, n, dtype=out_dt).expand(rows, n), "neg": torch._neg_view(torch.empty(rows, n, dtype=out_dt)),
    }[out_kind]
    res_kind = data.draw(st.sampled_from(["out", "x", "no_store"] if broken == "residual_out" else [None, "fresh"]), label="residual_out")
    if res_kind is not None and res_kind != "no_store" and not (isinstance(store_sum, bool) and store_sum):
        res_kind = None  # a residual_out needs store_sum=True: only the "no_store" break asks otherwise
    res_out = {None: None, "fresh": torch.empty(rows, n, dtype=sum_dt), "out": out, "x": x,
               "no_store": torch.empty(rows, n, dtype=sum_dt)}[res_kind]
    if res_kind == "no_store":
        store_sum = False
    fwd, err = named_error(lambda: _C.fused_forward(x, r, x1, rowscale, *params, eps, is_rms, p, seed, sdt, odt, store_sum,
                                                    store_mask, out, None, res_out))
    if broken is not None:
        tiny = rows * n <= 1 and broken in ("out", "residual_out")  # nothing to alias
        laid = {"x": x, "r": r, "x1": x1}
        # a layout "break" of a tensor with a size-1 dim may still be contiguous
        absent = (broken in laid and (laid[broken] is None or laid[broken].is_contiguous())) or (
            broken == "out" and out is None) or (broken == "residual_out" and res_out is None and res_kind != "no_store")
        if not tiny and not absent:
            assert err is not None, f"fused_forward accepted a broken {broken}"
            event("fused_forward: refused")
        return
    assert err is None, f"a valid call raised {err!r}"
    event("fused_forward: ran")
    y, y1, s, mean, rstd, mask, mask1 = fwd
    if out is not None:
        assert y.data_ptr() == out.data_ptr()
    spec = KernelSpec(is_rms=is_rms, eps=eps, dropout_p=p, sum_dtype=sdt, out_dtype=odt, store_sum=True, store_mask=store_mask)
    keep = mask if p > 0 and store_mask else None
    ref = reference.fused_forward(x.resolve_neg(), r, x1, rowscale, *params, spec, keep, mask1 if keep is not None else None)
    if p == 0.0 or keep is not None:
        finite = torch.isfinite(ref.y) & (ref.y.double().abs() < 1e3)  # eps = 0 on a constant row: anything
        torch.testing.assert_close(y[finite].double(), ref.y[finite].double(), rtol=3e-2, atol=3e-2)
    if not rows or not n or not store_sum:
        return
    # backward from the forward's statistics, with at most one inconsistency
    dy = draw_tensor(data, (rows, n), odt, layouts=ok_layouts, seed=99)
    # with weight1, y1's gradient too: of dy's dtype (g = dy w + dy1 w1 in registers) or float64
    # (through a g buffer)
    dy1 = None
    if params[2] is not None and data.draw(st.booleans(), label="dy1"):
        dy1 = draw_tensor(data, (rows, n), data.draw(st.sampled_from([odt, torch.float64]), label="dy1 dtype"),
                          layouts=ok_layouts, seed=98)
    mutation = data.draw(st.sampled_from([None] * 5 + ["short_rstd", "no_mean", "needs", "dy_shape", "res_dtype"]), label="mutation")
    needs = (True, x1 is not None, r is not None, True, True, params[2] is not None, params[3] is not None)
    dy_arg = dy.reshape(n, rows) if mutation == "dy_shape" and rows != n else dy
    bwd, err = named_error(lambda: _C.fused_backward(
        dy_arg, dy1, None, s, params[0], params[2], rowscale, None if mutation == "no_mean" else mean,
        rstd[:-1] if mutation == "short_rstd" else rstd, eps, is_rms, p, seed,
        needs[:3] if mutation == "needs" else needs, dtype,
        None if mutation == "res_dtype" else (res_dtype if r is not None else None)))
    bad_bwd = (mutation in ("short_rstd", "needs") or (mutation == "no_mean" and not is_rms)
               or (mutation == "dy_shape" and rows != n) or (mutation == "res_dtype" and r is not None))
    if bad_bwd:
        assert err is not None, f"fused_backward accepted {mutation}"
        return
    assert err is None, f"a valid fused_backward raised {err!r}"
    event("fused_backward: ran")
    assert all((g is None) == (not want) for g, want in zip(bwd, needs))
    if keep is not None or p == 0.0:
        grads = reference.fused_backward(dy, dy1, None, s, params[0], params[2], rowscale, spec,
                                         GradNeeds(*needs), dtype, res_dtype if r is not None else None, keep,
                                         mask1 if keep is not None else None)
        got = bwd[0].double()
        finite = torch.isfinite(grads.dx) & (grads.dx.double().abs() < 1e3)
        torch.testing.assert_close(got[finite], grads.dx.double()[finite], rtol=5e-2, atol=5e-2)
        if dy1 is not None and needs[5]:  # dW1 = sum over rows of dy1 s_hat
            want = grads.dweight1.double()
            ok = torch.isfinite(want)
            scale = 1.0 + (want[ok].abs().max().item() if ok.any() else 0.0)
            torch.testing.assert_close(bwd[5].double()[ok], want[ok], rtol=5e-2, atol=5e-2 * scale)
