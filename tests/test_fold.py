"""normkit.tools.fold: norm affine folded into the following Linear, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.tools import fold
from normkit.tools.fold import FoldWarning

from helpers import randn


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("weight") and p.dim() == 1 else 0.0) + 0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model.eval()


class FakeLlamaRMSNorm(torch.nn.Module):
    """Duck-types as a Hugging Face RMS norm (its forward always multiplies by self.weight)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequential_pairs_are_found_and_outputs_unchanged(dtype):
    model = torch.nn.Sequential(
        torch.nn.Linear(13, 31), normkit.nn.LayerNorm(31), torch.nn.Linear(31, 17), torch.nn.GELU(),
        torch.nn.RMSNorm(17, eps=1e-6), torch.nn.Linear(17, 5, bias=False), torch.nn.LayerNorm(5), torch.nn.Tanh(),
    ).to(dtype)
    _randomize(model, seed=1)
    x = randn((7, 13), dtype, seed=2)
    with torch.no_grad():
        want = model(x)
        records = fold(model)
        got = model(x)
    assert [(r.norm, r.linears, r.had_bias) for r in records] == [("1", ("2",), True), ("4", ("5",), False)]
    assert model[1].weight is None and model[1].bias is None and not model[1].elementwise_affine
    assert model[4].weight is None and model[6].weight is not None, "a norm not followed by a Linear is left alone"
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got, want, **tol)
    assert fold(model) == [], "folding twice does nothing"


def test_layer_norm_bias_into_a_linear_without_bias_creates_one():
    model = _randomize(torch.nn.Sequential(torch.nn.LayerNorm(9), torch.nn.Linear(9, 4, bias=False)), seed=3)
    x = randn((5, 9), seed=4)
    want = model(x)
    fold(model)
    assert model[1].bias is not None and model[1].bias.shape == (4,)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


class Attention(torch.nn.Module):
    """One norm feeding three Linears (q, k, v): foldable only with explicit pairs."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.norm = FakeLlamaRMSNorm(d)
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 3.0, dim=-1)
        return a @ self.v(h)


def test_explicit_pairs_one_norm_into_several_linears():
    model = _randomize(Attention(), seed=5)
    x = randn((2, 6, 12), seed=6)
    want = model(x)
    assert fold(model) == [], "no Sequential: nothing is folded without pairs"
    records = fold(model, [("norm", "q"), ("norm", "k"), ("norm", "v")])
    assert [(r.norm, r.linears) for r in records] == [("norm", ("q", "k", "v"))]
    assert torch.equal(model.norm.weight, torch.ones(12)), "an HF-style norm keeps a gain of ones"
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_fold_a_stack_of_pre_norm_blocks():
    """The shape fold is for: norm -> Linear -> activation, repeated."""
    torch.manual_seed(7)
    blocks = []
    for _ in range(3):
        blocks += [normkit.nn.LayerNorm(64), torch.nn.Linear(64, 64), torch.nn.GELU()]
    model = _randomize(torch.nn.Sequential(*blocks), seed=8)
    x = randn((16, 64), seed=9)
    want = model(x)
    assert len(fold(model)) == 3
    torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "pairs, exc, match",
    [
        ([("missing", "1")], ValueError, r"pairs names a norm 'missing' that is not a submodule"),
        ([("0", "2")], TypeError, r"'2' must be an nn.Linear, got ReLU"),
        ([("1", "3")], TypeError, r"'1' must be a LayerNorm/RMSNorm.*got Linear"),
        ([("0", "3")], ValueError, r"'3' has in_features=4, expected the width 6 of '0'"),
        ([("4", "5")], ValueError, r"'4' normalizes over \[2, 3\]; only a norm over the last dim"),
        ("0,1", TypeError, r"iterable of \(norm_name, linear_name\) pairs"),
        ([("0",)], TypeError, r"must contain \(norm_name, linear_name\) pairs"),
    ],
)
def test_bad_pairs_get_a_clear_error(pairs, exc, match):
    model = torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6), torch.nn.LayerNorm((2, 3)), torch.nn.Linear(3, 3))
    with pytest.raises(exc, match=match):
        fold(model, pairs)


# --- never a silent change: folds that would change the outputs are refused -----------------------

class TwoNormsOneLinear(torch.nn.Module):
    """One Linear reads two different norms: no single weight can absorb both gains."""

    def __init__(self, d: int = 10):
        super().__init__()
        self.n1, self.n2, self.lin = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.lin(self.n1(x)) + self.lin(self.n2(x))


class SequentialAsContainer(torch.nn.Module):
    """An nn.Sequential used as a list: its norm's output also feeds the residual add."""

    def __init__(self, d: int = 10):
        super().__init__()
        self.seq = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, d))

    def forward(self, x):
        h = self.seq[0](x)
        return h + self.seq[1](h)


class Untraceable(SequentialAsContainer):
    """The same, behind data-dependent control flow that torch.fx cannot trace."""

    def forward(self, x):
        if x.sum() > -1e9:
            return super().forward(x)
        return x


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_linear_reading_two_norms_is_never_folded_twice():
    model = _randomize(TwoNormsOneLinear(), seed=11)
    x = randn((4, 10), seed=12)
    want, state = model(x), _snapshot(model)
    with pytest.raises(ValueError, match=r"(?s)nothing was folded.*'lin' is paired with another norm too \('n2'\)"):
        fold(model, [("n1", "lin"), ("n2", "lin")])
    with pytest.raises(ValueError, match=r"n1 -> lin: Linear 'lin' is also called on module 'n2'"):
        fold(model, [("n1", "lin")])  # the graph shows the second reader
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "model left as it was"
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_linear_shared_by_two_sequentials_is_skipped_with_a_warning():
    lin = torch.nn.Linear(10, 10)
    model = _randomize(torch.nn.Sequential(torch.nn.Sequential(torch.nn.LayerNorm(10), lin),
                                           torch.nn.Sequential(torch.nn.LayerNorm(10), lin)), seed=13)
    x = randn((4, 10), seed=14)
    want = model(x)
    with pytest.warns(FoldWarning, match=r"paired with another norm"):
        assert fold(model) == []
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_a_sequential_used_as_a_container_is_not_folded_as_a_chain():
    model = _randomize(SequentialAsContainer(), seed=15)
    x = randn((4, 10), seed=16)
    want = model(x)
    with pytest.warns(FoldWarning, match=r"the output of 'seq.0' also goes to add"):
        assert fold(model) == []
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"seq.0 -> seq.1: the output of 'seq.0' also goes to add"):
        fold(model, [("seq.0", "seq.1")])


def test_untraceable_model_needs_example_inputs_and_they_catch_the_change():
    model = _randomize(Untraceable(), seed=17)
    x = randn((4, 10), seed=18)
    want = model(x)
    with pytest.warns(FoldWarning, match=r"torch.fx cannot trace the model.*pass example_inputs"):
        assert fold(model) == []
    with pytest.raises(ValueError, match=r"cannot trace the model"):
        fold(model, [("seq.0", "seq.1")])
    with pytest.warns(FoldWarning, match=r"on example_inputs, output 0 changed by up to"):
        assert fold(model, example_inputs=x) == []
    with pytest.raises(ValueError, match=r"on example_inputs, output 0 changed"):
        fold(model, [("seq.0", "seq.1")], example_inputs=(x,))
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_untraceable_model_is_folded_when_example_inputs_show_no_change():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))

        def forward(self, x):
            return self.seq(x) if x.sum() > -1e9 else x[..., :3]

    model = _randomize(Gated(), seed=19)
    x = randn((5, 8), seed=20)
    want = model(x)
    assert [r.norm for r in fold(model, example_inputs={"x": x})] == ["seq.0"]
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_tied_weights_are_not_folded():
    model = _randomize(torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)), seed=21)
    model[2].weight = model[1].weight  # a weight tied elsewhere would change there too
    with pytest.warns(FoldWarning, match=r"parameter of '1' is shared with '2'"):
        assert fold(model) == []


def test_a_linear_absorbs_at_most_one_norm_across_calls():
    first = _randomize(torch.nn.Sequential(torch.nn.LayerNorm(6), torch.nn.Linear(6, 6)), seed=22)
    assert len(fold(first)) == 1
    second = _randomize(torch.nn.Sequential(torch.nn.LayerNorm(6)), seed=23).append(first[1])  # the folded Linear reused
    with pytest.raises(ValueError, match=r"Linear '1' already absorbed the affine of '0'"):
        fold(second, [("0", "1")])
