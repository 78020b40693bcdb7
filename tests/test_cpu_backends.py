"""What is specific to the CPU backend, ``"cpu"`` (compiled C++, normkit._C); its correctness
against the float64 truth is covered by the shared suite (tests/test_backends.py, which runs
every case on it too).

Shapes are chosen to reach both launch paths: the serial kernel (few elements or one row) and
the parallel one with several row chunks (so the backward's partial sums are exercised).
"""

from __future__ import annotations

import pytest
import torch
from helpers import backend_or_skip, params, randn

import normkit
from normkit import reference as ref
from normkit._machine import torch_threads
from normkit.backends import select_backend

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


#: Calls with at most this many elements (or one row) run serially (kSerialMaxElements in
#: csrc/cpu_runtime.h).
SERIAL_MAX_ELEMENTS = 1 << 15


@pytest.fixture(scope="module")
def cpu():
    return backend_or_skip("cpu")


def _grads(fn, x, w, b, dy, r=None, ds=None, prenorm=False):
    """``y`` (and ``s``) and the gradients of ``<y, dy> + <s, ds>`` w.r.t. x, r, w, b."""
    x, w, b, r = (None if t is None else t.detach().clone().requires_grad_(True) for t in (x, w, b, r))
    out = fn(x, w, b, r)
    y, s = out if prenorm else (out, None)
    loss = (y.float() * dy).sum() + ((s.float() * ds).sum() if prenorm else 0.0)
    leaves = [t for t in (x, r, w, b) if t is not None]
    return [y] + ([s] if prenorm else []) + list(torch.autograd.grad(loss, leaves))


def _ln(x, w, b, r, prenorm=False):
    return normkit.layer_norm(x, x.shape[-1:], w, b, residual=r, prenorm=prenorm)


def _rms(x, w, b, r, prenorm=False):
    return normkit.rms_norm(x, x.shape[-1:], w, residual=r, prenorm=prenorm)


# --- selection -------------------------------------------------------------------------------


def test_the_compiled_backend_is_the_cpu_default_and_the_reference_the_next():
    from normkit.backends import cpu as compiled

    if compiled.extension is None:
        pytest.skip(f"normkit._C not built: {compiled.BACKEND.unavailable_reason()}")
    assert normkit.backends.available()[-2:] == ["cpu", "reference"]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        assert select_backend(torch.ones(2, 3, dtype=dtype)).name == "cpu", dtype
    assert select_backend(torch.ones(2, 3), dropout_p=0.1).name == "cpu"  # the fused kernels' own dropout
    assert not compiled.BACKEND.supports(torch.ones(2, 3, device="meta"), 0.0)


def test_unsupported_calls_fall_back_to_the_reference(cpu):
    x = randn((4, 33), seed=1)
    with normkit.use_backend("cpu"):
        assert select_backend(x).name == "cpu"
        assert select_backend(x, dropout_p=0.1).name == "cpu"  # dropout runs in the fused kernels
        z = x.to(torch.complex64)
        assert select_backend(z).name == "reference"
        assert "does not support" in normkit.backends.explain_backend(z)


# --- bfloat16 conversion ---------------------------------------------------------------------


def test_bfloat16_fused_sum_is_rounded_once_exactly(cpu):
    x, r = randn((64, 700), torch.bfloat16, seed=4), randn((64, 700), torch.bfloat16, seed=5)
    with normkit.use_backend(cpu.name):
        y, s = normkit.layer_norm(x, (700,), residual=r, prenorm=True)
    assert torch.equal(s, (x.float() + r.float()).to(torch.bfloat16))
    y_ref = ref.layer_norm(x, (700,), residual=r)
    assert (y.float() - y_ref.float()).abs().max() <= 2 ** -6 * y_ref.float().abs().max()


# --- shapes and launch paths -----------------------------------------------------------------


@pytest.mark.parametrize("fn", [_ln, _rms], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize(
    "rows, n",
    [(1, 1), (40_000, 1), (3, 65536), (1, 4097), (60_000, 3), (4097, 64)],
    ids=["1x1", "40000x1", "3x65536", "1x4097", "60000x3", "4097x64"],
)
def test_shapes_match_the_reference_in_float32(cpu, fn, rows, n):
    """Forward and every gradient, fused prenorm variant, vs the reference in float32."""
    x, r = randn((rows, n), seed=rows + n), randn((rows, n), seed=6)
    w, b = params((n,), seed=7)
    b = None if fn is _rms else b
    dy, ds = randn((rows, n), seed=8), randn((rows, n), seed=9)

    def run(name):
        with normkit.use_backend(name):
            return _grads(lambda *a: fn(*a, prenorm=True), x, w, b, dy, r, ds, prenorm=True)

    got, want = run("cpu"), run("reference")
    names = ["y", "s", "dx", "dresidual", "dweight", "dbias"][: len(want)]
    for what, g, t in zip(names, got, want):
        assert g.dtype == t.dtype and g.shape == t.shape, what
        scale = max(1.0, t.abs().max().item())
        # Row sums of N terms: fp32 rounding ~ sqrt(N) ulp; dweight/dbias sum over rows too.
        tol = 1e-6 * scale * (max(n, rows) ** 0.5 + 4)
        err = (g - t).abs().max().item()
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def test_serial_and_parallel_paths_agree(cpu):
    n = 512
    rows = 4 * SERIAL_MAX_ELEMENTS // n  # parallel path, several chunks
    x = randn((rows, n), seed=10)
    w, b = params((n,), seed=11)
    with normkit.use_backend(cpu.name):
        whole = normkit.layer_norm(x, (n,), w, b)
        head = normkit.layer_norm(x[:3], (n,), w, b)  # serial path
    torch.testing.assert_close(whole[:3], head, rtol=1e-6, atol=1e-6)


# --- determinism and threads -----------------------------------------------------------------


@pytest.mark.parametrize("fn", [_ln, _rms], ids=["layer_norm", "rms_norm"])
def test_gradients_are_bit_identical_across_runs_and_thread_counts(cpu, fn):
    rows, n = 3000, 257  # many chunks of partial sums
    x, dy = randn((rows, n), seed=12), randn((rows, n), seed=13)
    w, b = params((n,), seed=14)
    b = None if fn is _rms else b
    with normkit.use_backend(cpu.name):
        first = _grads(fn, x, w, b, dy)
        second = _grads(fn, x, w, b, dy)
        with torch_threads(1):
            single = _grads(fn, x, w, b, dy)
    for a, c, d in zip(first, second, single):
        assert torch.equal(a, c), "two identical runs gave different bits"
        assert torch.equal(a, d), "1 thread and the default thread count gave different bits"


# --- parameters of another dtype ---------------------------------------------------------------


def test_parameters_in_another_dtype_keep_their_gradient_dtype(cpu):
    x, dy = randn((50, 96), torch.bfloat16, seed=16), randn((50, 96), seed=17)
    w, b = (p.double() for p in params((96,), seed=18))
    with normkit.use_backend(cpu.name):
        y, dx, dw, db = _grads(_ln, x, w, b, dy)
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    assert dw.dtype == torch.float64 and db.dtype == torch.float64
    with normkit.use_backend("reference"):
        ry, rdx, rdw, rdb = _grads(_ln, x, w, b, dy)
    torch.testing.assert_close(y, ry, rtol=0, atol=2 ** -5 * ry.abs().max().item())
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db, rdb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [False, True])
def test_very_wide_rows_with_a_large_mean_stay_accurate(cpu, residual):
    """A 4M-element row around 1e4: one running float32 sum drifted the mean by 3 (error 5.9
    in the output); blocked sums must keep output and gradient as accurate as the float32
    reference (the backend suite's rule: within 2x its error from the float64 truth)."""
    from helpers import assert_close_to_truth

    n = 1 << 22
    x = randn((1, n), seed=40, offset=1e4, scale=0.1, requires_grad=True)
    r = randn((1, n), seed=41) if residual else None
    dy = randn((1, n), seed=42)
    with normkit.use_backend(cpu.name):
        y = normkit.layer_norm(x, n, residual=r)
    (dx,) = torch.autograd.grad(y, x, dy)
    y32 = ref.layer_norm(x, n, residual=r)
    (dx32,) = torch.autograd.grad(y32, x, dy)
    x64 = x.detach().double().requires_grad_()
    y64 = ref.layer_norm(x64, n, residual=None if r is None else r.double())
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    assert_close_to_truth(y, y64, y32, what="output")
    assert_close_to_truth(dx, dx64, dx32, what="dx")


@pytest.mark.parametrize("affine", [True, False])
def test_large_calls_overlapping_rows_give_the_bits_of_small_calls(affine):
    """From 4 MiB of input the C++ forward writes each row's output while it sums the next row;
    the statistics must be the same bits as a call too small for that (each half below)."""
    backend_or_skip("cpu")
    rows, n = 2000, 601  # 4.8 MB of float32; odd width for the vector tails
    x = randn((rows, n), seed=50, offset=1e4)
    w, b = params((n,), seed=51) if affine else (None, None)
    with normkit.use_backend("cpu"):
        whole = normkit.layer_norm(x, n, w, b)
        halves = torch.cat([normkit.layer_norm(x[: rows // 2], n, w, b), normkit.layer_norm(x[rows // 2 :], n, w, b)])
        with torch_threads(1):
            single = normkit.layer_norm(x, n, w, b)
    assert torch.equal(whole, halves)
    assert torch.equal(whole, single)
    # against the float64 truth (the float32 reference itself is off by ~1e-3 at this mean: the
    # kernels centre rows on the mean's hi + lo parts, see csrc/row_math.h)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    torch.testing.assert_close(whole, ref.layer_norm(x.double(), n, d(w), d(b)).float(), rtol=1e-5, atol=2e-5)
