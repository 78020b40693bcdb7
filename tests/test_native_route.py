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
    ["transposed", "forced_numba", "dropout", "subclass", "fake_mode", "empty"],
)
def test_calls_the_native_route_must_not_take_go_elsewhere(case):
    x = randn((4, 6), seed=4)
    w, b = params((6,), seed=5)
    if case == "transposed":
        assert F.route(x.t(), None, None, None, False, 0.0, (4,)) != "native"
    elif case == "forced_numba":
        with normkit.use_backend("numba"):
            assert _route(x, w, b) != "native"
    elif case == "dropout":
        assert _route(x, w, b, dropout_p=0.1) != "native"
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


def test_without_the_extension_normkit_works_on_numba_and_says_so_once():
    code = (
        "import warnings, torch, normkit\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    x = torch.randn(4, 8)\n"
        "    y1 = normkit.layer_norm(x, 8)\n"
        "    y2 = normkit.rms_norm(x, 8)\n"
        "msgs = [str(w.message) for w in seen if 'compiled CPU kernels' in str(w.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'cpu' not in normkit.backends.available() and 'numba' in normkit.backends.available()\n"
        "assert normkit.backends.select_backend(x).name == 'numba'\n"
        "torch.testing.assert_close(y1, torch.nn.functional.layer_norm(x, (8,)))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, NORMKIT_NO_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
