"""The lab's newer experiments and baselines: invariance (the paper's Table 1), sensitivity,
convnet, the online shifts and the frozen standardizer, the transformer's learning-rate sweep."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import normkit
from normkit.lab import config, data
from normkit.lab.experiments import (
    convnet,
    invariance,
    online,
    sensitivity,
    transformer,
)
from normkit.lab.stats import SUPPORTS
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
    assert set(cfg.shifts) <= set(r) and len(r["affine"]["curve"]) == len(r["rotation"]["curve"])
    head = len([i for i in r["curve_at"] if i <= r["shift"]])
    assert r["affine"]["curve"][:head] == r["rotation"]["curve"][:head]  # identical until the shift


# -- transformer: words from the numbers ----------------------------------------------------
def test_transformer_status_words_follow_the_numbers():
    cfg = config.preset("transformer", "smoke")
    ok = transformer.train_one(cfg, "pre_ln", 0, 1e-3, seed=0, threshold=100.0)
    assert ok["status"] == "ok" and not ok["failed"] and ok["final_loss"] is not None
    stalled = transformer.train_one(cfg, "pre_ln", 0, 1e-3, seed=0, threshold=0.1)
    assert stalled["status"] == "stalled" and stalled["final_loss"] is not None and not stalled["nonfinite"]


def test_transformer_sweep_summary_and_findings():
    def arm(mode, warmup, lr, losses, diverged=0, stalled=0):
        runs = [{"final_loss": v, "status": "ok"} for v in losses]
        return {"mode": mode, "warmup": warmup, "lr": lr, "seeds": 5, "diverged": diverged, "stalled": stalled,
                "final_loss": {"mean": sum(v for v in losses if v) / max(1, sum(1 for v in losses if v)), "std": 0.01, "n": 5, "failed": 0},
                "runs": runs}

    lrs, arms = [1e-3, 1e-2], {}
    good, worse = [2.60, 2.61, 2.62, 2.63, 2.59], [2.70, 2.72, 2.71, 2.73, 2.69]
    for w in (0, 10):
        arms[transformer._key("pre_ln", w, 1e-3)] = arm("pre_ln", w, 1e-3, worse)
        arms[transformer._key("pre_ln", w, 1e-2)] = arm("pre_ln", w, 1e-2, good)
        arms[transformer._key("none", w, 1e-3)] = arm("none", w, 1e-3, worse)
        arms[transformer._key("none", w, 1e-2)] = arm("none", w, 1e-2, [None] * 5, diverged=5)
        arms[transformer._key("post_ln", w, 1e-3)] = arm("post_ln", w, 1e-3, worse)
        arms[transformer._key("post_ln", w, 1e-2)] = arm("post_ln", w, 1e-2, [3.5] * 5, stalled=0 if w else 5)
    summary = {f"{m}@warmup{w}": transformer._sweep_summary(arms, m, w, lrs) for m in ("pre_ln", "none", "post_ln") for w in (0, 10)}
    assert summary["pre_ln@warmup0"] == {"largest_stable_lr": 1e-2, "best_lr": 1e-2}
    assert summary["none@warmup0"] == {"largest_stable_lr": 1e-3, "best_lr": 1e-3}
    result = {"arms": arms, "summary": summary, "warmups": [0, 10], "lrs": lrs, "threshold": 3.3, "modes": ["post_ln", "pre_ln", "none"]}
    found = {f.claim: f for f in transformer.findings(result)}
    stable = found["Pre-LN trains without warm-up at a learning rate where post-LN does not"]
    assert stable.verdict == SUPPORTS and "5 stalled" in stable.sentence and "diverged" in stable.sentence
    assert found["Warm-up rescues post-LN at a high learning rate"].verdict == SUPPORTS
    need = found["Transformers need normalization (without warm-up)"]
    assert need.verdict == SUPPORTS and "lr 0.01" in need.sentence and "lr 0.001" in need.sentence
    header, rows = transformer.table(result)
    assert "largest stable lr" in header and len(rows) == 6
