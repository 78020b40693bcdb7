"""normkit.tools.convert / revert on plain torch models and tiny Hugging Face models."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit.tools import convert, revert

from helpers import randn

transformers = pytest.importorskip("transformers")  # imported once for the module: it is slow


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Gains near 1 and biases near 0 but random, so a dropped or swapped parameter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@pytest.fixture(scope="module")
def token_ids():
    return torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(0))


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _randomize_norms(model)
    return model


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomize_norms(model)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# --- Hugging Face models built from configs (no download)


def test_gpt2_converts_with_outputs_unchanged_and_reverts(token_ids):
    model = _gpt2()
    want = _logits(model, token_ids)
    summary = convert(model)
    assert [r.name for r in summary] == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"]
    assert all(r.old == "torch.nn.LayerNorm" and r.new == "normkit.nn.LayerNorm" for r in summary)
    assert type(model.transformer.ln_f) is normkit.nn.LayerNorm
    text = str(summary)
    assert text.startswith("5 module(s) replaced, 0 skipped") and "transformer.h.1.ln_2" in text
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)

    back = revert(model)
    assert len(back.replaced) == 5 and type(model.transformer.ln_f) is torch.nn.LayerNorm
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)


def test_llama_rms_norm_converts_and_reverts_to_its_own_class(token_ids):
    model = _llama()
    hf_cls = type(model.model.norm)
    assert hf_cls.__name__ == "LlamaRMSNorm"
    want = _logits(model, token_ids)
    summary = convert(model)
    assert len(summary.replaced) == 5 and {r.old for r in summary} == {"LlamaRMSNorm"}
    assert type(model.model.layers[1].post_attention_layernorm) is normkit.nn.RMSNorm
    assert model.model.norm.eps == model.config.rms_norm_eps
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)

    revert(model)
    assert type(model.model.norm) is hf_cls and model.model.norm.variance_epsilon == model.config.rms_norm_eps
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)


def test_llama_to_torch_rms_norm_with_fused_false(token_ids):
    """torch.nn.RMSNorm rounds once: right for a float32 Llama (with a note about bfloat16),
    refused for a bfloat16 one, whose LlamaRMSNorm rounds x_hat before the gain."""
    model = _llama()
    want = _logits(model, token_ids)
    summary = convert(model, fused=False)
    assert {r.new for r in summary} == {"torch.nn.RMSNorm"}
    assert all("in bfloat16" in r.note and "fused=True keeps casting_mode='llama'" in r.note for r in summary)
    assert type(model.model.norm) is torch.nn.RMSNorm
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)
    assert len(revert(model)) == 5 and type(model.model.norm).__name__ == "LlamaRMSNorm"

    model = _llama().to(torch.bfloat16)
    summary = convert(model, fused=False)
    assert len(summary.skipped) == 5 and type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert "differs from the original in bfloat16" in summary[0].note and "fused=True keeps" in summary[0].note


# --- bfloat16 models: each norm's casting mode (and gain) comes from the class it replaces


def _from_config(config_name: str, model_name: str, **extra):
    def make():
        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(
            vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32, **extra,
        )
        model = getattr(transformers, model_name)(cfg).eval()
        _randomize_norms(model)
        return model
    return make


LLAMA_OPTIONS = {"casting_mode": "llama"}
GEMMA_OPTIONS = {"zero_centered_weight": True, "casting_mode": "gemma"}
BF16_MODELS = {
    "gpt2": (_gpt2, "torch.nn.LayerNorm", {}),
    "llama": (_llama, "LlamaRMSNorm", LLAMA_OPTIONS),
    "qwen3": (_from_config("Qwen3Config", "Qwen3ForCausalLM", head_dim=16), "Qwen3RMSNorm", LLAMA_OPTIONS),
    "gemma": (_from_config("GemmaConfig", "GemmaForCausalLM", head_dim=16), "GemmaRMSNorm", GEMMA_OPTIONS),
    "gemma2": (_from_config("Gemma2Config", "Gemma2ForCausalLM", head_dim=16), "Gemma2RMSNorm", GEMMA_OPTIONS),
    "gemma3": (_from_config("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16), "Gemma3RMSNorm", GEMMA_OPTIONS),
}


@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_a_bfloat16_model_converts_with_bit_identical_logits(name, token_ids):
    make, old, options = BF16_MODELS[name]
    model = make().to(torch.bfloat16)
    want = _logits(model, token_ids)
    summary = convert(model)
    assert summary.replaced and not summary.skipped and {r.old for r in summary} == {old}
    assert all(r.options == options for r in summary), [r.options for r in summary]
    assert all(f"{k}={v!r}" in str(summary) for k, v in options.items()), str(summary)
    assert torch.equal(_logits(model, token_ids), want)
    if name == "llama":  # the test can fail: normkit's default rounding changes Llama's logits
        for norm in model.modules():
            if isinstance(norm, normkit.nn.RMSNorm):
                norm.casting_mode = "gemma"
        assert not torch.equal(_logits(model, token_ids), want)


def test_a_float32_llama_gets_llamas_rounding_for_a_later_bfloat16_run(token_ids):
    """The casting mode is picked on bfloat16 probes even for a float32 model."""
    model = _llama()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    summary = convert(model)
    assert all(r.options == LLAMA_OPTIONS and not r.note for r in summary)
    assert torch.equal(_logits(model.to(torch.bfloat16), token_ids), _logits(reference, token_ids))


HF_NORMS = [  # (module, class, options convert sets)
    ("llama", "LlamaRMSNorm", LLAMA_OPTIONS),
    ("qwen2", "Qwen2RMSNorm", LLAMA_OPTIONS),
    ("mistral", "MistralRMSNorm", LLAMA_OPTIONS),
    ("t5", "T5LayerNorm", LLAMA_OPTIONS),  # an RMS norm by another name
    ("gemma", "GemmaRMSNorm", GEMMA_OPTIONS),
    ("gemma2", "Gemma2RMSNorm", GEMMA_OPTIONS),
    ("gemma3", "Gemma3RMSNorm", GEMMA_OPTIONS),
    ("qwen3_next", "Qwen3NextRMSNorm", GEMMA_OPTIONS),
    ("olmo2", "Olmo2RMSNorm", {"casting_mode": "gemma"}),  # (weight * x_hat).to(dtype)
    ("gemma3n", "Gemma3nRMSNorm", {"casting_mode": "gemma"}),
    ("cohere", "CohereLayerNorm", {"bias": False}),  # a layer norm without bias
]


def _hf_class(module: str, name: str):
    try:
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
    except (ImportError, AttributeError):
        pytest.skip(f"transformers {transformers.__version__} has no {module}.{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("module, name, options", HF_NORMS, ids=[n for _, n, _ in HF_NORMS])
def test_each_hugging_face_norm_class_gets_its_own_options(module, name, options, dtype):
    cls = _hf_class(module, name)
    model = torch.nn.Sequential(cls(48, eps=1e-5)).to(dtype)
    _randomize_norms(model, seed=11)
    x = randn((2, 5, 48), dtype, seed=12, offset=0.3, scale=2.0)
    want = model(x)
    summary = convert(model)
    assert summary[0].old == name and summary[0].options == options and not summary[0].note
    expected = normkit.nn.LayerNorm if name == "CohereLayerNorm" else normkit.nn.RMSNorm
    assert type(model[0]) is expected and model[0].eps == 1e-5
    assert torch.equal(model(x), want)
    revert(model)
    assert type(model[0]) is cls


def test_a_norm_no_normkit_module_matches_in_the_models_dtype_is_skipped():
    """DeBERTa's layer norm rounds x_hat to the input dtype before its gain and bias: right in
    float32 (converted, with a note), not in bfloat16 (skipped)."""
    cls = _hf_class("deberta", "DebertaLayerNorm")
    model = torch.nn.Sequential(cls(32))
    _randomize_norms(model, seed=13)
    summary = convert(model)
    assert type(model[0]) is normkit.nn.LayerNorm and "agrees in float32, but not in bfloat16: " in summary[0].note
    model = torch.nn.Sequential(cls(32)).to(torch.bfloat16)
    _randomize_norms(model, seed=13)
    summary = convert(model)
    assert summary[0].new is None and type(model[0]) is cls
    assert "skipped: output differs on probe inputs from a layer norm" in summary[0].note


def test_gpt2_to_rms_norm_changes_outputs_and_says_so(token_ids):
    model = _gpt2()
    want = _logits(model, token_ids)
    bias = model.transformer.ln_f.bias.detach().clone()
    summary = convert(model, to="rms_norm")
    assert all("drops the mean subtraction and the bias: outputs change" in r.note for r in summary)
    assert type(model.transformer.ln_f) is normkit.nn.RMSNorm and "bias" not in dict(model.transformer.ln_f.named_parameters())
    assert not torch.allclose(_logits(model, token_ids), want, atol=1e-3)
    revert(model)  # the dropped bias comes back
    assert type(model.transformer.ln_f) is torch.nn.LayerNorm and torch.equal(model.transformer.ln_f.bias, bias)
    torch.testing.assert_close(_logits(model, token_ids), want, rtol=1e-5, atol=1e-5)


# --- plain torch models


class Block(torch.nn.Module):
    def __init__(self, d: int = 12):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)
        self.rms = torch.nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        return self.rms(x + self.fc(self.ln(x)))


def test_parameters_are_taken_over_so_an_existing_optimizer_keeps_working():
    torch.manual_seed(1)
    model = Block()
    _randomize_norms(model)
    reference = copy.deepcopy(model)
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=0.1)
    convert(model)
    assert model.ln.weight is params_before[0], "same Parameter object, not a copy"
    x = randn((5, 7, 12), seed=2)
    for m, o in ((model, opt), (reference, opt_ref)):
        for _ in range(2):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_dtype_device_and_training_mode_are_kept():
    model = Block().to(torch.bfloat16).eval()
    _randomize_norms(model, seed=3)
    x = randn((3, 12), torch.bfloat16, seed=3)
    want = model(x)
    summary = convert(model)
    assert model.ln.weight.dtype == torch.bfloat16 and not model.ln.training
    assert model.rms.weight.device.type == "cpu"
    assert [r.options for r in summary] == [{}, {"casting_mode": "gemma"}]  # torch's RMS norm rounds once
    assert "casting_mode='gemma'" in str(summary)
    y = model(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)


def test_rms_norm_to_layer_norm_uses_the_gain_and_no_bias():
    model = Block()
    _randomize_norms(model, seed=4)
    convert(model, to="layer_norm")
    ln = model.rms
    assert type(ln) is normkit.nn.LayerNorm and ln.bias is None and ln.eps == 1e-6
    x = randn((4, 12), seed=5)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (12,), ln.weight, None, 1e-6))


def test_batch_norm_only_on_request():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.Flatten(), torch.nn.Linear(6 * 9, 5), torch.nn.BatchNorm1d(5))
    assert len(convert(cnn)) == 0 and type(cnn[1]) is torch.nn.BatchNorm2d
    _randomize_norms(cnn, seed=6)
    w2d, b2d = cnn[1].weight, cnn[1].bias
    summary = convert(cnn, batch_norm=True)
    # BatchNorm1d becomes a ChannelLayerNorm (over dim 1), no longer a LayerNorm over the last
    # dim, which was the wrong axis for (N, C, L) input
    assert [(r.name, r.new) for r in summary] == [("1", "normkit.nn.LayerNorm2d"), ("4", "normkit.nn.ChannelLayerNorm")]
    assert all("outputs change" in r.note for r in summary)
    assert cnn[1].weight is w2d and cnn[1].eps == 1e-5
    x = randn((2, 3, 5, 5), seed=7)
    feat = cnn[0](x)
    want = F.layer_norm(feat.permute(0, 2, 3, 1), (6,), w2d, b2d, 1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(cnn[1](feat), want, rtol=1e-5, atol=1e-5)
    assert cnn(x).shape == (2, 5)
    revert(cnn)
    assert type(cnn[1]) is torch.nn.BatchNorm2d and type(cnn[4]) is torch.nn.BatchNorm1d and cnn[1].weight is w2d


@pytest.mark.parametrize("shape", [(3, 7), (3, 7, 7), (2, 7, 5)])
def test_batch_norm_1d_becomes_a_layer_norm_over_the_channel_dim(shape):
    """BatchNorm1d takes (N, C) and (N, C, L): the replacement normalizes over C in both,
    also when L == C, where a last-dim layer norm would silently use the wrong axis."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(7, eps=1e-4))
    _randomize_norms(model, seed=8)
    w, b = model[0].weight, model[0].bias
    convert(model, batch_norm=True)
    x = randn(shape, seed=9, offset=0.5, scale=2.0)
    xd = x.double()
    mean = xd.mean(1, keepdim=True)
    var = xd.var(1, unbiased=False, keepdim=True)
    per_channel = (7,) + (1,) * (len(shape) - 2)
    want = (xd - mean) / (var + 1e-4).sqrt() * w.double().reshape(per_channel) + b.double().reshape(per_channel)
    y = model(x)
    assert y.shape == x.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        model(randn((2, 7, 3, 3), seed=10))
    revert(model)
    assert type(model[0]) is torch.nn.BatchNorm1d and model[0].weight is w


class GemmaStyleRMSNorm(torch.nn.Module):
    """Duck-types as an HF RMS norm but scales by (1 + weight): becomes a zero-centred RMSNorm."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class PlainRMSNorm(GemmaStyleRMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class OffsetRMSNorm(GemmaStyleRMSNorm):
    """Neither gain: must not be converted."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + 1.0


class ChannelFirstLayerNorm(torch.nn.Module):
    """Normalizes dim 1 (ViTDet's layer norm): a 2-D probe would take it for a last-dim norm."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.bias = torch.nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        shape = (-1,) + (1,) * (x.dim() - 2)
        return self.weight.reshape(shape) * (x - u) / torch.sqrt(s + self.eps) + self.bias.reshape(shape)


class UnweightedRMSNorm(torch.nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class MyLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


def test_duck_typed_rms_norms_are_checked_and_subclasses_skipped():
    model = torch.nn.Sequential(GemmaStyleRMSNorm(8), PlainRMSNorm(8), MyLayerNorm(8), OffsetRMSNorm(8))
    _randomize_norms(model, seed=8)
    x = randn((3, 8), seed=9)
    want = model(x)
    summary = convert(model)
    by_name = {r.name: r for r in summary}
    assert by_name["0"].new == "normkit.nn.RMSNorm" and model[0].zero_centered_weight
    assert by_name["1"].new == "normkit.nn.RMSNorm" and not model[1].zero_centered_weight
    assert by_name["2"].new is None and "subclass of torch.nn.LayerNorm" in by_name["2"].note
    assert by_name["3"].new is None and "RMS norm with gain weight or gain (1 + weight)" in by_name["3"].note
    assert type(model[2]) is MyLayerNorm and type(model[3]) is OffsetRMSNorm
    torch.testing.assert_close(model(x), want)
    assert "2 module(s) replaced, 2 skipped" in str(summary)


def test_norms_over_another_dim_and_without_a_weight_are_skipped():
    model = torch.nn.Sequential(ChannelFirstLayerNorm(8), UnweightedRMSNorm())
    summary = convert(model)
    assert [r.new for r in summary] == [None, None]
    assert "a layer norm with gain weight or gain (1 + weight), with bias" in summary[0].note
    assert "without a weight" in summary[1].note
    assert [type(m) for m in model] == [ChannelFirstLayerNorm, UnweightedRMSNorm]


def test_a_shared_norm_stays_shared():
    ln = torch.nn.LayerNorm(6)
    model = torch.nn.Sequential(ln, torch.nn.Linear(6, 6), ln)
    summary = convert(model)
    assert len(summary) == 1 and model[0] is model[2] and type(model[0]) is normkit.nn.LayerNorm


def test_revert_turns_hand_built_normkit_modules_into_torch_ones():
    model = torch.nn.Sequential(normkit.nn.LayerNorm(4, bias=False), normkit.nn.RMSNorm(4), normkit.nn.LayerNormCHW(4), normkit.nn.LayerNorm2d(4))
    summary = revert(model)
    assert [type(m) for m in model] == [torch.nn.LayerNorm, torch.nn.RMSNorm, torch.nn.GroupNorm, normkit.nn.LayerNorm2d]
    assert model[0].bias is None and model[2].num_groups == 1
    assert summary[-1].new is None and "no channels-first" in summary[-1].note


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: convert(Block(), to="batch_norm"), ValueError, r"to must be None, 'layer_norm', 'rms_norm' or 'dyt', got 'batch_norm'"),
        (lambda: convert("model"), TypeError, r"torch.nn.Module as model, got str"),
        (lambda: convert(torch.nn.LayerNorm(3)), ValueError, r"model is itself a LayerNorm; wrap it"),
        (lambda: convert(Block(), fused=1), TypeError, r"fused and batch_norm must be bools"),
        (lambda: revert(torch.nn.RMSNorm(3)), ValueError, r"itself a RMSNorm"),
    ],
)
def test_bad_arguments_get_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
