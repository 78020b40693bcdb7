"""The lab's newer experiments and baselines: invariance (the paper's Table 1), sensitivity,
convnet, the online shifts and the frozen standardizer, the transformer's learning-rate sweep."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import normkit
from normkit.lab import config, data, models
from normkit.lab.experiments import (
    _common,
    convnet,
    invariance,
    online,
    sensitivity,
    transformer,
)
from normkit.lab.stats import SUPPORTS
from normkit.lab.verdict import Stat
from normkit.lab.tracker import SilentTracker


# -- invariance: the measured table is the paper's -----------------------------------------
def test_invariance_matches_the_papers_table_one():
    cfg = config.preset("invariance", "quick")
    result = invariance.run(cfg, [0, 1], SilentTracker())
    differ = [k for k, c in result["cells"].items() if c["invariant"] != c["expected"]]
    assert not differ, differ
    assert result["matches"] == result["cells_total"] == len(cfg.norms) * len(invariance.TRANSFORMS)
    for c in result["cells"].values():  # invariant cells at rounding, the others of order one
        assert c["max_change"] < 1e-13 if c["invariant"] else c["max_change"] > 1e-2
    assert all(f.verdict == SUPPORTS for f in invariance.findings(result))


def test_invariance_eps_breaks_exact_scale_invariance():
    """With a large eps the same measurement sees layer norm move under re-scaling: what
    the table measures is the normalization, not an artefact of the set-up."""
    cfg = replace(config.preset("invariance", "quick"), eps=1.0, norms=("layer",))
    result = invariance.run(cfg, [0], SilentTracker())
    assert not result["cells"]["layer|dataset re-scaling"]["invariant"]


def test_invariance_transforms_do_what_they_say():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ts = invariance.transforms(g, 6, 4)
    w2, _ = ts["weight matrix re-centering"](w, x)
    moved = x @ w2.T - x @ w.T  # every unit's summed input moves by the same amount per case
    assert torch.allclose(moved, moved[:, :1].expand_as(moved)) and not torch.allclose(moved, torch.zeros_like(moved))
    _, x2 = ts["single case re-scaling"](w, x)
    assert torch.equal(x2[1:], x[1:]) and not torch.equal(x2[0], x[0])
    with pytest.raises(ValueError, match="norm kind must be one of .*got 'group'"):
        invariance.normalize("group", w, x, 0.0)


# -- sensitivity ----------------------------------------------------------------------------
def test_sensitivity_settings_and_build():
    cfg = config.preset("sensitivity", "quick")
    todo = sensitivity.settings(cfg)
    names = {(n, s) for n, s, _ in todo}
    assert ("none", "default") in names and ("layer", "bias -1") in names and ("rms", "bias -1") not in names  # RMSNorm has no bias
    assert ("none", "gain 10") not in names and ("none", "lr 0.01") in names
    model = sensitivity.build(cfg, "layer", gain=10.0, bias=-1.0, eps=0.1)
    norms = [m for m in model.modules() if isinstance(m, normkit.nn.LayerNorm)]
    assert len(norms) == cfg.depth and all(m.eps == 0.1 and torch.all(m.weight == 10) and torch.all(m.bias == -1) for m in norms)
    torch.manual_seed(0)
    a = sensitivity.build(cfg, "layer")
    torch.manual_seed(0)
    b = sensitivity.build(cfg, "none")  # the same Linear weights: the comparisons are paired
    assert torch.equal(a.net[0].weight, b.net[0].weight) and torch.equal(a.net[-1].weight, b.net[-1].weight)


def test_bad_gain_initialization_changes_what_the_norm_outputs():
    x = torch.randn(4, 64)
    big = sensitivity.build(config.preset("sensitivity", "quick"), "layer", gain=10.0)
    norm = next(m for m in big.modules() if isinstance(m, normkit.nn.LayerNorm))
    assert norm(torch.randn(5, norm.normalized_shape[0])).std().item() == pytest.approx(10.0, rel=0.2)
    assert big(x).shape == (4, 10)


# -- convnet --------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", convnet.CONV_NORMS)
def test_convnet_every_norm_runs_any_batch(norm):
    torch.manual_seed(0)
    model = convnet.ConvNet(norm, (4, 8), groups=2)
    for bs in (1, 3):  # BatchNorm2d trains on one image too: its statistics are over the pixels as well
        assert model(torch.rand(bs, 1, 8, 8)).shape == (bs, 10)
    with pytest.raises(ValueError, match="conv norm kind must be one of .*got 'instance'"):
        convnet.make_channel_norm("instance", 4, 2)


def test_convnet_layer_norms_normalize_what_they_claim():
    x = torch.randn(2, 8, 4, 4) * 3 + 1
    per_pixel = convnet.make_channel_norm("layer2d", 8, 4)(x)
    per_sample = convnet.make_channel_norm("layer_chw", 8, 4)(x)
    assert per_pixel.mean(1).abs().max() < 1e-5 and per_sample.mean((1, 2, 3)).abs().max() < 1e-5
    assert per_sample.mean(1).abs().max() > 1e-2  # over (C,H,W), not per pixel


# -- online: shifts and the frozen standardizer ---------------------------------------------
def test_shift_inputs():
    x = torch.rand(10, 64)
    assert torch.allclose(data.shift_inputs(x, "affine", 0, 3.0, 2.0), 3 * x + 2)
    fa = data.shift_inputs(x, "feature_affine", 0)
    ratio = (fa[1] - fa[0]) / (x[1] - x[0])
    assert ratio.std() > 0.1 and torch.allclose(data.shift_inputs(x, "feature_affine", 0), fa)  # per-feature gains, seeded
    perm = data.shift_inputs(x, "permutation", 0)
    assert torch.equal(perm.sort(1).values, x.sort(1).values) and not torch.equal(perm, x)
    rot = data.shift_inputs(x, "rotation", 1)
    assert torch.allclose(rot.norm(dim=1), x.norm(dim=1), atol=1e-5) and not torch.allclose(rot, x)
    ln = torch.nn.functional.layer_norm
    assert torch.allclose(ln(data.shift_inputs(x, "affine", 0), (64,)), ln(x, (64,)), atol=1e-3)  # LN cancels affine ...
    assert not torch.allclose(ln(fa, (64,)), ln(x, (64,)), atol=1e-1)  # ... not per-feature
    with pytest.raises(ValueError, match="shift kind must be one of .*got 'flip'"):
        data.shift_inputs(x, "flip", 0)


def test_frozen_standardizer_does_not_divide_by_a_constant_pixels_zero_variance():
    cfg = config.preset("online", "quick")
    x = torch.rand(50, 64)
    x[:, 0] = 0.0  # a pixel that is always 0 before the shift
    bn = online._input_norm("batch_frozen", x, cfg)
    shifted = bn(x[:2] + 2.0)
    assert not bn.training and shifted[:, 0].abs().max() < 3.0  # scale 1 for the constant pixel, not 1/sqrt(eps)
    assert torch.allclose(bn(x).mean(0)[1:], torch.zeros(63), atol=1e-4)


def test_online_shifts_continue_from_the_same_first_half():
    cfg = replace(config.preset("online", "smoke"), shifts=("affine", "rotation"))
    r = online.stream_one(cfg, "layer", seed=1)
    assert set(cfg.shifts) | {"control"} <= set(r) and len(r["affine"]["curve"]) == len(r["rotation"]["curve"])
    head = len([i for i in r["curve_at"] if i <= r["shift"]])
    assert r["affine"]["curve"][:head] == r["rotation"]["curve"][:head] == r["control"]["curve"][:head]  # identical until the shift


def test_online_results_do_not_depend_on_the_order_of_the_shifts():
    """Each continuation starts from a deep copy of the optimizer's state: a shift's numbers are
    the same whether it runs first or last (they were not while Adam's moments were shared)."""
    cfg = replace(config.preset("online", "smoke"), length=120, window=30)
    forward = online.stream_one(replace(cfg, shifts=("affine", "feature_affine", "rotation")), "none", seed=3)
    backward = online.stream_one(replace(cfg, shifts=("rotation", "feature_affine", "affine")), "none", seed=3)
    for kind in ("control", "affine", "feature_affine", "rotation"):
        assert forward[kind] == backward[kind], kind


def test_online_continuations_do_not_share_optimizer_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    before = [t.clone() for st in opt.state.values() for t in st.values()]
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1])
    online._continue(model, opt, 1e-2, x, y, lambda n=1: None)
    assert all(torch.equal(a, t) for a, t in zip(before, (t for st in opt.state.values() for t in st.values())))


def test_online_loss_from_the_shift_is_against_the_no_shift_control():
    cfg = replace(config.preset("online", "smoke"), shifts=("affine",))
    r = online.stream_one(cfg, "layer", seed=4)
    assert r["affine"]["drop"] == pytest.approx(r["control"]["after"] - r["affine"]["after"])


def test_tuning_uses_its_own_seeds_and_picks_the_best_rate():
    seen = []

    def score(arm, lr, seed, tick):
        seen.append(seed)
        return {"a": -abs(lr - 0.01), "b": None if lr > 0.005 else lr}[arm]

    out = _common.tune("x", ["a", "b"], [1e-3, 1e-2, 1e-1], 2, 1, SilentTracker(), score, label=str)
    assert out["a"]["lr"] == 1e-2 and out["b"]["lr"] == 1e-3  # a failed run makes a rate ineligible
    assert set(seen) == {1000, 1001} and not set(seen) & set(range(100))


def test_relu_networks_are_he_initialized():
    torch.manual_seed(0)
    net = models.MLP(256, 512, 3, 10, "none")
    hidden = [m for m in net.net if isinstance(m, torch.nn.Linear)][:-1]
    for m in hidden[1:]:
        assert m.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05) and m.bias.abs().max() == 0
    conv = convnet.ConvNet("none", (8, 16), 4).features[3]
    assert conv.weight.std().item() == pytest.approx((2 / (8 * 9)) ** 0.5, rel=0.15)


# -- transformer: instability measured, the rate chosen on tuning seeds ----------------------
def test_transformer_run_records_instability():
    cfg = config.preset("transformer", "smoke")
    ok = transformer.train_one(cfg, "pre_ln", 0, 1e-3, seed=0)
    assert not ok["nonfinite"] and ok["final_loss"] is not None and ok["peak_loss"] is not None
    assert ok["rise"] >= 0 and ok["spiked"] == (ok["rise"] > cfg.spike)


def test_transformer_sweep_summary_and_findings():
    def arm(mode, warmup, lr, losses, nonfinite=0):
        runs = [{"final_loss": v, "peak_loss": 4.0 if v else None, "nonfinite": v is None, "spiked": v is None} for v in losses]
        return {"mode": mode, "warmup": warmup, "lr": lr, "seeds": len(losses), "nonfinite": nonfinite, "spiked": nonfinite,
                "final_loss": Stat.of(losses).to_dict(), "peak_loss": Stat.of([r["peak_loss"] for r in runs]).to_dict(), "runs": runs}

    lrs, grid = [1e-3, 1e-2], {}
    for w in (0, 10):
        grid[transformer._key("pre_ln", w, 1e-3)] = arm("pre_ln", w, 1e-3, [2.7, 2.72])
        grid[transformer._key("pre_ln", w, 1e-2)] = arm("pre_ln", w, 1e-2, [2.6, 2.61])
        grid[transformer._key("none", w, 1e-3)] = arm("none", w, 1e-3, [2.7, 2.71])
        grid[transformer._key("none", w, 1e-2)] = arm("none", w, 1e-2, [None, None], nonfinite=2)
    assert transformer._sweep_summary(grid, "pre_ln", 0, lrs) == {"best_lr": 1e-2, "largest_finite_lr": 1e-2}
    assert transformer._sweep_summary(grid, "none", 0, lrs) == {"best_lr": 1e-3, "largest_finite_lr": 1e-3}
    good, same = [2.60, 2.61, 2.62, 2.63, 2.59, 2.60], [2.61, 2.60, 2.63, 2.62, 2.60, 2.60]
    arms = {"pre_ln@warmup0": arm("pre_ln", 0, 1e-2, good), "post_ln@warmup10": arm("post_ln", 10, 1e-3, same),
            "post_ln@warmup0": arm("post_ln", 0, 1e-3, [2.9] * 6), "pre_ln@warmup10": arm("pre_ln", 10, 1e-2, good),
            "none@warmup0": arm("none", 0, 1e-3, [2.8] * 6), "none@warmup10": arm("none", 10, 1e-3, [2.8] * 6)}
    result = {"arms": arms, "grid": grid, "warmups": [0, 10], "lrs": lrs, "modes": ["post_ln", "pre_ln", "none"], "unstable_runs": 0,
              "scale": {"layers": 2, "d": 32, "steps": 64, "seq_len": 32, "batch": 16}}
    found = {f.key or f.claim: f for f in transformer.findings(result)}
    on_par = found["transformer.preln"]
    assert on_par.verdict == SUPPORTS and on_par.data["kind"] == "equivalence" and on_par.data["margin"] == 0.05
    assert "not testable at this scale" in found["Without warm-up post-LN's training loss rises further above its best than pre-LN's"].sentence
    header, rows = transformer.table({**result, "grid": {**grid, **{transformer._key("post_ln", w, lr): arm("post_ln", w, lr, [2.7, 2.7])
                                                                  for w in (0, 10) for lr in lrs}}})
    assert "tuned lr" in header and len(rows) == 6
    with pytest.raises(ValueError, match="preset must be one of smoke, quick, full, got 'huge'"):
        config.preset("mlp", "huge")


