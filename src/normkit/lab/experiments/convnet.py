r"""A small ConvNet on 8×8 digits with each channel normalization, at batch sizes 4 and 64.

The paper (Ba et al. 2016, §6.7) reports that layer norm speeds up ConvNets over no norm but
that batch norm does better: with receptive fields, units at the image border and in its middle
see very different statistics, which one per-sample normalization over all units ignores. Here:
three 3×3 convolutions (the second with stride 2), each followed by the norm and a ReLU, global
average pooling and a linear read-out. Norms:

- ``batch``: :class:`torch.nn.BatchNorm2d` (statistics per channel over the batch and the pixels;
  eval mode uses its running statistics);
- ``layer2d``: :class:`normkit.nn.LayerNorm2d`, over the C channels at each pixel (ConvNeXt);
- ``layer_chw``: :class:`normkit.nn.LayerNormCHW`, over all of (C, H, W) per sample: the paper's
  layer norm of a convolutional layer;
- ``group``: :class:`torch.nn.GroupNorm` (Wu & He 2018), over groups of channels and the pixels;
- ``none``.

Every norm sees the same minibatches and starts from the same convolution weights for a given
seed (paired), with the same number of Adam steps at each batch size. Every convolution is
He-initialized (it feeds a ReLU), and each (norm, batch size) runs at the Adam rate of
``cfg.lrs`` that gave it the best final test accuracy on the tuning seeds. The runs are short
(``cfg.steps``): the claims are about accuracy after that many steps, not at convergence.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import normkit
from normkit.lab.config import ConvNetConfig
from normkit.lab.data import digits
from normkit.lab.experiments._common import (
    LABELS,
    Timer,
    accuracy,
    adam,
    band,
    checkpoints,
    clip_and_step,
    curve_stats,
    pyplot,
    save,
    seeded,
    stat_dict,
    tune,
    values,
)
from normkit.lab.models import he_init_
from normkit.lab.verdict import Finding, Stat, compare

NAME = "convnet"
TITLE = "ConvNet on 8×8 digits: BatchNorm vs LayerNorm vs GroupNorm vs none, batch 4 and 64"
CLAIM = "In ConvNets layer norm helps over no norm, but batch norm does better (the paper's §6.7)."

CONV_NORMS = ("none", "batch", "layer2d", "layer_chw", "group")


def make_channel_norm(kind: str, channels: int, groups: int) -> nn.Module:
    """A normalization of ``(N, C, H, W)`` activations."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer2d":
        return normkit.nn.LayerNorm2d(channels)
    if kind == "layer_chw":
        return normkit.nn.LayerNormCHW(channels)
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    raise ValueError(f"conv norm kind must be one of {', '.join(CONV_NORMS)}, got {kind!r}")


class ConvNet(nn.Module):
    """conv3×3 → norm → relu, ×3 (the second with stride 2), global average pool, linear."""

    def __init__(self, norm: str, channels: Sequence[int], groups: int, n_classes: int = 10):
        super().__init__()
        c1, c2 = channels
        layers = []
        for c_in, c_out, stride in ((1, c1, 1), (c1, c2, 2), (c2, c2, 1)):
            layers += [he_init_(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)), make_channel_norm(norm, c_out, groups), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, n_classes)
        return self.head(self.features(x).mean((2, 3)))


def _key(norm: str, bs: int) -> str:
    return f"{norm}@{bs}"


def train_one(cfg: ConvNetConfig, norm: str, bs: int, seed: int, tick=lambda n=1: None, lr: float = 1e-3) -> Dict:
    d = digits()
    x_train, x_test = d.x_train.view(-1, 1, 8, 8), d.x_test.view(-1, 1, 8, 8)
    gen = seeded(seed)
    model = ConvNet(norm, cfg.channels, cfg.groups)
    opt = adam(model.parameters(), lr)
    marks, curve, timer = set(checkpoints(cfg.steps, cfg.evals)), [], Timer()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (bs,), generator=gen)
        with timer:
            clip_and_step(model, opt, F.cross_entropy(model(x_train[idx]), d.y_train[idx]))
        if step in marks:
            curve.append(accuracy(model, x_test, d.y_test))
        tick()
    final = curve[-1] if math.isfinite(curve[-1]) else None
    return {"curve": curve, "final_acc": final, "train_seconds": timer.cpu_seconds}


def run(cfg: ConvNetConfig, seeds: Sequence[int], tracker) -> Dict:
    tune_runs = len(cfg.lrs) * cfg.tune_seeds if len(cfg.lrs) > 1 else 0
    tracker.experiment(NAME, len(cfg.norms) * len(cfg.batch_sizes) * (len(seeds) + tune_runs))
    arms = {}
    for bs in cfg.batch_sizes:
        tuned = tune(NAME, cfg.norms, cfg.lrs, cfg.tune_seeds, cfg.steps, tracker,
                     lambda norm, lr, seed, tick: train_one(cfg, norm, bs, seed, tick, lr)["final_acc"],
                     label=lambda norm: f"{LABELS[norm]}, batch {bs}")
        for norm in cfg.norms:
            runs, lr = [], tuned[norm]["lr"]
            for seed in seeds:
                with tracker.run(f"{LABELS[norm]}, batch {bs}, lr {lr:g}, seed {seed}", cfg.steps) as tick:
                    runs.append(train_one(cfg, norm, bs, seed, tick, lr))
            arms[_key(norm, bs)] = {"norm": norm, "batch_size": bs, "lr": lr, "tuning": tuned[norm], "final_acc": stat_dict(values(runs, "final_acc")),
                                    "train_seconds": stat_dict(values(runs, "train_seconds")),
                                    "curve": curve_stats([r["curve"] for r in runs]), "runs": runs}
    return {"steps_at": checkpoints(cfg.steps, cfg.evals), "norms": list(cfg.norms), "batch_sizes": list(cfg.batch_sizes), "arms": arms}


def _v(result: Dict, norm: str, bs: int) -> List:
    arm = result["arms"].get(_key(norm, bs))
    return values(arm["runs"], "final_acc") if arm else []


def findings(result: Dict) -> List[Finding]:
    small, large = min(result["batch_sizes"]), max(result["batch_sizes"])
    steps = result["steps_at"][-1] if result["steps_at"] else 0
    c = lambda bs: f"At batch size {bs}, after {steps} steps, each arm at its tuned rate,"  # noqa: E731

    def lab(norm: str, bs: int) -> str:
        arm = result["arms"].get(_key(norm, bs))
        return f"{LABELS[norm]} (lr {arm['lr']:g})" if arm and "lr" in arm else LABELS[norm]

    return [
        compare(NAME, f"Batch norm beats the paper's layer norm in a ConvNet (§6.7; batch {large}, {steps} steps)", "final test accuracy",
                lab("batch", large), _v(result, "batch", large), lab("layer_chw", large), _v(result, "layer_chw", large), context=c(large),
                unit="final test acc", key="convnet.bn"),
        compare(NAME, f"Layer norm helps a ConvNet over no norm (batch {large}, {steps} steps)", "final test accuracy",
                lab("layer_chw", large), _v(result, "layer_chw", large), lab("none", large), _v(result, "none", large), context=c(large),
                unit="final test acc"),
        compare(NAME, f"Batch norm beats per-pixel LayerNorm2d in a ConvNet (batch {large}, {steps} steps)", "final test accuracy",
                lab("batch", large), _v(result, "batch", large), lab("layer2d", large), _v(result, "layer2d", large), context=c(large),
                unit="final test acc"),
        compare(NAME, f"Batch norm beats the paper's layer norm in a ConvNet at a small batch ({small}, {steps} steps)", "final test accuracy",
                lab("batch", small), _v(result, "batch", small), lab("layer_chw", small), _v(result, "layer_chw", small), context=c(small),
                unit="final test acc"),
    ]


def table(result: Dict):
    header = ["norm"] + [f"batch {bs}: final acc (tuned lr)" for bs in result["batch_sizes"]]
    rows = [[LABELS[n]] + [f"{Stat(**result['arms'][_key(n, bs)]['final_acc']).fmt()} ({result['arms'][_key(n, bs)].get('lr', 0):g})"
                           for bs in result["batch_sizes"]] for n in result["norms"]]
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    bss = result["batch_sizes"]
    fig, axes = plt.subplots(1, len(bss), figsize=(4.2 * len(bss), 3.4), squeeze=False)
    for ax, bs in zip(axes[0], bss):
        for norm in result["norms"]:
            band(ax, result["steps_at"], result["arms"][_key(norm, bs)]["curve"], LABELS[norm])
        ax.set(title=f"batch size {bs}", xlabel="step", ylabel="test accuracy", ylim=(0, 1))
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "convnet.png")]


def scale(cfg: ConvNetConfig, result: Dict) -> str:
    params = sum(p.numel() for p in ConvNet("layer_chw", cfg.channels, cfg.groups).parameters())
    return (f"3 conv layers, {cfg.channels[0]}/{cfg.channels[1]} channels ({params:,} parameters with LayerNormCHW); {cfg.steps} Adam "
            f"steps at batch {', '.join(map(str, cfg.batch_sizes))} (short training); 8×8 digits; {cfg.seeds} test seeds per arm, after "
            f"{cfg.tune_seeds} tuning seeds × {len(cfg.lrs)} rates ({', '.join(f'{r:g}' for r in cfg.lrs)})")
