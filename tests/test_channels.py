"""Channels-first norms: LayerNorm2d (per pixel over C) and LayerNormCHW (= GroupNorm(1, C))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import normkit
from normkit.functional_channels import layer_norm_2d, layer_norm_chw

from helpers import assert_close_to_truth, randn, tolerance

SHAPES = [(2, 5, 7, 9), (3, 1, 4, 3), (1, 33, 1, 2)]


def _affine(c: int, dtype=torch.float32, seed: int = 10):
    w = randn((c,), torch.float64, seed=seed, offset=1.0, scale=0.5).to(dtype)
    b = randn((c,), torch.float64, seed=seed + 1, scale=0.5).to(dtype)
    return w, b


def _ln2d_via_permute(x, w, b, eps):
    """The usual implementation LayerNorm2d replaces: two layout copies around F.layer_norm."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), w, b, eps).permute(0, 3, 1, 2)


def _channels_last(x):
    return x.detach().to(memory_format=torch.channels_last).requires_grad_(x.requires_grad)


# --- LayerNorm2d


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layer_norm_2d_matches_permute_layer_norm(shape, layout):
    x = randn(shape, seed=1, offset=3.0, scale=2.0)
    if layout == "channels_last":
        x = _channels_last(x)
    w, b = _affine(shape[1])
    y = layer_norm_2d(x, w, b, 1e-6)
    torch.testing.assert_close(y, _ln2d_via_permute(x, w, b, 1e-6), **tolerance(torch.float32))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt), "the output keeps the input's memory format"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layer_norm_2d_gradients(layout):
    shape = (3, 6, 5, 7)
    x = randn(shape, torch.float64, seed=2, requires_grad=True)
    if layout == "channels_last":
        x = _channels_last(x)
    w, b = (t.requires_grad_(True) for t in _affine(6, torch.float64))
    m = normkit.nn.LayerNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    dy = randn(shape, torch.float64, seed=3)
    got = torch.autograd.grad((m(x) * dy).sum(), (x, m.weight, m.bias))
    want = torch.autograd.grad((_ln2d_via_permute(x, w, b, 1e-6) * dy).sum(), (x, w, b))
    for g, e, what in zip(got, want, ("input", "weight", "bias")):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=what)


def test_layer_norm_2d_gradcheck():
    x = randn((2, 3, 2, 3), torch.float64, seed=4, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in _affine(3, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: layer_norm_2d(*a, eps=1e-6), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: layer_norm_2d(*a, eps=1e-6), (_channels_last(x), w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_layer_norm_2d_low_precision_within_torchs_own_error(dtype, layout):
    x64 = randn((2, 40, 3, 5), torch.float64, seed=5, offset=2.0)
    w64, b64 = _affine(40, torch.float64)
    truth = _ln2d_via_permute(x64, w64, b64, 1e-6)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    if layout == "channels_last":
        x = _channels_last(x)
    got = layer_norm_2d(x, w, b, 1e-6)
    assert got.dtype == dtype
    assert_close_to_truth(got, truth, _ln2d_via_permute(x, w, b, 1e-6), what=f"{dtype} {layout}")


def test_layer_norm_2d_module_options_and_state_dict():
    m = normkit.nn.LayerNorm2d(5)
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]
    assert torch.equal(m.weight, torch.ones(5)) and torch.equal(m.bias, torch.zeros(5))
    assert repr(m) == "LayerNorm2d(5, eps=1e-06, elementwise_affine=True)"
    assert not isinstance(m, torch.nn.LayerNorm), "must not pass for a last-dim LayerNorm"
    no_bias = normkit.nn.LayerNorm2d(5, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    plain = normkit.nn.LayerNorm2d(5, eps=1e-3, elementwise_affine=False)
    assert list(plain.parameters()) == []
    x = randn((2, 5, 3, 4), seed=6)
    torch.testing.assert_close(plain(x), _ln2d_via_permute(x, None, None, 1e-3), **tolerance(torch.float32))
    # a timm-style LayerNorm2d state_dict (an nn.LayerNorm over C) loads as is
    timm_like = torch.nn.LayerNorm(5)
    timm_like.weight.data, timm_like.bias.data = _affine(5)
    m.load_state_dict(timm_like.state_dict())
    torch.testing.assert_close(m(x), _ln2d_via_permute(x, timm_like.weight, timm_like.bias, 1e-6))
    assert normkit.nn.LayerNorm2d(4, dtype=torch.float64).weight.dtype == torch.float64


# --- LayerNormCHW == GroupNorm(1, C)


@pytest.mark.parametrize("shape", SHAPES + [(4, 3, 11), (5, 7)])
def test_layer_norm_chw_matches_group_norm_1(shape):
    ours = normkit.nn.LayerNormCHW(shape[1])
    gn = torch.nn.GroupNorm(1, shape[1])
    with torch.no_grad():
        gn.weight.copy_(_affine(shape[1])[0])
        gn.bias.copy_(_affine(shape[1])[1])
    ours.load_state_dict(gn.state_dict())
    x = randn(shape, seed=7, offset=-2.0, scale=3.0, requires_grad=True)
    dy = randn(shape, seed=8)
    y_ours, y_gn = ours(x), gn(x)
    torch.testing.assert_close(y_ours, y_gn, **tolerance(torch.float32))
    got = torch.autograd.grad((y_ours * dy).sum(), (x, ours.weight, ours.bias))
    want = torch.autograd.grad((y_gn * dy).sum(), (x, gn.weight, gn.bias))
    for g, e, what in zip(got, want, ("input", "weight", "bias")):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=what)


def test_layer_norm_chw_channels_last_and_float64_gradients():
    shape = (3, 4, 5, 6)
    x = _channels_last(randn(shape, torch.float64, seed=9, requires_grad=True))
    w, b = (t.requires_grad_(True) for t in _affine(4, torch.float64))
    y = layer_norm_chw(x, w, b)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = randn(shape, torch.float64, seed=10)
    got = torch.autograd.grad((y * dy).sum(), (x, w, b))
    want = torch.autograd.grad((F.group_norm(x, 1, w, b, 1e-5) * dy).sum(), (x, w, b))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_layer_norm_chw_is_a_group_norm():
    m = normkit.nn.LayerNormCHW(6, eps=1e-4, affine=False)
    assert isinstance(m, torch.nn.GroupNorm) and m.num_groups == 1 and m.weight is None
    assert m.extra_repr() == torch.nn.GroupNorm(1, 6, eps=1e-4, affine=False).extra_repr()
    x = randn((2, 6, 3, 3), seed=11)
    torch.testing.assert_close(m(x), F.group_norm(x, 1, eps=1e-4), **tolerance(torch.float32))


# --- errors name the argument and say expected vs. got


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: layer_norm_2d(randn((2, 3, 4))), ValueError, r"4-D \(N, C, H, W\).*\[2, 3, 4\] \(3-D\)"),
        (lambda: normkit.nn.LayerNorm2d(3)(randn((2, 3, 4, 5, 6))), ValueError, r"4-D.*5-D"),
        (lambda: normkit.nn.LayerNorm2d(4)(randn((2, 3, 4, 5))), ValueError, r"weight of shape \[C\] = \[3\].*got weight of shape \[4\]"),
        (lambda: layer_norm_2d(randn((2, 3, 4, 5)), None, torch.ones(2)), ValueError, r"bias of shape \[C\] = \[3\]"),
        (lambda: layer_norm_2d(randn((2, 3, 4, 5)).long()), TypeError, r"floating dtype.*torch.int64"),
        (lambda: layer_norm_2d(randn((2, 3, 4, 5)).numpy()), TypeError, r"input must be a torch.Tensor.*ndarray"),
        (lambda: layer_norm_2d(randn((2, 3, 4, 5)), eps="0.1"), TypeError, r"eps must be a real number"),
        (lambda: layer_norm_chw(randn((7,))), ValueError, r"\(N, C, \*\).*\[7\] \(1-D\)"),
        (lambda: normkit.nn.LayerNormCHW(5)(randn((2, 3, 4, 4))), ValueError, r"weight of shape \[C\] = \[3\].*\[5\]"),
        (lambda: normkit.nn.LayerNorm2d(0), ValueError, r"num_channels must be positive, got 0"),
        (lambda: normkit.nn.LayerNormCHW(2.5), TypeError, r"num_channels must be an int, got 2.5"),
    ],
)
def test_bad_input_gets_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
