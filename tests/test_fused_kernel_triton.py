"""The Triton backend's fused kernels (``TritonBackend.fused_forward`` / ``fused_backward``)
against the contract's reference (:func:`normkit.reference.fused_forward` / ``fused_backward``).

Run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py
without a GPU) or on a GPU, on small inputs. The dropout masks come from Triton's Philox
streams, not torch's: the kernel returns them (``store_mask=True``) and the reference replays
them. Tolerance (flash-attn's rule, ``helpers.assert_close_to_truth``): the kernel's error from
a float64 truth is at most 2x the error of torch's own ops in the same dtypes, plus a small floor.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from normkit import reference as ref
from normkit.contract import GradNeeds, KernelSpec

from helpers import assert_close_to_truth, backend_or_skip, params, randn

triton_backend = pytest.importorskip("normkit.backends.triton")
TritonBackend = triton_backend.TritonBackend

ALL_GRADS = GradNeeds(x=True, x1=True, residual=True, weight=True, bias=True, weight1=True, bias1=True)
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def device():
    backend_or_skip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def looped() -> TritonBackend:
    """A backend that takes the looped (wide-row) path for every width, a few rows per tile."""
    return TritonBackend(max_fused_bytes=1, loop_block_n=16, min_tile=64)


PATHS = {"single_pass": TritonBackend(), "looped": looped()}


def _inputs(device, m, n, dtype, *, residual=None, x1=False, rowscale=False, weight=True, bias=True, weight1=False,
            bias1=False, offset=0.0, seed=0):
    """Fresh random tensors for one call; ``residual`` is ``None`` or the residual's dtype."""
    w, b = params((n,), F32, seed=seed + 1)
    w1, b1 = params((n,), F32, seed=seed + 3)
    t = dict(
        x=randn((m, n), dtype, seed=seed, offset=offset),
        residual=None if residual is None else randn((m, n), residual, seed=seed + 5),
        x1=randn((m, n), dtype, seed=seed + 6) if x1 else None,
        rowscale=(randn((m,), F32, seed=seed + 7, scale=0.3, offset=1.0)) if rowscale else None,
        weight=w if weight else None,
        bias=b if bias else None,
        weight1=w1 if weight1 else None,
        bias1=b1 if weight1 and bias1 else None,
    )
    return {k: None if v is None else v.to(device) for k, v in t.items()}


def _spec(dtype, *, is_rms, residual=None, p=0.0, sum_dtype=None, out_dtype=None, store_sum=True, store_mask=True):
    return KernelSpec(is_rms=is_rms, eps=1e-6 if is_rms else 1e-5, dropout_p=p,
                      sum_dtype=sum_dtype or residual or dtype, out_dtype=out_dtype or dtype,
                      store_sum=store_sum, store_mask=store_mask)


def _as64(spec: KernelSpec) -> KernelSpec:
    return KernelSpec(spec.is_rms, spec.eps, spec.dropout_p, torch.float64, torch.float64, spec.store_sum, spec.store_mask)


def _double(t):
    return None if t is None else t.double()


def check_forward(backend, t, spec, seed=11):
    """Runs the kernel; checks every output against the reference (same masks); returns it."""
    got = backend.fused_forward(**t, spec=spec, seed=seed)
    masks = dict(keep=got.mask, keep1=got.mask1)
    base = ref.fused_forward(**t, spec=spec, **masks)
    truth = ref.fused_forward(**{k: _double(v) for k, v in t.items()}, spec=_as64(spec), **masks)
    for name, g, b, tr in zip(got._fields, got, base, truth):
        if name.startswith("mask"):
            continue
        if b is None:
            assert g is None, f"{name}: expected None, got a tensor"
            continue
        assert g is not None, f"{name}: missing"
        assert g.dtype == b.dtype and g.shape == b.shape, f"{name}: got {g.dtype}{list(g.shape)}, expected {b.dtype}{list(b.shape)}"
        if name == "s":
            # Formed in float32 in the contract's order and rounded once: the same bits as torch's.
            assert torch.equal(g, b), "s: the sum must round exactly as the reference's"
        else:
            assert_close_to_truth(g, tr, b, what=name)
    return got


def check_backward(backend, t, spec, fwd, needs=ALL_GRADS, *, dy=True, dy1=None, dsum=None, seed=11):
    """Runs the backward kernel on the forward's saved sum; checks it against the reference."""
    m, n = t["x"].shape
    dev = t["x"].device
    dy1 = t["weight1"] is not None if dy1 is None else dy1
    dsum = fwd.s is not None and fwd.s is not t["x"] if dsum is None else dsum
    g = dict(
        dy=randn((m, n), spec.out_dtype, seed=21).to(dev) if dy else None,
        dy1=randn((m, n), spec.out_dtype, seed=22).to(dev) if dy1 else None,
        dsum=randn((m, n), fwd.s.dtype, seed=23).to(dev) if dsum else None,
    )
    s = t["x"] if fwd.s is None else fwd.s
    res_dtype = None if t["residual"] is None else t["residual"].dtype
    # No residual (x1): no gradient of it to ask for.
    needs = dataclasses.replace(needs, residual=needs.residual and res_dtype is not None, x1=needs.x1 and t["x1"] is not None)
    got = backend.fused_backward(**g, s=s, weight=t["weight"], weight1=t["weight1"], rowscale=t["rowscale"],
                                 mean=fwd.mean, rstd=fwd.rstd, spec=spec, seed=seed, needs=needs,
                                 x_dtype=t["x"].dtype, residual_dtype=res_dtype)
    masks = dict(keep=fwd.mask, keep1=fwd.mask1)
    args = (s, t["weight"], t["weight1"], t["rowscale"], spec, needs, t["x"].dtype, res_dtype)
    base = ref.fused_backward(g["dy"], g["dy1"], g["dsum"], *args, **masks)
    args64 = [_double(a) for a in args[:4]] + [_as64(spec), needs, torch.float64, torch.float64]
    truth = ref.fused_backward(_double(g["dy"]), _double(g["dy1"]), _double(g["dsum"]), *args64, **masks)
    for name, gv, b, tr in zip(got._fields, got, base, truth):
        if b is None:
            assert gv is None, f"{name}: not asked for, yet returned"
            continue
        assert gv is not None, f"{name}: asked for, not returned"
        assert gv.dtype == b.dtype and gv.shape == b.shape, f"{name}: got {gv.dtype}{list(gv.shape)}, expected {b.dtype}{list(b.shape)}"
        assert_close_to_truth(gv, tr, b, what=name)
    return got


# Each option alone, and a few together: name -> (input dtype, _inputs kwargs, _spec kwargs).
CASES = {
    "plain": (BF16, {}, {}),
    "plain_fp32": (F32, {}, {}),
    "no_affine_fp16": (F16, dict(weight=False, bias=False), {}),
    "residual": (BF16, dict(residual=BF16), dict(residual=BF16)),
    "residual_fp32_beside_bf16": (BF16, dict(residual=F32), dict(residual=F32)),
    "x1": (BF16, dict(x1=True), {}),
    "rowscale": (BF16, dict(rowscale=True), {}),
    "weight1_bias1": (BF16, dict(weight1=True, bias1=True), {}),
    "weight1_no_bias": (F32, dict(weight1=True, bias=False), {}),
    "dropout": (BF16, {}, dict(p=0.3)),
    "out_dtype_fp32": (BF16, dict(residual=BF16), dict(residual=BF16, out_dtype=F32)),
    "sum_fp32_no_residual": (BF16, {}, dict(sum_dtype=F32)),
    "no_store_sum": (BF16, dict(residual=BF16), dict(residual=BF16, store_sum=False)),
    "residual_x1_dropout": (F16, dict(residual=F32, x1=True), dict(residual=F32, p=0.2)),
    "everything": (BF16, dict(residual=F32, x1=True, rowscale=True, weight1=True, bias1=True),
                   dict(residual=F32, p=0.25, out_dtype=F16)),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_match_the_reference(device, path, is_rms, case):
    """RMS norm takes a bias like layer norm (the cases with ``bias`` give it one)."""
    dtype, inputs, spec_kw = CASES[case]
    n = 37 if path == "single_pass" else 45
    t = _inputs(device, 3, n, dtype, **inputs, seed=len(case))
    spec = _spec(dtype, is_rms=is_rms, **spec_kw)
    fwd = check_forward(PATHS[path], t, spec)
    if spec.store_sum:  # backward needs the stored sum
        check_backward(PATHS[path], t, spec, fwd)


@pytest.mark.parametrize("n", [1, 3, 130])
def test_widths(device, n):
    t = _inputs(device, 5, n, BF16, residual=F32, x1=True, weight1=True)
    for backend in PATHS.values():
        spec = _spec(BF16, is_rms=False, residual=F32, p=0.1)
        check_backward(backend, t, spec, check_forward(backend, t, spec))


def test_without_a_sum_s_is_x_itself(device):
    t = _inputs(device, 3, 37, BF16)
    got = TritonBackend().fused_forward(**t, spec=_spec(BF16, is_rms=False), seed=0)
    assert got.s is t["x"] and got.mask is None and got.mask1 is None and got.y1 is None


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("forms_sum", [True, False], ids=["sum", "x_is_sum"])
def test_out_buffers_are_written_in_place(device, path, forms_sum):
    t = _inputs(device, 4, 37, BF16, residual=BF16 if forms_sum else None, weight1=True, bias1=True)
    spec = _spec(BF16, is_rms=False, residual=BF16 if forms_sum else None, out_dtype=F32)
    bufs = dict(out=torch.full((4, 37), float("nan"), device=device), out1=torch.full((4, 37), float("nan"), device=device),
                residual_out=torch.full((4, 37), float("nan"), dtype=BF16, device=device))
    got = PATHS[path].fused_forward(**t, spec=spec, seed=0, **bufs)
    assert got.y is bufs["out"] and got.y1 is bufs["out1"] and got.s is bufs["residual_out"]
    want = ref.fused_forward(**t, spec=spec)
    assert torch.equal(got.s, want.s) and torch.equal(got.s, t["x"]) != forms_sum
    torch.testing.assert_close(got.y, want.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.y1, want.y1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_grad_needs_subsets(device, path, is_rms):
    """What is not asked for is None; what is, is the same bits as a full run (and two runs agree)."""
    backend = PATHS[path]
    t = _inputs(device, 6, 37, BF16, residual=F32, x1=True, rowscale=True, weight1=True, bias1=True)
    spec = _spec(BF16, is_rms=is_rms, residual=F32, p=0.2)
    fwd = backend.fused_forward(**t, spec=spec, seed=5)
    full = check_backward(backend, t, spec, fwd, ALL_GRADS, seed=5)
    again = check_backward(backend, t, spec, fwd, ALL_GRADS, seed=5)
    for name, a, b in zip(full._fields, full, again):
        assert torch.equal(a, b), f"{name}: two identical backward passes gave different bits"
    fields = [f.name for f in dataclasses.fields(GradNeeds)]
    for subset in (dict(x=True), dict(x=False, residual=True), dict(x=False, x1=True, weight1=True),
                   dict(x=True, weight=True, bias1=True), dict(x=False, bias=True, weight1=True)):
        needs = GradNeeds(**{f: subset.get(f, False) for f in fields})
        got = check_backward(backend, t, spec, fwd, needs, seed=5)
        for name, f, g, want in zip(got._fields, fields, got, full):
            if getattr(needs, f):
                assert torch.equal(g, want), f"{name}: differs from the full run"
            else:
                assert g is None, f"{name}: not asked for, yet returned"


def test_missing_dy_is_zero(device):
    """Only ``y1`` used: ``dy`` is None (zero); its parameter gradients are zeros."""
    t = _inputs(device, 3, 37, BF16, weight1=True, bias1=True)
    for backend in PATHS.values():
        spec = _spec(BF16, is_rms=False)
        fwd = check_forward(backend, t, spec)
        got = check_backward(backend, t, spec, fwd, ALL_GRADS, dy=False, dy1=True)
        assert not got.dweight.any() and not got.dbias.any() and got.dweight1.abs().sum() > 0


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("with_residual", [False, True], ids=["x", "residual"])
def test_large_mean(device, path, with_residual):
    """Rows of 1e4 + randn: E[s^2] - E[s]^2 would lose every digit; the kernels (refined mean
    single-pass, shifted chunks merged by Chan's formula looped) stay within 2x torch's error."""
    kw = dict(residual=F32) if with_residual else {}
    t = _inputs(device, 5, 203, F32, **kw, offset=1e4, seed=4)
    spec = _spec(F32, is_rms=False, **kw)
    check_backward(PATHS[path], t, spec, check_forward(PATHS[path], t, spec))


def test_dropout_masks(device):
    p, m, n, seed = 0.25, 32, 130, 1234
    t = _inputs(device, m, n, BF16, x1=True)
    spec = _spec(BF16, is_rms=False, p=p)
    got = TritonBackend().fused_forward(**t, spec=spec, seed=seed)
    keep, keep1 = got.mask, got.mask1
    assert keep.dtype == torch.bool and keep.shape == (m, n) and keep1.shape == (m, n)
    sigma = math.sqrt(p * (1 - p) / (m * n))
    for k in (keep, keep1):
        assert abs(k.double().mean().item() - (1 - p)) < 5 * sigma, f"kept {k.double().mean().item():.4f}"
    agree = (keep == keep1).double().mean().item()  # independent streams agree w.p. p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.5 / (m * n)), "x and x1 share a stream"
    # A pure function of the seed, whatever the tiling; another seed, another mask.
    again = looped().fused_forward(**t, spec=spec, seed=seed)
    assert torch.equal(again.mask, keep) and torch.equal(again.mask1, keep1)
    assert not torch.equal(TritonBackend().fused_forward(**t, spec=spec, seed=seed + 1).mask, keep)
    # Without store_mask the forward returns no masks and computes the same outputs.
    plain = TritonBackend().fused_forward(**t, spec=_spec(BF16, is_rms=False, p=p, store_mask=False), seed=seed)
    assert plain.mask is None and plain.mask1 is None and torch.equal(plain.y, got.y)


@pytest.mark.parametrize("path", list(PATHS))
def test_dropout_backward_is_zero_exactly_where_dropped(device, path):
    backend = PATHS[path]
    t = _inputs(device, 7, 45, F32, residual=F32, x1=True, rowscale=True)
    spec = _spec(F32, is_rms=False, residual=F32, p=0.4)
    fwd = check_forward(backend, t, spec, seed=99)
    got = check_backward(backend, t, spec, fwd, seed=99)
    assert torch.equal(got.dx == 0, ~fwd.mask), "dx must vanish exactly where x was dropped"
    assert torch.equal(got.dx1 == 0, ~fwd.mask1), "dx1 must vanish exactly where x1 was dropped"
    assert (got.dresidual != 0).all()
    other = backend.fused_backward(torch.ones_like(got.dx), None, None, fwd.s, t["weight"], None, t["rowscale"],
                                   fwd.mean, fwd.rstd, spec, 100, GradNeeds(), F32, F32)
    assert not torch.equal(other.dx == 0, ~fwd.mask), "backward ignored the seed"


def test_fused_supports(device):
    backend = TritonBackend()
    x = torch.ones(2, 3, device=device)
    for dtype in (F32, F16, BF16):
        assert backend.fused_supports(x.to(dtype), _spec(dtype, is_rms=False, residual=F32))
    assert not backend.fused_supports(x.double(), _spec(torch.float64, is_rms=False))
    assert not backend.fused_supports(x, _spec(F32, is_rms=False, residual=torch.float64))
    assert not backend.fused_supports(x, _spec(F32, is_rms=False, out_dtype=torch.float64))


@pytest.mark.parametrize("path", list(PATHS))
def test_unstored_sum_is_rounded_like_the_stored_one(device, path):
    """Without ``store_sum`` the kernel still rounds the sum to ``sum_dtype`` before its
    statistics: the outputs are the same bits as with the sum stored."""
    t = _inputs(device, 4, 45, BF16, residual=BF16, x1=True, seed=3)
    for is_rms in (False, True):
        stored = PATHS[path].fused_forward(**t, spec=_spec(BF16, is_rms=is_rms, residual=BF16), seed=1)
        unstored = PATHS[path].fused_forward(**t, spec=_spec(BF16, is_rms=is_rms, residual=BF16, store_sum=False), seed=1)
        assert unstored.s is None
        for name in ("y", "mean", "rstd"):
            a, b = getattr(stored, name), getattr(unstored, name)
            assert (a is None and b is None) or torch.equal(a, b), name
