"""``normkit.nn.DyT`` (Dynamic Tanh) and ``normkit.convert(model, to="dyt")``."""

from __future__ import annotations

import io

import pytest
import torch

import normkit
from normkit.nn import DyT
from normkit.tools import convert, revert

from helpers import randn


def _formula(x, alpha, weight, bias):
    y = torch.tanh(alpha.double() * x.double())
    if weight is not None:
        y = y * weight.double()
    return y if bias is None else y + bias.double()


def _randomized(m: DyT, seed: int) -> DyT:
    with torch.no_grad():
        m.alpha.fill_(0.3 + 0.1 * seed)
        for i, p in enumerate((m.weight, m.bias)):
            if p is not None:
                p.copy_(randn(p.shape, seed=seed + i, offset=1.0 - i, scale=0.5))
    return m


def test_parameters_and_init():
    m = DyT((3, 4), alpha_init=0.7)
    assert m.alpha.shape == () and m.alpha.item() == pytest.approx(0.7)
    assert torch.equal(m.weight, torch.ones(3, 4)) and torch.equal(m.bias, torch.zeros(3, 4))
    assert [n for n, _ in m.named_parameters()] == ["alpha", "weight", "bias"]
    assert repr(m) == "DyT((3, 4), alpha_init=0.7, elementwise_affine=True, bias=True)"
    assert DyT(5, bias=False).bias is None
    bare = DyT(5, elementwise_affine=False)
    assert bare.weight is None and bare.bias is None and [n for n, _ in bare.named_parameters()] == ["alpha"]
    m16 = DyT(5, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="alpha_init must be a real number"):
        DyT(5, alpha_init="0.5")


@pytest.mark.parametrize("shape", [(1,), (3,), (1000,), (2, 3)])
@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
def test_forward_matches_the_float64_formula(shape, affine, bias):
    m = _randomized(DyT(shape, elementwise_affine=affine, bias=bias), seed=len(shape) + shape[-1])
    x = randn((4,) + shape, seed=1, scale=3.0)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), _formula(x, m.alpha, m.weight, m.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_input_is_computed_in_float32_and_rounded_once(dtype):
    m = _randomized(DyT(1000), seed=2)  # float32 parameters, as under autocast
    x = randn((8, 1000), dtype, seed=3, scale=3.0)
    y = m(x)
    assert y.dtype == dtype
    with torch.no_grad():
        in_float32 = (torch.tanh(m.alpha * x.float()) * m.weight + m.bias).to(dtype)
        in_16_bit = torch.tanh(m.alpha.to(dtype) * x) * m.weight.to(dtype) + m.bias.to(dtype)
    assert torch.equal(y, in_float32)
    truth = _formula(x, m.alpha, m.weight, m.bias)
    assert (y.double() - truth).abs().max() < (in_16_bit.double() - truth).abs().max()


def test_gradcheck_float64():
    m = _randomized(DyT((2, 3), dtype=torch.float64), seed=4)
    x = randn((5, 2, 3), torch.float64, seed=5, requires_grad=True)
    params = (m.alpha, m.weight, m.bias)

    def f(x, alpha, weight, bias):
        return torch.func.functional_call(m, {"alpha": alpha, "weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def test_input_checks():
    m = DyT(4)
    with pytest.raises(ValueError, match=r"expected input with shape \[\*, 4\], but got input of size \[2, 5\]"):
        m(torch.randn(2, 5))
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        m(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        m([[1.0, 2.0, 3.0, 4.0]])


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(12, 12), _randomized(DyT(12), seed=6), torch.nn.Linear(12, 3))
    x = randn((5, 12), seed=7, requires_grad=True)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager)
    dyt = model[1]
    ge = torch.autograd.grad(eager.sum(), (x, dyt.alpha, dyt.weight, dyt.bias))
    gc = torch.autograd.grad(compiled.sum(), (x, dyt.alpha, dyt.weight, dyt.bias))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


def test_state_dict_round_trip():
    m = _randomized(DyT(7, alpha_init=0.2), seed=8)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = DyT(7)
    other.load_state_dict(torch.load(buf))
    assert list(other.state_dict()) == ["alpha", "weight", "bias"]
    x = randn((3, 7), seed=9)
    assert torch.equal(other(x), m(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        DyT(6).load_state_dict(m.state_dict())


def test_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), DyT(32), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = randn((64, 8), seed=10)
    target = x[:, :1] * 2 - x[:, 1:2]
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    assert model[1].alpha.item() != pytest.approx(0.5), "alpha is learned"


# --- convert(to="dyt")


class Block(torch.nn.Module):
    def __init__(self, d: int = 12):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)
        self.rms = torch.nn.RMSNorm(d, eps=1e-6)
        self.nk = normkit.nn.LayerNorm(d, bias=False)
        self.zc = normkit.nn.RMSNorm(d, zero_centered_weight=True)
        self.bare = torch.nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x):
        return self.bare(self.zc(self.nk(self.rms(self.fc(self.ln(x))))))


def test_convert_to_dyt_replaces_norms_and_takes_over_parameters():
    model = Block()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("fc."):
                p.copy_(randn(p.shape, seed=len(name), scale=0.3, offset=0.0 if name.startswith("zc") or "bias" in name else 1.0))
    before = {name: p for name, p in model.named_parameters()}
    x = randn((4, 12), seed=11)
    want = model(x)
    zc_weight = model.zc.weight.detach().clone()

    summary = convert(model, to="dyt")
    assert [r.name for r in summary] == ["ln", "rms", "nk", "zc", "bare"]
    assert all(r.new == "normkit.nn.DyT" and "outputs change" in r.note for r in summary)
    assert all(type(getattr(model, n)) is DyT for n in ("ln", "rms", "nk", "zc", "bare"))
    assert model.ln.weight is before["ln.weight"] and model.ln.bias is before["ln.bias"], "taken over, not copied"
    assert model.rms.weight is before["rms.weight"] and model.rms.bias is None and model.nk.bias is None
    assert model.bare.weight is None and model.bare.bias is None
    torch.testing.assert_close(model.zc.weight.detach(), 1.0 + zc_weight)  # DyT's gain is plain: 1 + w
    assert all(m.alpha.item() == 0.5 for m in model.modules() if isinstance(m, DyT))

    y = model(x)
    assert y.shape == want.shape and not torch.allclose(y, want, atol=1e-2)
    torch.testing.assert_close(model.ln(x).double(), _formula(x, model.ln.alpha, before["ln.weight"], before["ln.bias"]))

    with torch.no_grad():
        model.zc.weight.add_(0.25)  # "training" the DyT gain
    revert(model)
    assert type(model.ln) is torch.nn.LayerNorm and model.ln.weight is before["ln.weight"]
    assert type(model.zc) is normkit.nn.RMSNorm and model.zc.weight is before["zc.weight"]
    torch.testing.assert_close(model.zc.weight.detach(), zc_weight + 0.25)  # revert writes back w = gain - 1


def test_convert_to_dyt_on_a_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).eval()
    summary = convert(model, to="dyt")
    assert len(summary.replaced) == 3 and {r.old for r in summary} == {"LlamaRMSNorm"}
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    assert logits.shape == (2, 9, 100) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert model.model.norm.alpha.grad is not None


def test_convert_bad_to_value():
    with pytest.raises(ValueError, match=r"to must be None, 'layer_norm', 'rms_norm' or 'dyt', got 'DyT'"):
        convert(Block(), to="DyT")
    model = Block()
    convert(model)  # the default keeps each kind
    assert type(model.ln) is normkit.nn.LayerNorm and type(model.rms) is normkit.nn.RMSNorm
