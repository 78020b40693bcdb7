r"""Online learning at batch size 1 on a digits stream whose inputs shift mid-stream.

The model :math:`\mathrm{norm}(x) \to \mathrm{Linear} \to \mathrm{ReLU} \to \mathrm{Linear}`
learns prequentially: each sample is first predicted (scored), then trained on (one Adam step).
At the middle of the stream the inputs change (:func:`normkit.lab.data.shift_inputs`): a global
gain and offset :math:`x \to 3x + 2` (which a per-sample layer norm cancels exactly), per-feature
gains and offsets (which it does not), and a random rotation of the 64 pixels (in ``--full``
also a permutation). The first half is learned once per seed; each shift continues from a copy of
that model and optimizer, so the shifts are compared on the same first half.

Input norms compared:

- ``none``;
- ``batch_frozen``: BatchNorm in eval mode with the first half's input statistics (a model
  standardized offline and then deployed: training-mode BatchNorm cannot run at batch size 1).
  Digits have pixels that are constant (always 0) in the first half; dividing by their
  :math:`\sqrt{0 + \epsilon}` would blow any later change up by :math:`1/\sqrt\epsilon \approx 300`,
  so, as scikit-learn's ``StandardScaler`` does, a feature whose variance is below
  ``var_floor`` gets variance 1;
- ``layer``: normkit LayerNorm over the 64 pixels of each sample;
- ``running``: :class:`normkit.data.RunningNormalizer` with forgetting momentum, updated on
  every sample (unsupervised adaptation to the input distribution).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normkit.lab.config import OnlineConfig
from normkit.lab.data import shift_inputs, shifted_stream
from normkit.lab.experiments._common import (
    LABELS,
    adam,
    band,
    curve_stats,
    pyplot,
    run_arms,
    save,
    seeded,
    stat_dict,
)
from normkit.lab.models import make_norm
from normkit.lab.verdict import Finding, Stat, compare

NAME = "online"
TITLE = "Online learning at batch size 1 under input shifts"
CLAIM = "Layer norm does not depend on the batch, so it works in online learning and under non-stationary input."

SHIFT_LABELS = {"affine": "x → 3x + 2", "feature_affine": "per-feature gain/offset", "permutation": "pixel permutation",
                "rotation": "rotation"}


def _input_norm(arm: str, x_phase1: torch.Tensor, cfg: OnlineConfig) -> nn.Module:
    if arm == "batch_frozen":
        bn = nn.BatchNorm1d(x_phase1.shape[1])
        var = x_phase1.var(0)
        with torch.no_grad():
            bn.running_mean.copy_(x_phase1.mean(0))
            bn.running_var.copy_(torch.where(var < cfg.var_floor, torch.ones_like(var), var))
        return bn.eval()  # stays in eval mode: nothing below calls model.train()
    if arm == "running":
        try:
            from normkit.data import RunningNormalizer
        except ImportError as exc:
            raise ImportError(f"normkit.data.RunningNormalizer is not available ({exc})") from exc
        return RunningNormalizer(x_phase1.shape[1], momentum=cfg.momentum)
    return make_norm(arm, x_phase1.shape[1])


def _learn(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, tick) -> torch.Tensor:
    """Prequential pass over ``x``: predict, score, then one Adam step per sample. Returns 0/1 hits."""
    correct = torch.zeros(x.shape[0])
    for t in range(x.shape[0]):
        logits = model(x[t : t + 1])
        loss = F.cross_entropy(logits, y[t : t + 1])
        correct[t] = float(logits.argmax(-1).item() == y[t].item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()
    return correct


def stream_one(cfg: OnlineConfig, arm: str, seed: int, tick=lambda n=1: None) -> Dict:
    """The first half once, then each shift from a copy; per shift the accuracy just after it
    and at the end, and a smoothed accuracy curve over the whole stream."""
    x, y, shift = shifted_stream(cfg.length, seed, 1.0, 0.0)
    seeded(seed)
    model = nn.Sequential(_input_norm(arm, x[:shift], cfg), nn.Linear(x.shape[1], cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    opt = adam([p for p in model.parameters() if p.requires_grad], cfg.lr)
    first = _learn(model, opt, x[:shift], y[:shift], tick)
    w = cfg.window
    out: Dict = {"before": first[shift - w :].mean().item(), "shift": shift}
    for kind in cfg.shifts:
        m = copy.deepcopy(model)
        o = adam([p for p in m.parameters() if p.requires_grad], cfg.lr)
        o.load_state_dict(opt.state_dict())
        second = _learn(m, o, shift_inputs(x[shift:], kind, seed, cfg.scale, cfg.offset), y[shift:], tick)
        correct = torch.cat([first, second])
        k = max(1, cfg.length // 60)
        out[kind] = {"after": second[:w].mean().item(), "end": second[-w:].mean().item(),
                     "curve": [correct[max(0, i - w) : i].mean().item() for i in range(k, cfg.length + 1, k)]}
        out["curve_at"] = list(range(k, cfg.length + 1, k))
    return out


def run(cfg: OnlineConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.arms) * len(seeds))
    ticks = cfg.length // 2 + len(cfg.shifts) * (cfg.length - cfg.length // 2)
    runs_by_arm, skipped = run_arms(NAME, cfg.arms, seeds, ticks, tracker, lambda arm, seed, tick: stream_one(cfg, arm, seed, tick))
    arms = {}
    for arm, runs in runs_by_arm.items():
        arms[arm] = {"before_acc": stat_dict([r["before"] for r in runs]), "runs": runs}
        for kind in cfg.shifts:
            arms[arm][kind] = {"after_acc": stat_dict([r[kind]["after"] for r in runs]), "end_acc": stat_dict([r[kind]["end"] for r in runs]),
                               "curve": curve_stats([r[kind]["curve"] for r in runs])}
    any_run = next(iter(arms.values()))["runs"][0] if arms else {"curve_at": [], "shift": cfg.length // 2}
    return {"arms": arms, "skipped": skipped, "shifts": list(cfg.shifts), "curve_at": any_run.get("curve_at", []),
            "shift": any_run["shift"], "window": cfg.window}


def _after(result: Dict, arm: str, kind: str) -> List:
    return [r[kind]["after"] for r in result["arms"][arm]["runs"]] if arm in result["arms"] else []


def findings(result: Dict) -> List[Finding]:
    w, out = result["window"], []
    ctx = lambda kind: f"Prequential accuracy over the {w} samples just after the shift {SHIFT_LABELS[kind]}:"  # noqa: E731
    for kind in result["shifts"]:
        out.append(compare(NAME, f"Layer norm keeps working after the input shift {SHIFT_LABELS[kind]}", "accuracy", "LayerNorm",
                           _after(result, "layer", kind), "no norm", _after(result, "none", kind), context=ctx(kind), unit="acc after shift"))
    first = result["shifts"][0]
    out.append(compare(NAME, f"A frozen batch-norm standardizer keeps working after the shift {SHIFT_LABELS[first]}", "accuracy",
                       "BatchNorm (frozen stats)", _after(result, "batch_frozen", first), "no norm", _after(result, "none", first),
                       context=ctx(first), unit="acc after shift"))
    out.append(compare(NAME, f"Per-sample layer norm beats batch norm's frozen statistics after the shift {SHIFT_LABELS[first]}",
                       "accuracy", "LayerNorm", _after(result, "layer", first), "BatchNorm (frozen stats)", _after(result, "batch_frozen", first),
                       context=ctx(first), unit="acc after shift"))
    per = "feature_affine" if "feature_affine" in result["shifts"] else first
    running = compare(NAME, f"A running input normalizer with forgetting adapts to the shift {SHIFT_LABELS[per]}", "accuracy",
                      "RunningNormalizer", _after(result, "running", per), "BatchNorm (frozen stats)", _after(result, "batch_frozen", per),
                      context=ctx(per), unit="acc after shift")
    if "running" in result["skipped"]:
        running = running.noted(f"(RunningNormalizer skipped: {result['skipped']['running']})")
    out.append(running)
    return out


def table(result: Dict):
    header = ["input norm", "before shift: acc"] + [f"after {SHIFT_LABELS[k]}: acc" for k in result["shifts"]]
    rows = [[LABELS[arm], Stat(**r["before_acc"]).fmt()] + [Stat(**r[k]["after_acc"]).fmt() for k in result["shifts"]]
            for arm, r in result["arms"].items()]
    rows += [[LABELS[arm], f"skipped: {why}"[:40]] + [""] * len(result["shifts"]) for arm, why in result["skipped"].items()]
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    kinds = result["shifts"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for arm, r in result["arms"].items():
            band(ax, result["curve_at"], r[kind]["curve"], LABELS[arm])
        ax.axvline(result["shift"], color="k", linestyle="--", linewidth=1)
        ax.set(xlabel="samples seen", ylabel=f"accuracy (last {result['window']})", ylim=(0, 1), title=f"shift: {SHIFT_LABELS[kind]}")
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "online.png")]
