"""``casting_mode`` of ``normkit.rms_norm`` / ``normkit.nn.RMSNorm`` against the Hugging Face
modules each mode reproduces, in bfloat16 and float16.

What is claimed, and tested here: with the reference backend, "llama" is bitwise
``LlamaRMSNorm`` and "gemma" + ``zero_centered_weight`` bitwise ``GemmaRMSNorm``. The kernels
sum in another order, so their float32 ``x_hat`` can differ in the last bit: "gemma" is within
1 ulp of Hugging Face; "llama" rounds ``x_hat`` (within 1 ulp) and then multiplies exactly as
Hugging Face does, so the product is within 2 ulps.
"""

from __future__ import annotations

import pytest
import torch

import normkit

from helpers import randn

transformers = pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16)
WIDTHS = (1, 3, 1000, 4097)
EPS = 1e-6


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b`` in units in the last place (16-bit floats)."""
    assert a.dtype == b.dtype and a.dtype in DTYPES and a.shape == b.shape

    def ordered(t):  # sign-magnitude bits -> integers in the order of the floats
        i = t.view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -(i & 0x7FFF), i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def _case(dtype, n, seed=0):
    x = randn((64, n), dtype, seed=seed + n, scale=3.0)
    w = randn((n,), dtype, seed=seed + n + 1, scale=0.5, offset=1.0)
    return x, w


def _hf(cls, w, dtype):
    m = cls(w.shape[0], eps=EPS).to(dtype)
    with torch.no_grad():
        m.weight.copy_(w)
    return m


def test_the_ulp_helper_can_fail():
    a = torch.tensor([1.0, -2.0, 0.0], dtype=torch.bfloat16)
    b = torch.nextafter(a.float(), torch.tensor(10.0)).bfloat16()  # float32 steps vanish in bf16
    assert _ulps(a, a) == 0 and _ulps(a, b) == 0
    assert _ulps(a, torch.tensor([1.0078125, -2.0, 0.0], dtype=torch.bfloat16)) == 1
    assert _ulps(torch.tensor([-0.0], dtype=torch.float16), torch.tensor([0.0], dtype=torch.float16)) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_reference_backend_is_bitwise_hugging_face(dtype, n):
    x, w = _case(dtype, n)
    llama, gemma = _hf(LlamaRMSNorm, w, dtype), _hf(GemmaRMSNorm, w - 1, dtype)
    with normkit.use_backend("reference"), torch.no_grad():
        got_llama = normkit.rms_norm(x, (n,), w, EPS, casting_mode="llama")
        got_gemma = normkit.rms_norm(x, (n,), gemma.weight, EPS, zero_centered_weight=True, casting_mode="gemma")
        assert torch.equal(got_llama, llama(x))
        assert torch.equal(got_gemma, gemma(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
def test_default_backend_is_within_one_ulp_gemma_and_two_ulps_llama(dtype, n):
    x, w = _case(dtype, n, seed=100)
    llama, gemma = _hf(LlamaRMSNorm, w, dtype), _hf(GemmaRMSNorm, w - 1, dtype)
    with torch.no_grad():
        x_hat = normkit.rms_norm(x, (n,), None, EPS)
        got_llama = normkit.rms_norm(x, (n,), w, EPS, casting_mode="llama")
        got_gemma = normkit.rms_norm(x, (n,), gemma.weight, EPS, zero_centered_weight=True)
        want_llama, want_gemma = llama(x), gemma(x)
    xf = x.float()
    hf_x_hat = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dtype)
    assert _ulps(x_hat, hf_x_hat) <= 1
    assert torch.equal(got_llama, w * x_hat), "llama: the gain is Hugging Face's multiply of the rounded x_hat"
    assert _ulps(got_llama, want_llama) <= 2
    assert _ulps(got_gemma, want_gemma) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_modes_differ_in_16_bits_and_none_is_gemma(dtype):
    x, w = _case(dtype, 1000, seed=200)
    with normkit.use_backend("reference"), torch.no_grad():
        default = normkit.rms_norm(x, (1000,), w, EPS)
        gemma = normkit.rms_norm(x, (1000,), w, EPS, casting_mode="gemma")
        none = normkit.rms_norm(x, (1000,), w, EPS, casting_mode="none")
        llama = normkit.rms_norm(x, (1000,), w, EPS, casting_mode="llama")
    assert torch.equal(default, gemma) and torch.equal(none, gemma)
    assert not torch.equal(llama, gemma), "llama rounds twice: some elements must differ"
    assert _ulps(llama, gemma) <= 2


def test_float32_weight_with_16_bit_input_gives_the_input_dtype():
    x, w = _case(torch.bfloat16, 1000, seed=300)
    w32 = w.float() + randn((1000,), seed=301, scale=1e-3)  # not representable in bf16
    with normkit.use_backend("reference"), torch.no_grad():
        y = normkit.rms_norm(x, (1000,), w32, EPS, casting_mode="llama")
        x_hat = normkit.rms_norm(x, (1000,), None, EPS)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (w32 * x_hat).to(torch.bfloat16))  # Liger's rounding of HF's float32 output


@pytest.mark.parametrize("prenorm", [False, True])
def test_llama_mode_with_residual_and_gradients(prenorm):
    x, h = randn((5, 11), seed=400, requires_grad=True), randn((5, 11), seed=401, requires_grad=True)
    w = randn((11,), seed=402, offset=1.0, scale=0.5, requires_grad=True)
    out = normkit.rms_norm(x, (11,), w, EPS, residual=h, prenorm=prenorm, casting_mode="llama")
    y, s = out if prenorm else (out, None)
    s64 = (x + h).double()
    want = s64 * torch.rsqrt(s64.square().mean(-1, keepdim=True) + EPS) * w.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    if prenorm:
        torch.testing.assert_close(s, x + h)
    dy = randn((5, 11), seed=403)
    got = torch.autograd.grad(y, (x, h, w), dy)
    ref = torch.autograd.grad(want, (x, h, w), dy.double())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-4)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: normkit.rms_norm(a, (11,), b, EPS, casting_mode="llama"), (x64, w64))


def test_bad_casting_mode_lists_the_allowed_values():
    x = randn((2, 4), seed=500)
    for bad in ("Llama", "fp32", None, 1):
        with pytest.raises(ValueError, match=r"casting_mode must be one of 'gemma', 'llama', 'none', got "):
            normkit.rms_norm(x, (4,), torch.ones(4), casting_mode=bad)
    with pytest.raises(ValueError, match="casting_mode must be one of"):
        normkit.nn.RMSNorm(4, casting_mode="bf16")
    with pytest.raises(ValueError, match="Expected weight to be of same shape"):
        normkit.rms_norm(x, (4,), torch.ones(3), casting_mode="llama")


def test_module_option_repr_state_dict_and_forward():
    m = normkit.nn.RMSNorm(1000, eps=EPS, casting_mode="llama", dtype=torch.bfloat16)
    assert repr(m) == "RMSNorm((1000,), eps=1e-06, elementwise_affine=True, casting_mode='llama')"
    assert list(m.state_dict()) == ["weight"] and torch.equal(m.weight, torch.ones(1000, dtype=torch.bfloat16))
    x, w = _case(torch.bfloat16, 1000, seed=600)
    with torch.no_grad():
        m.weight.copy_(w)
    with normkit.use_backend("reference"), torch.no_grad():
        assert torch.equal(m(x), _hf(LlamaRMSNorm, w, torch.bfloat16)(x))
    assert repr(normkit.nn.RMSNorm(4, casting_mode="gemma")) == repr(torch.nn.RMSNorm(4))


def test_torch_jit_script_keeps_the_llama_casting():
    x, w = _case(torch.bfloat16, 1000, seed=700)
    m = normkit.nn.RMSNorm(1000, eps=EPS, casting_mode="llama", dtype=torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(w)
    scripted = torch.jit.script(torch.nn.Sequential(m))
    with torch.no_grad():
        assert torch.equal(scripted(x), _hf(LlamaRMSNorm, w, torch.bfloat16)(x))


def test_torch_compile_fullgraph_llama_mode():
    torch._dynamo.reset()
    m = normkit.nn.RMSNorm(12, eps=EPS, casting_mode="llama", zero_centered_weight=True)
    with torch.no_grad():
        m.weight.copy_(randn((12,), seed=800, scale=0.3))
    x = randn((3, 12), torch.bfloat16, seed=801, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert compiled.dtype == torch.bfloat16 and torch.equal(compiled, eager)
    ge = torch.autograd.grad(eager.float().sum(), m.weight)[0]
    gc = torch.autograd.grad(compiled.float().sum(), m.weight)[0]
    torch.testing.assert_close(gc, ge)
