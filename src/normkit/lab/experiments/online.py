r"""Online learning at batch size 1 on a digits stream whose inputs shift mid-stream.

The stream's second half is transformed :math:`x \to a x + b` (a sensor's gain and offset
change). The model :math:`\mathrm{norm}(x) \to \mathrm{Linear} \to \mathrm{ReLU} \to
\mathrm{Linear}` learns prequentially: each sample is first predicted (scored), then trained on
(one Adam step). Input norms compared:

- ``none``;
- ``batch_frozen``: BatchNorm in eval mode with the phase-1 input statistics (as a model fitted
  offline before the stream and then deployed: training-mode BatchNorm cannot run at batch
  size 1); it sees the phase-1 distribution exactly, which favours it before the shift;
- ``layer``: normkit LayerNorm over the 64 pixels of each sample (per-sample statistics; a
  global gain and offset change cancels exactly, up to ``eps``);
- ``running``: :class:`normkit.data.RunningNormalizer` with forgetting momentum, updated on
  every sample (unsupervised adaptation to the input distribution).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normkit.lab.config import OnlineConfig
from normkit.lab.data import shifted_stream
from normkit.lab.experiments._common import LABELS, band, curve_stats, pyplot, run_arms, save, seeded, stat_dict
from normkit.lab.models import make_norm
from normkit.lab.verdict import Finding, Stat, compare

NAME = "online"
TITLE = "Online learning at batch size 1 under an input shift"
CLAIM = "Layer norm does not depend on the batch, so it works in online learning and under non-stationary input."

_WINDOWS = ("before", "after", "end")


def _input_norm(arm: str, x_phase1: torch.Tensor, cfg: OnlineConfig) -> nn.Module:
    if arm == "batch_frozen":
        bn = nn.BatchNorm1d(x_phase1.shape[1])
        with torch.no_grad():
            bn.running_mean.copy_(x_phase1.mean(0))
            bn.running_var.copy_(x_phase1.var(0))
        return bn.eval()
    if arm == "running":
        try:
            from normkit.data import RunningNormalizer
        except ImportError as exc:
            raise ImportError(f"normkit.data.RunningNormalizer is not available ({exc})") from exc
        return RunningNormalizer(x_phase1.shape[1], momentum=cfg.momentum)
    return make_norm(arm, x_phase1.shape[1])


def stream_one(cfg: OnlineConfig, arm: str, seed: int, tick=lambda n=1: None) -> Dict:
    """One prequential pass; returns per-window accuracy/loss and a smoothed accuracy curve."""
    x, y, shift = shifted_stream(cfg.length, seed, cfg.scale, cfg.offset)
    seeded(seed)
    norm = _input_norm(arm, x[:shift], cfg)
    model = nn.Sequential(norm, nn.Linear(x.shape[1], cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, 10))
    if arm == "batch_frozen":
        # train() would switch BatchNorm to batch statistics; keep its frozen ones
        model.train = lambda mode=True: model  # type: ignore[method-assign]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    correct = torch.zeros(cfg.length)
    losses = torch.zeros(cfg.length)
    for t in range(cfg.length):
        logits = model(x[t : t + 1])
        loss = F.cross_entropy(logits, y[t : t + 1])
        correct[t] = float(logits.argmax(-1).item() == y[t].item())
        losses[t] = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick()
    w = cfg.window
    spans = {"before": (shift - w, shift), "after": (shift, shift + w), "end": (cfg.length - w, cfg.length)}
    out = {name: {"acc": correct[a:b].mean().item(), "loss": losses[a:b].mean().item()} for name, (a, b) in spans.items()}
    k = max(1, cfg.length // 60)
    out["curve"] = [correct[max(0, i - w) : i].mean().item() for i in range(k, cfg.length + 1, k)]
    out["curve_at"] = list(range(k, cfg.length + 1, k))
    out["shift"] = shift
    return out


def run(cfg: OnlineConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.arms) * len(seeds))
    runs_by_arm, skipped = run_arms(NAME, cfg.arms, seeds, cfg.length, tracker, lambda arm, seed, tick: stream_one(cfg, arm, seed, tick))
    arms = {
        arm: {
            **{f"{win}_{m}": stat_dict([r[win][m] for r in runs]) for win in _WINDOWS for m in ("acc", "loss")},
            "curve": curve_stats([r["curve"] for r in runs]),
            "runs": runs,
        }
        for arm, runs in runs_by_arm.items()
    }
    any_run = next(iter(arms.values()))["runs"][0] if arms else {"curve_at": [], "shift": cfg.length // 2}
    return {"arms": arms, "skipped": skipped, "curve_at": any_run["curve_at"], "shift": any_run["shift"], "window": cfg.window}


def _s(result: Dict, arm: str, metric: str) -> Stat:
    return Stat(**result["arms"][arm][metric]) if arm in result["arms"] else Stat.of([])


def findings(result: Dict) -> List[Finding]:
    w = result["window"]
    ctx = f"Prequential accuracy over the {w} samples just after the shift:"
    out = [compare(NAME, "Layer norm keeps working when the input distribution shifts", "accuracy", "LayerNorm", _s(result, "layer", "after_acc"), "no norm", _s(result, "none", "after_acc"), context=ctx, unit="acc after shift")]
    out.append(compare(NAME, "Per-sample layer norm beats batch norm's frozen statistics after a shift", "accuracy", "LayerNorm", _s(result, "layer", "after_acc"), "BatchNorm (frozen stats)", _s(result, "batch_frozen", "after_acc"), context=ctx, unit="acc after shift"))
    running = compare(NAME, "A running input normalizer with forgetting adapts to the shift", "accuracy", "RunningNormalizer", _s(result, "running", "after_acc"), "BatchNorm (frozen stats)", _s(result, "batch_frozen", "after_acc"), context=ctx, unit="acc after shift")
    if "running" in result["skipped"]:
        running = running.noted(f"(RunningNormalizer skipped: {result['skipped']['running']})")
    out.append(running)
    return out


def table(result: Dict):
    header = ["input norm"] + [f"{w} shift: acc" if w != "end" else "end of stream: acc" for w in _WINDOWS] + ["after shift: loss"]
    rows = []
    for arm, r in result["arms"].items():
        rows.append([LABELS[arm]] + [Stat(**r[f"{w}_acc"]).fmt() for w in _WINDOWS] + [Stat(**r["after_loss"]).fmt()])
    for arm, why in result["skipped"].items():
        rows.append([LABELS[arm]] + [f"skipped: {why}"[:40]] + [""] * 3)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for arm, r in result["arms"].items():
        band(ax, result["curve_at"], r["curve"], LABELS[arm])
    ax.axvline(result["shift"], color="k", linestyle="--", linewidth=1)
    ax.text(result["shift"], 0.02, " input shift", fontsize=8)
    ax.set(xlabel="samples seen", ylabel=f"accuracy (last {result['window']})", ylim=(0, 1), title="prequential accuracy, batch size 1")
    ax.legend(fontsize=8)
    return [save(fig, out_dir, "online.png")]
