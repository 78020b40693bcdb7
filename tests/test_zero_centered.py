"""Zero-centred gain ``y = x_hat * (1 + w) (+ b)`` (Gemma): functional, modules, TorchScript,
and ``normkit.convert`` on Hugging Face Gemma models built from tiny configs."""

from __future__ import annotations

import copy

import pytest
import torch

import normkit
from normkit.tools import convert, revert

from helpers import randn

WIDTHS = (1, 3, 1000)


def _formula(x, w, b, eps, is_rms):
    """The definition in float64: normalize, scale by 1 + w, shift by b."""
    x = x.double()
    mean = 0.0 if is_rms else x.mean(-1, keepdim=True)
    var = x.square().mean(-1, keepdim=True) if is_rms else (x - mean).square().mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * (1.0 + w.double())
    return y if b is None else y + b.double()


def _call(is_rms, x, w, b, eps, **kw):
    if is_rms:
        return normkit.rms_norm(x, x.shape[-1:], w, eps, zero_centered_weight=True, **kw)
    return normkit.layer_norm(x, x.shape[-1:], w, b, eps, zero_centered_weight=True, **kw)


# --- functional


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n", WIDTHS)
def test_forward_and_gradients_match_the_float64_formula(is_rms, n):
    x = randn((5, n), seed=n, requires_grad=True)
    w = randn((n,), seed=n + 1, scale=0.3, requires_grad=True)  # around 0: the gain is near 1
    b = None if is_rms else randn((n,), seed=n + 2, scale=0.3, requires_grad=True)
    dy = randn((5, n), seed=n + 3)
    y = _call(is_rms, x, w, b, 1e-5)
    leaves = [t for t in (x, w, b) if t is not None]
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    want = _formula(x64[0], x64[1], None if is_rms else x64[2], 1e-5, is_rms)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=2e-5)
    got = torch.autograd.grad(y, leaves, dy)
    ref = torch.autograd.grad(want, x64, dy.double())
    for name, g, r in zip(("x", "weight", "bias"), got, ref):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")
    # and the plain gain is a different function: the option is not ignored (a width-1 layer
    # norm outputs its bias whatever the gain)
    plain = normkit.rms_norm(x, (n,), w, 1e-5) if is_rms else normkit.layer_norm(x, (n,), w, b, 1e-5)
    assert torch.allclose(plain, y, atol=1e-3) == (n == 1 and not is_rms)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_gradcheck_float64(is_rms):
    x = randn((4, 7), torch.float64, seed=3, requires_grad=True)
    w = randn((7,), torch.float64, seed=4, scale=0.3, requires_grad=True)
    r = randn((4, 7), torch.float64, seed=5, requires_grad=True)
    if is_rms:
        f = lambda x, w, r: normkit.rms_norm(x, (7,), w, 1e-5, residual=r, zero_centered_weight=True)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, r))
        assert torch.autograd.gradgradcheck(f, (x, w, r))
    else:
        b = randn((7,), torch.float64, seed=6, requires_grad=True)
        f = lambda x, w, b, r: normkit.layer_norm(x, (7,), w, b, 1e-5, residual=r, zero_centered_weight=True)  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, w, b, r))
        assert torch.autograd.gradgradcheck(f, (x, w, b, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_gain_is_formed_in_float32_like_gemma(dtype):
    """1 + w in a 16-bit dtype would round small offsets away; Gemma adds in float32."""
    n = 1000
    x = randn((6, n), dtype, seed=7)
    w = randn((n,), seed=8, scale=0.004).to(dtype)  # below bf16's step at 1 (2**-7)
    got = normkit.rms_norm(x, (n,), w, 1e-6, zero_centered_weight=True)
    xf = x.float()
    gemma = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).to(dtype)
    rounded_gain = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w).float()).to(dtype)
    assert got.dtype == dtype
    err_gemma = (got.float() - gemma.float()).abs().max().item()
    err_rounded = (got.float() - rounded_gain.float()).abs().max().item()
    assert err_gemma < err_rounded, f"{err_gemma} vs {err_rounded}: the gain was rounded to {dtype}"


def test_prenorm_residual_and_layer_norm_bias():
    x, h = randn((3, 10), seed=9), randn((3, 10), seed=10)
    w, b = randn((10,), seed=11, scale=0.3), randn((10,), seed=12)
    y, s = normkit.layer_norm(x, (10,), w, b, residual=h, prenorm=True, zero_centered_weight=True)
    torch.testing.assert_close(s, x + h)
    torch.testing.assert_close(y.double(), _formula(x + h, w, b, 1e-5, False), rtol=1e-5, atol=2e-5)


def test_errors():
    x = randn((2, 4), seed=13)
    with pytest.raises(ValueError, match=r"zero_centered_weight=True scales by \(1 \+ weight\), so it needs a weight, but got weight=None"):
        normkit.rms_norm(x, (4,), None, zero_centered_weight=True)
    with pytest.raises(ValueError, match="needs a weight"):
        normkit.layer_norm(x, (4,), None, randn((4,), seed=1), zero_centered_weight=True)
    with pytest.raises(TypeError, match="zero_centered_weight must be a bool, got 1"):
        normkit.layer_norm(x, (4,), torch.ones(4), zero_centered_weight=1)
    with pytest.raises(ValueError, match="Expected weight to be of same shape as normalized_shape"):
        normkit.rms_norm(x, (4,), torch.ones(3), zero_centered_weight=True)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None, got list"):
        normkit.rms_norm(x, (4,), [0.0] * 4, zero_centered_weight=True)


# --- modules


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
def test_module_init_state_dict_repr_and_forward(cls):
    m = getattr(normkit.nn, cls)(5, eps=1e-6, zero_centered_weight=True)
    theirs = getattr(torch.nn, cls)(5, eps=1e-6)
    assert torch.equal(m.weight, torch.zeros(5)), "zero-centred weights start at 0 (gain 1)"
    assert list(m.state_dict()) == list(theirs.state_dict())
    assert repr(m) == repr(theirs)[:-1] + ", zero_centered_weight=True)"
    x = randn((4, 5), seed=14)
    torch.testing.assert_close(m(x), theirs(x))  # gain 1 either way at initialization
    with torch.no_grad():
        m.weight.copy_(randn((5,), seed=15, scale=0.3))
    b = None if cls == "RMSNorm" else m.bias
    torch.testing.assert_close(m(x).double(), _formula(x, m.weight.detach(), None if b is None else b.detach(), 1e-6, cls == "RMSNorm"))
    m.reset_parameters()
    assert torch.equal(m.weight, torch.zeros(5))
    assert torch.equal(getattr(normkit.nn, cls)(5).weight, torch.ones(5)), "the default keeps torch's init"


def test_module_needs_an_affine_and_a_bool():
    with pytest.raises(ValueError, match="needs elementwise_affine=True"):
        normkit.nn.RMSNorm(4, elementwise_affine=False, zero_centered_weight=True)
    with pytest.raises(TypeError, match="zero_centered_weight must be a bool"):
        normkit.nn.LayerNorm(4, zero_centered_weight="yes")


def test_torch_jit_script_keeps_the_zero_centred_gain():
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 6),
        normkit.nn.LayerNorm(6, zero_centered_weight=True),
        normkit.nn.RMSNorm(6, eps=1e-6, zero_centered_weight=True),
        normkit.nn.LayerNorm(6, bias=False, zero_centered_weight=True),
    )
    with torch.no_grad():
        for m in list(net)[1:]:
            m.weight.copy_(randn((6,), seed=16, scale=0.5))
    x = randn((3, 6), seed=17)
    want = net(x)
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(x), want)
    scripted(x).sum().backward()
    assert all(m.weight.grad is not None for m in list(net)[1:]), "the scripted model trains the same parameters"
    x16 = x.bfloat16()
    net16 = copy.deepcopy(net[1:])  # the norms alone: fp32 parameters, bf16 activations
    torch.testing.assert_close(torch.jit.script(net16)(x16), net16(x16), rtol=2e-2, atol=2e-2)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = normkit.nn.RMSNorm(12, zero_centered_weight=True)
    with torch.no_grad():
        m.weight.copy_(randn((12,), seed=18, scale=0.3))
    x = randn((3, 12), seed=19, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled.sum(), m.weight)[0], torch.autograd.grad(eager.sum(), m.weight)[0])


# --- convert: (1 + w) norms, by class (Hugging Face Gemma) and by probe


transformers = pytest.importorskip("transformers")


def _tiny(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=32)
    if kind == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common))
    elif kind == "gemma2":
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(sliding_window=16, **common))
    else:  # Gemma 3 adds (1 + w) norms on the per-head queries and keys (4-D inputs)
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(sliding_window=16, **common))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma starts them at 0: random, so a gain of w instead of 1 + w shows
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
def test_gemma_converts_with_logits_and_norm_gradients_unchanged(kind):
    model = _tiny(kind)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(2))
    summary = convert(model)
    hf_name = {"gemma": "GemmaRMSNorm", "gemma2": "Gemma2RMSNorm", "gemma3": "Gemma3RMSNorm"}[kind]
    assert summary.replaced and not summary.skipped and {r.old for r in summary} == {hf_name}
    norms = [m for m in model.modules() if isinstance(m, normkit.nn.RMSNorm)]
    assert len(norms) == len(summary) and all(m.zero_centered_weight for m in norms)
    assert model.model.norm.eps == model.config.rms_norm_eps
    assert model.model.norm.weight is ref.model.norm.weight or torch.equal(model.model.norm.weight, ref.model.norm.weight)

    want, got = ref(ids).logits, model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if "norm" in n}
    new_grads = {n: p.grad for n, p in model.named_parameters() if "norm" in n}
    assert ref_grads.keys() == new_grads.keys() and len(ref_grads) == len(summary)
    for name, g in ref_grads.items():
        torch.testing.assert_close(new_grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")

    revert(model)
    assert type(model.model.norm).__name__ == hf_name
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """Duck-types as a Hugging Face RMS norm, scales by (1 + weight), in its own way."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d))
        self.variance_epsilon = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (self.weight + 1)


class SquaredGainRMSNorm(ZeroCenteredRMSNorm):
    """Agrees with a (1 + weight) norm at weight = 0 only: one probe would be fooled."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight**2)


def test_convert_proves_zero_centred_norms_by_probe_and_skips_look_alikes():
    model = torch.nn.Sequential(ZeroCenteredRMSNorm(7), ZeroCenteredRMSNorm(7), SquaredGainRMSNorm(7))
    with torch.no_grad():
        model[1].weight.copy_(randn((7,), seed=20, scale=0.3))  # model[0], model[2] keep zeros
    x = randn((4, 7), seed=21)
    want = model(x)
    summary = convert(model)
    assert [r.new for r in summary] == ["normkit.nn.RMSNorm", "normkit.nn.RMSNorm", None]
    assert model[0].zero_centered_weight and model[1].zero_centered_weight
    assert "gain (1 + weight)" in summary[2].note and type(model[2]) is SquaredGainRMSNorm
    torch.testing.assert_close(model(x), want)


def test_convert_keeps_a_zero_centred_gain_across_kinds_and_refuses_torch_modules():
    model = torch.nn.Sequential(ZeroCenteredRMSNorm(6), torch.nn.Linear(6, 6))
    with torch.no_grad():
        model[0].weight.copy_(randn((6,), seed=22, scale=0.3))
    summary = convert(model, fused=False)
    assert summary[0].new is None and "no zero-centred (1 + weight) gain" in summary[0].note
    convert(model, to="layer_norm")
    assert type(model[0]) is normkit.nn.LayerNorm and model[0].zero_centered_weight and model[0].bias is None
    x = randn((3, 6), seed=23)
    torch.testing.assert_close(model[0](x).double(), _formula(x, model[0].weight.detach(), None, model[0].eps, False))
    revert(model)
    assert type(model[0]) is ZeroCenteredRMSNorm
    hand_built = torch.nn.Sequential(normkit.nn.RMSNorm(6, zero_centered_weight=True))
    summary = revert(hand_built)
    assert type(hand_built[0]) is normkit.nn.RMSNorm and "no zero-centred" in summary[0].note


def test_fold_leaves_zero_centred_norms_alone():
    model = torch.nn.Sequential(normkit.nn.LayerNorm(6, zero_centered_weight=True), torch.nn.Linear(6, 3)).eval()
    assert normkit.fold(model) == []
    with pytest.raises(TypeError, match="not zero-centred"):
        normkit.fold(model, [("0", "1")])
