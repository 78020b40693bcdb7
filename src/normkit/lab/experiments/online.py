r"""Online learning at batch size 1 on a digits stream whose inputs shift mid-stream.

The model :math:`\mathrm{norm}(x) \to \mathrm{Linear} \to \mathrm{ReLU} \to \mathrm{Linear}`
learns prequentially: each sample is first predicted (scored), then trained on (one Adam step).
At the middle of the stream the inputs change (:func:`normkit.lab.data.shift_inputs`): a global
gain and offset :math:`x \to 3x + 2` (which a per-sample layer norm cancels exactly), per-feature
gains and offsets (which it does not), and a random rotation of the 64 pixels (in ``--full``
also a permutation). The first half is learned once per seed; each shift, and a **no-shift
control** that sees the same second half unshifted, continues from a deep copy of that model and
of the optimizer's state (Adam's moment tensors copied, not shared: each continuation starts
from the same state, whatever the order of the shifts). What a shift costs an arm is its
accuracy over the ``window`` samples after the shift in the control minus that under the shift:
the arm's *loss from the shift*, which does not carry the arm's lead before it.

The hidden ReLU layer is He-initialized. Each arm runs at its own Adam rate, chosen from ``cfg.lrs`` on tuning seeds by its prequential
accuracy over the first half (the data before any shift).

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
    tune,
)
from normkit.lab.models import he_init_, make_norm
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


def _first_half(cfg: OnlineConfig, arm: str, seed: int, lr: float, tick):
    x, y, shift = shifted_stream(cfg.length, seed, 1.0, 0.0)
    seeded(seed)
    model = nn.Sequential(_input_norm(arm, x[:shift], cfg), he_init_(nn.Linear(x.shape[1], cfg.hidden)), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    opt = adam([p for p in model.parameters() if p.requires_grad], lr)
    first = _learn(model, opt, x[:shift], y[:shift], tick)
    return x, y, shift, model, opt, first


def _continue(model: nn.Module, opt, lr: float, x: torch.Tensor, y: torch.Tensor, tick) -> torch.Tensor:
    """The second half from a deep copy of the model and of the optimizer's state."""
    m = copy.deepcopy(model)
    o = adam([p for p in m.parameters() if p.requires_grad], lr)
    # Optimizer.load_state_dict keeps the state's tensors (moving them only across dtype/device):
    # without the deepcopy every continuation would train the same Adam moments.
    o.load_state_dict(copy.deepcopy(opt.state_dict()))
    return _learn(m, o, x, y, tick)


def stream_one(cfg: OnlineConfig, arm: str, seed: int, tick=lambda n=1: None, lr: float = 1e-3) -> Dict:
    """The first half once, then the no-shift control and each shift from a copy; per
    continuation the accuracy just after the shift and at the end, and a smoothed accuracy curve
    over the whole stream; per shift the loss from it (control minus shifted, just after)."""
    x, y, shift, model, opt, first = _first_half(cfg, arm, seed, lr, tick)
    w = cfg.window
    k = max(1, cfg.length // 60)
    out: Dict = {"before": first[shift - w :].mean().item(), "shift": shift, "first_half_acc": first.mean().item(),
                 "curve_at": list(range(k, cfg.length + 1, k))}
    for kind in ("control",) + tuple(cfg.shifts):
        x2 = x[shift:] if kind == "control" else shift_inputs(x[shift:], kind, seed, cfg.scale, cfg.offset)
        second = _continue(model, opt, lr, x2, y[shift:], tick)
        correct = torch.cat([first, second])
        out[kind] = {"after": second[:w].mean().item(), "end": second[-w:].mean().item(),
                     "curve": [correct[max(0, i - w) : i].mean().item() for i in range(k, cfg.length + 1, k)]}
    for kind in cfg.shifts:
        out[kind]["drop"] = out["control"]["after"] - out[kind]["after"]
    return out


def run(cfg: OnlineConfig, seeds: Sequence[int], tracker) -> Dict:
    half = cfg.length // 2
    ticks = half + (len(cfg.shifts) + 1) * (cfg.length - half)
    tracker.experiment(NAME, len(cfg.arms) * (len(seeds) + (len(cfg.lrs) * cfg.tune_seeds if len(cfg.lrs) > 1 else 0)))
    tuned = tune(NAME, cfg.arms, cfg.lrs, cfg.tune_seeds, half, tracker,
                 lambda arm, lr, seed, tick: _first_half(cfg, arm, seed, lr, tick)[-1].mean().item())
    runs_by_arm, skipped = run_arms(NAME, cfg.arms, seeds, ticks, tracker,
                                    lambda arm, seed, tick: stream_one(cfg, arm, seed, tick, tuned[arm]["lr"]))
    arms = {}
    for arm, runs in runs_by_arm.items():
        arms[arm] = {"lr": tuned[arm]["lr"], "tuning": tuned[arm], "before_acc": stat_dict([r["before"] for r in runs]),
                     "control": {"after_acc": stat_dict([r["control"]["after"] for r in runs]),
                                 "curve": curve_stats([r["control"]["curve"] for r in runs])}, "runs": runs}
        for kind in cfg.shifts:
            arms[arm][kind] = {"after_acc": stat_dict([r[kind]["after"] for r in runs]), "end_acc": stat_dict([r[kind]["end"] for r in runs]),
                               "drop": stat_dict([r[kind]["drop"] for r in runs]), "curve": curve_stats([r[kind]["curve"] for r in runs])}
    any_run = next(iter(arms.values()))["runs"][0] if arms else {"curve_at": [], "shift": cfg.length // 2}
    return {"arms": arms, "skipped": skipped, "shifts": list(cfg.shifts), "curve_at": any_run.get("curve_at", []),
            "shift": any_run["shift"], "window": cfg.window}


def _drop(result: Dict, arm: str, kind: str) -> List:
    return [r[kind]["drop"] for r in result["arms"][arm]["runs"]] if arm in result["arms"] else []


def _lab(result: Dict, arm: str) -> str:
    a = result["arms"].get(arm)
    return f"{LABELS[arm]} (lr {a['lr']:g})" if a and "lr" in a else LABELS[arm]


def findings(result: Dict) -> List[Finding]:
    w, out = result["window"], []
    ctx = lambda kind: (f"Accuracy lost to the shift {SHIFT_LABELS[kind]} (no-shift control minus shifted, over the {w} samples "  # noqa: E731
                        f"after it; lower is better):")
    metric = "accuracy lost to the shift"
    for kind in result["shifts"]:
        out.append(compare(NAME, f"Layer norm loses less than no norm to the input shift {SHIFT_LABELS[kind]}", metric,
                           _lab(result, "layer"), _drop(result, "layer", kind), _lab(result, "none"), _drop(result, "none", kind),
                           higher_is_better=False, context=ctx(kind), unit="acc lost to the shift",
                           key="online.affine" if kind == "affine" else ""))
    first = result["shifts"][0]
    out.append(compare(NAME, f"A frozen batch-norm standardizer loses less than no norm to the shift {SHIFT_LABELS[first]}", metric,
                       _lab(result, "batch_frozen"), _drop(result, "batch_frozen", first), _lab(result, "none"), _drop(result, "none", first),
                       higher_is_better=False, context=ctx(first), unit="acc lost to the shift"))
    out.append(compare(NAME, f"Per-sample layer norm loses less than batch norm's frozen statistics to the shift {SHIFT_LABELS[first]}",
                       metric, _lab(result, "layer"), _drop(result, "layer", first), _lab(result, "batch_frozen"),
                       _drop(result, "batch_frozen", first), higher_is_better=False, context=ctx(first), unit="acc lost to the shift"))
    per = "feature_affine" if "feature_affine" in result["shifts"] else first
    running = compare(NAME, f"A running input normalizer with forgetting loses less than frozen statistics to the shift {SHIFT_LABELS[per]}",
                      metric, _lab(result, "running"), _drop(result, "running", per), _lab(result, "batch_frozen"),
                      _drop(result, "batch_frozen", per), higher_is_better=False, context=ctx(per), unit="acc lost to the shift")
    if "running" in result["skipped"]:
        running = running.noted(f"(RunningNormalizer skipped: {result['skipped']['running']})")
    out.append(running)
    return out


def table(result: Dict):
    header = (["input norm (tuned lr)", "before shift: acc", "no shift (control): acc"]
              + [f"{SHIFT_LABELS[k]}: acc (lost)" for k in result["shifts"]])
    rows = [[_lab(result, arm), Stat(**r["before_acc"]).fmt(), Stat(**r["control"]["after_acc"]).fmt()]
            + [f"{Stat(**r[k]['after_acc']).fmt()} ({Stat(**r[k]['drop']).mean:+.3f})" for k in result["shifts"]]
            for arm, r in result["arms"].items()]
    rows += [[LABELS[arm], f"skipped: {why}"[:40], ""] + [""] * len(result["shifts"]) for arm, why in result["skipped"].items()]
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


def scale(cfg: OnlineConfig, result: Dict) -> str:
    return (f"input norm → Linear(64, {cfg.hidden}) → ReLU → Linear; a prequential stream of {cfg.length} digits at batch size 1, "
            f"shift after {cfg.length // 2}, scored over the {cfg.window} samples after it against a no-shift control; {cfg.seeds} test "
            f"seeds per arm, after {cfg.tune_seeds} tuning seeds × {len(cfg.lrs)} rates ({', '.join(f'{r:g}' for r in cfg.lrs)}) "
            "scored on the first half")
