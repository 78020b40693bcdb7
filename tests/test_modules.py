"""normkit.nn.LayerNorm / RMSNorm are drop-in replacements for the torch.nn modules."""

from __future__ import annotations

import pytest
import torch

import normkit

from helpers import randn

CONFIGS = [
    ("LayerNorm", dict(normalized_shape=10)),
    ("LayerNorm", dict(normalized_shape=(3, 4), eps=1e-3, bias=False)),
    ("LayerNorm", dict(normalized_shape=[6], elementwise_affine=False)),
    ("RMSNorm", dict(normalized_shape=10)),
    ("RMSNorm", dict(normalized_shape=(3, 4), eps=1e-6)),
    ("RMSNorm", dict(normalized_shape=6, elementwise_affine=False)),
]


def _pair(cls, kwargs):
    return getattr(normkit.nn, cls)(**kwargs), getattr(torch.nn, cls)(**kwargs)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_same_parameters_repr_and_state_dict(cls, kwargs):
    ours, theirs = _pair(cls, kwargs)
    assert isinstance(ours, getattr(torch.nn, cls))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize("cls, kwargs", CONFIGS)
def test_state_dict_loads_both_ways_and_outputs_agree(cls, kwargs):
    ours, theirs = _pair(cls, kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(randn(p.shape, seed=p.numel()))
    ours.load_state_dict(theirs.state_dict())
    shape = (5,) + tuple(torch.Size(ours.normalized_shape))
    x = randn(shape, seed=1)
    torch.testing.assert_close(ours(x), theirs(x))
    back = getattr(torch.nn, cls)(**kwargs)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), theirs(x))


def test_factory_kwargs():
    m = normkit.nn.LayerNorm(8, dtype=torch.float64, device="cpu")
    assert m.weight.dtype == torch.float64 and m.bias.dtype == torch.float64
    assert normkit.nn.RMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


def test_forward_exposes_fused_residual_and_prenorm():
    ln = normkit.nn.LayerNorm(16)
    x, h = randn((4, 16), seed=2), randn((4, 16), seed=3)
    y, s = ln(x, h, prenorm=True)
    torch.testing.assert_close(s, x + h)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + h, (16,), ln.weight, ln.bias))
    torch.testing.assert_close(ln(x, residual=h), y)


def test_dropout_only_in_training_mode():
    rms = normkit.nn.RMSNorm(32)
    x, h = randn((4, 32), seed=4), randn((4, 32), seed=5)
    rms.eval()
    torch.testing.assert_close(rms(x, h, dropout_p=0.5), rms(x, h))
    rms.train()
    assert not torch.allclose(rms(x, h, dropout_p=0.5), rms(x, h))


def test_trains_in_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), normkit.nn.LayerNorm(32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = randn((64, 8), seed=6)
    target = x[:, :1] * 2 - x[:, 1:2]
    first = None
    for _ in range(100):
        loss = torch.nn.functional.mse_loss(model(x), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
