"""normkit.tools.monitor: per-layer statistics, health warnings, export, hook removal."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import normkit
from normkit.tools import NormHealthWarning, monitor

from helpers import randn


class Residual(torch.nn.Module):
    """x + fc(ln(x)): the norm's input is also the residual stream."""

    def __init__(self, d: int = 11):
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)
        self.rms = normkit.nn.RMSNorm(d)

    def forward(self, x):
        return self.rms(x + self.fc(self.ln(x)))


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = Residual()
    with torch.no_grad():
        model.ln.weight.normal_(1.0, 0.3)
        model.ln.bias.normal_(0.0, 0.3)
        model.rms.weight.normal_(1.0, 0.3)
    return model


def _pop(std_mean):
    std, mean = std_mean
    return mean.item(), std.item()


def test_statistics_match_a_direct_computation():
    model = _model()
    x = randn((3, 5, 11), seed=1, offset=0.5, scale=2.0, requires_grad=True)
    c = randn((3, 5, 11), seed=2)
    with monitor(model) as mon:
        (model(x) * c).sum().backward()
        rows = {r["layer"]: r for r in mon.records()}
    assert set(rows) == {"ln", "rms"} and all(r["step"] == 0 and r["calls"] == 1 for r in rows.values())
    ln, xd = rows["ln"], x.detach()
    in_mean, in_std = _pop(torch.std_mean(xd, correction=0))
    assert math.isclose(ln["in_mean"], in_mean, rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(ln["in_std"], in_std, rel_tol=1e-5)
    assert math.isclose(ln["out_std"], model.ln(xd).std(correction=0).item(), rel_tol=1e-5)
    w_mean, w_std = _pop(torch.std_mean(model.ln.weight.detach(), correction=0))
    assert math.isclose(ln["weight_mean"], w_mean, rel_tol=1e-6) and math.isclose(ln["weight_std"], w_std, rel_tol=1e-5)
    assert rows["rms"]["bias_mean"] is None and rows["rms"]["bias_std"] is None
    # gradient norms: the parameters' own, and only the norm's share of dL/dx (not the residual path)
    assert math.isclose(ln["weight_grad_norm"], model.ln.weight.grad.norm().item(), rel_tol=1e-5)
    assert math.isclose(ln["bias_grad_norm"], model.ln.bias.grad.norm().item(), rel_tol=1e-5)
    x2 = xd.clone().requires_grad_(True)
    h = model.fc(model.ln(x2))
    s = (xd + h).detach().requires_grad_(True)
    (dh,) = torch.autograd.grad((model.rms(s) * c).sum(), s)
    (share,) = torch.autograd.grad(h, x2, dh)
    assert math.isclose(ln["grad_in_norm"], share.norm().item(), rel_tol=1e-4)
    total = x.grad.norm().item()  # includes the residual path: must differ from the norm's share
    assert abs(ln["grad_in_norm"] - total) > 1e-2 * total


def test_steps_every_and_automatic_stepping():
    model = _model()
    x = randn((4, 11), seed=3)
    with monitor(model, every=2) as mon:
        for _ in range(5):
            model(x)  # no step() calls: each forward of the model is a step
        assert mon.current_step == 4
    assert sorted({r["step"] for r in mon.records()}) == [0, 2, 4]
    with pytest.raises(RuntimeError, match="step_on='forward'"), monitor(model, step_on="forward") as fwd:
        fwd.step()
    with monitor(model, step_on="manual") as manual:
        for _ in range(3):
            model(x)
            model(x)  # two calls in one step: averaged, counted
            manual.step()
    rows = manual.records()
    assert [r["step"] for r in rows if r["layer"] == "ln"] == [0, 1, 2]
    assert all(r["calls"] == 2 for r in rows)


def test_hooks_are_removed_on_exit():
    model = _model()
    n_hooks = (len(model.ln._forward_hooks), len(model.ln._forward_pre_hooks), len(model._forward_pre_hooks))
    with monitor(model) as mon:
        assert len(model.ln._forward_hooks) == n_hooks[0] + 1
        model(randn((2, 11), seed=4))
    assert (len(model.ln._forward_hooks), len(model.ln._forward_pre_hooks), len(model._forward_pre_hooks)) == n_hooks
    n = len(mon.records())
    x = randn((2, 11), seed=5, requires_grad=True)
    model(x).sum().backward()  # no parameter-gradient hook fires any more
    assert len(mon.records()) == n == 2


def test_health_warnings_once_per_layer_and_kind():
    model = _model()
    with pytest.warns(NormHealthWarning) as caught, monitor(model) as mon:
        model(torch.full((2, 11), 3.0))  # constant rows: input std 0 -> collapse
        model(torch.full((2, 11), 3.0))  # same again: no second warning
        model(randn((2, 11), seed=6, scale=1e6))  # explosion
        bad = randn((2, 11), seed=7)
        bad[1, 3] = float("nan")
        model(bad)  # non-finite
    texts = [str(w.message) for w in caught if issubclass(w.category, NormHealthWarning)]
    assert sum("ln (LayerNorm)" in t and "no longer normalizes" in t for t in texts) == 1
    assert any("ln (LayerNorm) at step 2" in t and "explode_std" in t for t in texts)
    assert any("at step 3" in t and "nan" in t for t in texts)
    kinds = {(e["step"], e["layer"], e["kind"]) for e in mon.events}
    assert {(0, "ln", "collapse"), (1, "ln", "collapse"), (2, "ln", "explosion"), (3, "ln", "nonfinite")} <= kinds


def test_no_warning_for_a_healthy_model():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormHealthWarning)
        with monitor(model) as mon:
            model(randn((3, 11), seed=8)).sum().backward()
    assert mon.events == []


def test_to_dataframe_to_json_and_plot(tmp_path):
    model = _model()
    with monitor(model) as mon:
        for i in range(3):
            model(randn((3, 11), seed=10 + i, requires_grad=True)).sum().backward()
            mon.step()
    df = mon.to_dataframe()
    assert list(df.columns[:4]) == ["step", "layer", "type", "calls"] and len(df) == 6
    assert df["in_std"].notna().all() and (df.loc[df.layer == "ln", "grad_in_norm"] > 0).all()
    doc = json.loads(mon.to_json(tmp_path / "stats.json"))
    assert doc["every"] == 1 and len(doc["records"]) == 6 and doc["records"][0]["type"] == "LayerNorm"
    assert json.loads((tmp_path / "stats.json").read_text()) == doc
    png = mon.plot(tmp_path / "stats.png", stats=("in_std", "grad_in_norm"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_selection_and_other_norm_types():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.GroupNorm(2, 4), normkit.nn.LayerNorm2d(4))
    with monitor(model) as mon:
        model(randn((2, 3, 6, 6), seed=20))
    assert [r["type"] for r in mon.records()] == ["BatchNorm2d", "GroupNorm", "LayerNorm2d"]
    with monitor(model, layers=["2"]) as one:
        model(randn((2, 3, 6, 6), seed=21))
    assert [r["layer"] for r in one.records()] == ["2"]
    with monitor(model, layers=lambda name, m: isinstance(m, torch.nn.BatchNorm2d)) as fn:
        model(randn((2, 3, 6, 6), seed=22))
    assert [r["layer"] for r in fn.records()] == ["1"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(every=0), ValueError, r"every must be a positive int .*got 0"),
        (dict(layers=["fc"]), ValueError, r"layers names \['fc'\] are not normalization layers.*\['ln', 'rms'\]"),
        (dict(layers="ln"), TypeError, r"not one string"),
        (dict(explode_std=-1.0), ValueError, r"explode_std must be a positive number, got -1.0"),
        (dict(collapse_std=0), ValueError, r"collapse_std must be a positive number or None"),
        (dict(step_on="epoch"), ValueError, r"step_on must be 'auto', 'forward' or 'manual', got 'epoch'"),
    ],
)
def test_bad_arguments_get_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        monitor(_model(), **kwargs)


def test_bad_plot_stat_and_bad_model():
    with monitor(_model()) as mon:
        pass
    with pytest.raises(ValueError, match=r"stats must be a non-empty sequence of .*got \['loss'\]"):
        mon.plot("unused.png", stats=("loss",))
    with pytest.raises(TypeError, match=r"torch.nn.Module as model, got list"):
        monitor([torch.nn.LayerNorm(3)])


def test_compiled_fullgraph_model_runs_and_the_monitor_says_it_recorded_nothing():
    """Under torch.compile(fullgraph=True) the hooks (with their per-step host bookkeeping) used
    to break the graph: an error. Now they do nothing there, and the monitor warns on reading."""
    from normkit.tools.monitor import MonitorCompileWarning

    model = _model(seed=4)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = randn((6, 11), seed=5)
    with monitor(model, step_on="manual") as mon:
        for _ in range(3):
            out = compiled(x)
            out.square().sum().backward()
        torch.testing.assert_close(out, model(x))  # an eager call is still recorded
        with pytest.warns(MonitorCompileWarning, match=r"ran under torch.compile.*nothing was recorded for compiled calls"):
            rows = mon.records()
        assert [r["calls"] for r in rows] == [1, 1] and all(r["step"] == 0 for r in rows)
        assert all(r["weight_grad_norm"] is None for r in rows), "no gradient of a compiled step is attributed"
        mon.step()
        compiled(x).sum().backward()
        model(x).sum().backward()  # an eager step after compiled ones records its gradients again
        rows = [r for r in mon.records() if r["step"] == 1]
    assert len(rows) == 2 and all(r["weight_grad_norm"] is not None for r in rows), rows
