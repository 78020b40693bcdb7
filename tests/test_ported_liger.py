"""Liger-Kernel's RMSNorm and LayerNorm tests, ported to normkit on CPU.

The originals are ``test/transformers/test_rms_norm.py`` and ``test/transformers/test_layer_norm.py``
of linkedin/Liger-Kernel (2025-26; the layer-norm cases are the union of its versions). Their
method is kept: a reference module (Hugging Face's formulas, or ``torch.nn.LayerNorm``) and the
library's module get the same input, weights and output gradient; the outputs, the input gradient
and the weight (and bias) gradients must agree within Liger's ``atol``/``rtol``
(``|a - b| <= atol + rtol |b|``): float32 1e-4/1e-6 and bfloat16 2e-1/2e-2 for RMS norm, float32
1e-5/1e-5 and float16 1e-3/1e-3 for layer norm. The reference modules are re-implemented here from
their formulas: ``LlamaRMSNorm`` (statistics in float32, ``x_hat`` rounded to the input dtype,
then ``weight *``), ``GemmaRMSNorm`` (everything in float32, gain ``1 + weight``, one rounding),
``BaseRMSNorm`` (everything in the input dtype) and ``GroupedGemmaRMSNorm`` (Gemma's formula per
group of ``group_size`` channels).

Mapping: ``LigerRMSNorm(hd, offset=0.0, casting_mode="llama")`` is
``normkit.nn.RMSNorm(hd, eps, casting_mode="llama")``; ``offset=1.0, casting_mode="gemma"`` is
``zero_centered_weight=True`` (default casting ``"gemma"``); ``casting_mode="none"`` is
``casting_mode="none"`` (normkit keeps float32 statistics there, Liger computes in the input dtype:
a deliberate difference, within Liger's bfloat16 tolerance); ``elementwise_affine=False`` is the
same argument (a zero-centred norm without a weight has gain 1, so ``zero_centered_weight`` is off
there: normkit refuses it without a weight). ``liger_rms_norm(X, W, eps, offset, casting_mode)``
is ``normkit.rms_norm(x, (hd,), w, eps, zero_centered_weight=offset == 1, casting_mode=...)``;
``LigerLayerNorm`` / ``liger_layer_norm`` are ``normkit.nn.LayerNorm`` / ``normkit.layer_norm``.

Tighter than Liger where normkit is exact (README, "casting_mode"): in bfloat16 the reference
backend's forward is bit-identical to ``LlamaRMSNorm`` and ``GemmaRMSNorm``, the cpu
kernels are within 1 ulp (gemma) and 2 ulps (llama). Weights: Liger's modules start at ones
(``LigerRMSNorm``; ``LigerLayerNorm``: ones and zero bias), which hides a misapplied gain or bias,
so each module case also runs with random weights (copied into both modules).

Cases per backend (reference, cpu; a tiny triton-interpreter subset besides):

- ``test_correctness``: 2 shapes × 2 dtypes × 3 (reference, offset, casting) × 2 in_place × 3
  affine (Liger: ``elementwise_affine`` True/False; here True twice, Liger's ones and random) = 72.
  ``in_place=True`` (36) is skipped: it is Liger's memory option (the backward writes dX over the
  output gradient) with no normkit counterpart and no effect on the values; every case asserts
  instead that normkit leaves the output gradient untouched.
- ``test_grouped_correctness``: 2 shapes × 2 dtypes = 4, expressed by composition (normkit has no
  ``group_size``): ``normkit.rms_norm`` over ``(group_size,)`` of the grouped view with
  ``out_dtype=float32``, then the float32 gain ``1 + weight`` and one rounding.
- ``test_correctness_functional``: 2 shapes × 2 dtypes × 2 (reference, offset, casting) × 2
  ``elementwise_affine`` = 16; Liger compares its functional and Function entry points, here
  ``normkit.rms_norm`` is compared with ``normkit.nn.RMSNorm`` (Liger's pair) and with the
  reference module.
- ``test_liger_layer_norm`` 4 shapes, ``test_liger_layer_norm_functional`` 2 shapes (float32),
  ``test_liger_layer_norm_weird_shapes`` 5 shapes × float32/float16 (and bfloat16 added, with the
  RMS test's bfloat16 tolerance) = 15, each with Liger's ones/zeros and random weights: 42. In 16
  bits torch's ``nn.LayerNorm`` runs in float32 on the same values and is rounded once, as torch
  computes on the GPU Liger's tests run on: torch's CPU float16 backward rounds intermediates and
  is up to ~1.5 ulps off float64 (normkit's 0.5), more than Liger's 1e-3 absorbs at gradients ~15.

Skipped per backend: the ``in_place=True`` cases, and a backend's cases in a dtype it has no
kernel for (it falls back to the reference, so they would duplicate the reference run);
``pytest -rsx`` lists them with their reasons. ``make test`` runs a fixed sample of the matrix
(``tests/conftest.py``), ``make test-full`` all of it. The triton subset
(one test, 7 tiny cases) and a sanity test per function (a perturbed output must fail) come on
top. Not ported (Liger-internal, no normkit counterpart): the backend-ABI test, grouped argument
validation and the NaN-poisoned ``torch.empty`` test of Liger's grouped backward, and the 4-8 GPU
DTensor test (normkit's DTensor path has its own tests).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import normkit
from normkit.backends import select_backend

from helpers import backend_or_skip

BACKENDS = ("reference", "cpu")
EPS = 1e-6
RMS_TOL = {torch.float32: (1e-4, 1e-6), torch.bfloat16: (2e-1, 2e-2)}  # (atol, rtol), Liger's
LN_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2e-1, 2e-2)}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --- the reference modules (Hugging Face's formulas, as Liger's tests define them)


class _RefRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=EPS, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if elementwise_affine else None


class BaseRMSNorm(_RefRMSNorm):
    """Every step in the input dtype (bfloat16 statistics for bfloat16 input)."""

    def forward(self, h):
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h if self.weight is None else self.weight * h


class LlamaRMSNorm(_RefRMSNorm):
    """Statistics and ``x_hat`` in float32, ``x_hat`` rounded to the input dtype, then the gain."""

    def forward(self, h):
        x_hat = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps)
        x_hat = x_hat.to(h.dtype)
        return x_hat if self.weight is None else self.weight * x_hat


class GemmaRMSNorm(_RefRMSNorm):
    """Everything in float32 with the gain ``1 + weight``, rounded once."""

    def forward(self, h):
        y = h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * (1.0 + self.weight.float())
        return y.to(h.dtype)


class GroupedGemmaRMSNorm(nn.Module):
    """Gemma's formula with statistics per group of ``group_size`` channels (weight starts at 0)."""

    def __init__(self, hidden_size, group_size, eps=EPS):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h):
        g = h.float().unflatten(-1, (-1, self.group_size))
        y = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return (y * (1.0 + self.weight.float())).to(h.dtype)


# --- comparison helpers


def liger_close(name, got, want, atol, rtol):
    """Liger's ``assert_verbose_allclose`` / ``torch.allclose`` rule, with the worst entry named."""
    assert got.shape == want.shape, f"{name}: shape {list(got.shape)}, expected {list(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype}, expected {want.dtype}"
    diff = (got.double() - want.double()).abs()
    excess = diff - (atol + rtol * want.double().abs())
    if excess.numel() and (excess.max() > 0 or not torch.isfinite(got).all()):
        i = int(excess.flatten().argmax())
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {excess.numel()} entries outside atol={atol}, rtol={rtol}; "
            f"worst: got {got.flatten()[i].item()!r}, expected {want.flatten()[i].item()!r}"
        )


def ulp_distance(a, b) -> int:
    """The largest distance between ``a`` and ``b`` in representable values of their dtype."""
    assert a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16, torch.float32)
    int_dtype = torch.int32 if a.dtype == torch.float32 else torch.int16

    def ordered(t):
        i = t.contiguous().view(int_dtype).long()
        return torch.where(i < 0, torch.iinfo(int_dtype).min - i, i)  # monotone in the float value

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def _skip_if_fallback(backend, dtype):
    backend_or_skip(backend)
    with normkit.use_backend(backend):
        chosen = select_backend(torch.empty(2, 8, dtype=dtype)).name
    if chosen != backend:
        pytest.skip(f"backend {backend!r} has no {dtype} kernel (falls back to {chosen!r}: the reference run covers the case)")


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype)


# --- test_rms_norm.py: test_correctness

REFERENCES = {  # Liger's (reference, offset, casting_mode) triples, by casting mode
    "llama": (LlamaRMSNorm, 0.0),
    "gemma": (GemmaRMSNorm, 1.0),
    "none": (BaseRMSNorm, 0.0),
}
#: README: the reference backend is bit-identical to Llama/Gemma in 16 bits, the kernels within 1/2 ulps
FORWARD_ULPS = {("reference", "llama"): 0, ("reference", "gemma"): 0, "llama": 2, "gemma": 1}


def run_rms_correctness(backend, bs, sl, hd, dtype, casting_mode, affine, *, seed=42):
    atol, rtol = RMS_TOL[dtype]
    reference, offset = REFERENCES[casting_mode]
    gen = torch.Generator().manual_seed(seed)
    tensor = _randn(gen, bs, sl, hd, dtype=dtype)
    h1, h2 = tensor.clone().requires_grad_(), tensor.clone().requires_grad_()
    do = _randn(gen, bs, sl, hd, dtype=dtype)
    do_before = do.clone()

    ref = reference(hd, elementwise_affine=affine is not None).to(dtype)
    nk = normkit.nn.RMSNorm(
        hd, eps=EPS, elementwise_affine=affine is not None, dtype=dtype,
        zero_centered_weight=offset == 1.0 and affine is not None, casting_mode=casting_mode,
    )
    if affine == "random":
        with torch.no_grad():
            ref.weight.copy_(_randn(gen, hd, dtype=dtype))
    if affine is not None:
        with torch.no_grad():
            nk.weight.copy_(ref.weight)  # Liger's module holds the same w (offset 1.0: gain 1 + w)

    ref_o = ref(h1)
    ref_o.backward(do)
    with normkit.use_backend(backend):
        nk_o = nk(h2)
        nk_o.backward(do)

    liger_close("output", nk_o, ref_o, atol, rtol)
    if affine is not None:
        liger_close("weight.grad", nk.weight.grad, ref.weight.grad, atol, rtol)
    liger_close("input.grad", h2.grad, h1.grad, atol, rtol)
    assert torch.equal(do, do_before), "normkit's backward wrote over the output gradient"
    allowed = FORWARD_ULPS.get((backend, casting_mode), FORWARD_ULPS.get(casting_mode))
    if dtype == torch.bfloat16 and allowed is not None:
        ulps = ulp_distance(nk_o, ref_o)
        assert ulps <= allowed, f"output: {ulps} ulps from {reference.__name__}, README promises <= {allowed}"


RMS_SHAPES = [(2, 128, 512), (5, 123, 123)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["ones", "random", None], ids=["affine-ones", "affine-random", "no-affine"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "not_in_place"])
@pytest.mark.parametrize("casting_mode", ["llama", "gemma", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_SHORT.get)
@pytest.mark.parametrize("bs, sl, hd", RMS_SHAPES)
def test_correctness(bs, sl, hd, dtype, casting_mode, in_place, affine, backend):
    if in_place:
        pytest.skip(
            "Liger's in_place=True writes dX over the output gradient in backward: a memory option "
            "normkit has no counterpart for, with no effect on values (every case asserts normkit "
            "leaves the output gradient untouched)"
        )
    _skip_if_fallback(backend, dtype)
    run_rms_correctness(backend, bs, sl, hd, dtype, casting_mode, affine)


# --- test_rms_norm.py: test_grouped_correctness (by composition: normkit has no group_size)


def grouped_rms_norm(x, weight, group_size, eps=EPS):
    """``GroupedGemmaRMSNorm`` from normkit: each group normalized by ``normkit.rms_norm`` in float32
    (``out_dtype``), the float32 gain ``1 + weight``, one rounding."""
    groups = x.unflatten(-1, (-1, group_size))
    x_hat = normkit.rms_norm(groups, (group_size,), None, eps, out_dtype=torch.float32).flatten(-2)
    return (x_hat * (1.0 + weight.float())).to(x.dtype)


def run_grouped(backend, bs, sl, hd, group_size, dtype, *, seed=42):
    atol, rtol = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2)}[dtype]  # Liger's
    gen = torch.Generator().manual_seed(seed)
    tensor = _randn(gen, bs, sl, hd, dtype=dtype)
    h1, h2 = tensor.clone().requires_grad_(), tensor.clone().requires_grad_()
    grad = _randn(gen, bs, sl, hd, dtype=dtype)
    ref = GroupedGemmaRMSNorm(hd, group_size).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(_randn(gen, hd, dtype=dtype))
    w = ref.weight.detach().clone().requires_grad_()
    ref_o = ref(h1)
    ref_o.backward(grad)
    with normkit.use_backend(backend):
        nk_o = grouped_rms_norm(h2, w, group_size)
        nk_o.backward(grad)
    liger_close("output", nk_o, ref_o, atol, rtol)
    liger_close("input.grad", h2.grad, h1.grad, atol, rtol)
    liger_close("weight.grad", w.grad, ref.weight.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_SHORT.get)
@pytest.mark.parametrize("bs, sl, hd, group_size", [(2, 3, 128, 32), (5, 7, 123, 41)])
def test_grouped_correctness(bs, sl, hd, group_size, dtype, backend):
    # the groups are normalized in float32 (out_dtype): the kernel sees the input's dtype
    _skip_if_fallback(backend, dtype)
    run_grouped(backend, bs, sl, hd, group_size, dtype)


# --- test_rms_norm.py: test_correctness_functional


def run_rms_functional(backend, bs, sl, hd, dtype, casting_mode, elementwise_affine, *, seed=42):
    atol, rtol = RMS_TOL[dtype]
    reference, offset = REFERENCES[casting_mode]
    gen = torch.Generator().manual_seed(seed)
    tensor = _randn(gen, bs, sl, hd, dtype=dtype)
    h1, h2, h3 = (tensor.clone().requires_grad_() for _ in range(3))
    w = _randn(gen, hd, dtype=dtype) if elementwise_affine else None
    zc = offset == 1.0 and w is not None
    module = normkit.nn.RMSNorm(hd, eps=EPS, elementwise_affine=elementwise_affine, dtype=dtype,
                                zero_centered_weight=zc, casting_mode=casting_mode)
    ref = reference(hd, elementwise_affine=elementwise_affine).to(dtype)
    if w is not None:
        with torch.no_grad():
            module.weight.copy_(w)
            ref.weight.copy_(w)
    with normkit.use_backend(backend):
        y1 = normkit.rms_norm(h1, (hd,), w, EPS, zero_centered_weight=zc, casting_mode=casting_mode)
        y2 = module(h2)
    y3 = ref(h3)
    liger_close("functional vs module: output", y1, y2, atol, rtol)
    liger_close("functional vs reference: output", y1, y3.detach(), atol, rtol)
    grad = _randn(gen, *y2.shape, dtype=dtype)
    with normkit.use_backend(backend):
        y1.backward(grad)
        y2.backward(grad)
    y3.backward(grad)
    liger_close("functional vs module: input.grad", h1.grad, h2.grad, atol, rtol)
    liger_close("functional vs reference: input.grad", h1.grad, h3.grad, atol, rtol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("elementwise_affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("casting_mode", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_SHORT.get)
@pytest.mark.parametrize("bs, sl, hd", [(2, 2, 8), (9, 7, 41)])
def test_correctness_functional(bs, sl, hd, dtype, casting_mode, elementwise_affine, backend):
    _skip_if_fallback(backend, dtype)
    run_rms_functional(backend, bs, sl, hd, dtype, casting_mode, elementwise_affine)


# --- test_layer_norm.py


def run_layer_norm(backend, shape, dtype, weights, *, functional=False, seed=0):
    """Liger's layer-norm check. In 16 bits torch's module runs in float32 on the same values and
    is rounded once (as torch computes on a GPU, where Liger's tests run): torch's CPU float16
    backward rounds intermediates to 16 bits and is up to ~1.5 ulps off float64 (normkit: 0.5),
    which Liger's 1e-3 tolerance does not absorb for gradients of magnitude ~15."""
    atol, rtol = LN_TOL[dtype]
    hd = shape[-1]
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, *shape, dtype=dtype)
    nk_x, torch_x = x.clone().requires_grad_(), x.float().requires_grad_()
    nk_ln = normkit.nn.LayerNorm(hd, eps=EPS, dtype=dtype)
    torch_ln = nn.LayerNorm(hd, eps=EPS)  # float32
    with torch.no_grad():
        if weights == "random":
            nk_ln.weight.copy_(_randn(gen, hd, dtype=dtype))
            nk_ln.bias.copy_(_randn(gen, hd, dtype=dtype))
        torch_ln.weight.copy_(nk_ln.weight)
        torch_ln.bias.copy_(nk_ln.bias)
    with normkit.use_backend(backend):
        if functional:  # liger_layer_norm(X, W, B, eps) -> normkit.layer_norm
            nk_out = normkit.layer_norm(nk_x, (hd,), nk_ln.weight, nk_ln.bias, EPS)
        else:
            nk_out = nk_ln(nk_x)
    torch_out = torch_ln(torch_x)
    liger_close(f"output {list(shape)}", nk_out, torch_out.to(dtype), atol, rtol)
    grad_output = _randn(gen, *shape, dtype=dtype)
    with normkit.use_backend(backend):
        nk_out.backward(grad_output)
    torch_out.backward(grad_output.float())
    liger_close(f"input.grad {list(shape)}", nk_x.grad, torch_x.grad.to(dtype), atol, rtol)
    liger_close(f"weight.grad {list(shape)}", nk_ln.weight.grad, torch_ln.weight.grad.to(dtype), atol, rtol)
    liger_close(f"bias.grad {list(shape)}", nk_ln.bias.grad, torch_ln.bias.grad.to(dtype), atol, rtol)


WEIGHTS = pytest.mark.parametrize("weights", ["liger-init", "random"])


@pytest.mark.parametrize("backend", BACKENDS)
@WEIGHTS
@pytest.mark.parametrize("shape", [(2, 8, 64), (4, 16, 128), (1, 1, 1023), (3, 7, 256)], ids=str)
def test_liger_layer_norm(shape, weights, backend):
    _skip_if_fallback(backend, torch.float32)
    run_layer_norm(backend, shape, torch.float32, weights)


@pytest.mark.parametrize("backend", BACKENDS)
@WEIGHTS
@pytest.mark.parametrize("shape", [(2, 8, 64), (4, 16, 128)], ids=str)
def test_liger_layer_norm_functional(shape, weights, backend):
    _skip_if_fallback(backend, torch.float32)
    run_layer_norm(backend, shape, torch.float32, weights, functional=True)


@pytest.mark.parametrize("backend", BACKENDS)
@WEIGHTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_SHORT.get)
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 7, 256), (2, 3, 4, 512), (8, 1, 1023), (5, 3, 2, 1, 64)], ids=str)
def test_liger_layer_norm_weird_shapes(shape, dtype, weights, backend):
    _skip_if_fallback(backend, dtype)
    run_layer_norm(backend, shape, dtype, weights, seed=42)


# --- the triton backend (its interpreter on CPU): a tiny subset


def test_triton_subset():
    backend_or_skip("triton")
    run_rms_correctness("triton", 2, 3, 41, torch.bfloat16, "llama", "random")
    run_rms_correctness("triton", 2, 3, 41, torch.bfloat16, "gemma", "random")
    run_rms_correctness("triton", 2, 3, 8, torch.float32, "none", None)
    run_grouped("triton", 2, 3, 128, 32, torch.bfloat16)
    run_rms_functional("triton", 2, 2, 8, torch.float32, "gemma", True)
    run_layer_norm("triton", (3, 7, 256), torch.float32, "random")
    run_layer_norm("triton", (2, 3, 64), torch.float16, "random")


# --- the checks can fail


@pytest.mark.parametrize("target", ["rms_norm", "layer_norm"])
def test_a_perturbed_output_fails_the_ported_checks(monkeypatch, target):
    """normkit's output moved by 1e-2 (float32 tolerance: 1e-4 / 1e-5) must fail."""
    original = getattr(normkit.functional, target)

    def perturbed(*args, **kwargs):
        return original(*args, **kwargs) + 1e-2

    monkeypatch.setattr(normkit.functional, target, perturbed)  # what the modules call
    monkeypatch.setattr(normkit, target, perturbed)
    with pytest.raises(AssertionError, match="output"):
        if target == "rms_norm":
            run_rms_correctness("reference", 2, 8, 64, torch.float32, "gemma", "random")
        else:
            run_layer_norm("reference", (2, 8, 64), torch.float32, "random")
