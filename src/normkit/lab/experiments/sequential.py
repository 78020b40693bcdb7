"""Pixel-by-pixel digits: a recurrent network reads the 64 pixels of an 8×8 digit one per step
and classifies it from its last hidden state (the sequential-MNIST task in miniature).

LSTM vs LayerNormLSTM and GRU vs LayerNormGRU, the same steps, Adam learning rate and gradient
clipping; test accuracy along training and at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import SequentialConfig
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
    run_arms,
    save,
    seeded,
    stat_dict,
    tune,
    values,
    warm_up,
)
from normkit.lab.models import RNNClassifier, count_params
from normkit.lab.verdict import Finding, Stat, compare

NAME = "sequential"
TITLE = "Pixel-by-pixel digits (64 steps): LSTM/GRU with and without layer norm"
CLAIM = "Layer norm helps recurrent networks on long sequences."


def train_one(cfg: SequentialConfig, arm: str, seed: int, tick=lambda n=1: None, lr: float = 3e-3) -> Dict:
    d = digits()
    x_train, x_test = d.x_train.unsqueeze(-1), d.x_test.unsqueeze(-1)  # (n, 64, 1)
    gen = seeded(seed)
    model = RNNClassifier(arm, 1, cfg.hidden, 10)
    opt = adam(model.parameters(), lr)
    marks, curve, timer = set(checkpoints(cfg.steps, cfg.evals)), [], Timer()
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, x_train.shape[0], (cfg.batch,), generator=gen)
        with timer:
            loss = F.cross_entropy(model(x_train[idx]), d.y_train[idx])
            clip_and_step(model, opt, loss, cfg.clip)
        if step in marks:
            curve.append(accuracy(model, x_test, d.y_test))
        tick()
    return {"curve": curve, "final_acc": curve[-1], "train_seconds": timer.cpu_seconds}


def _score(cfg: SequentialConfig):
    """Tuning score: the final test accuracy."""
    return lambda arm, lr, seed, tick: train_one(cfg, arm, seed, tick, lr)["final_acc"]


def run(cfg: SequentialConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.arms) * (len(seeds) + (len(cfg.lrs) * cfg.tune_seeds if len(cfg.lrs) > 1 else 0)))
    tuned = tune(NAME, cfg.arms, cfg.lrs, cfg.tune_seeds, cfg.steps, tracker, _score(cfg))
    runs_by_arm, skipped = run_arms(
        NAME, cfg.arms, seeds, cfg.steps, tracker,
        lambda arm, seed, tick: train_one(cfg, arm, seed, tick, tuned[arm]["lr"]),
        warm=lambda arm: warm_up(RNNClassifier(arm, 1, cfg.hidden, 10), torch.rand(2, 3, 1)),
    )
    arms = {
        arm: {
            "lr": tuned[arm]["lr"],
            "tuning": tuned[arm],
            "final_acc": stat_dict([r["final_acc"] for r in runs]),
            "train_seconds": stat_dict([r["train_seconds"] for r in runs]),
            "curve": curve_stats([r["curve"] for r in runs]),
            "runs": runs,
        }
        for arm, runs in runs_by_arm.items()
    }
    return {"steps_at": checkpoints(cfg.steps, cfg.evals), "arms": arms, "skipped": skipped}


def findings(result: Dict) -> List[Finding]:
    arms, out = result["arms"], []
    get = lambda a: values(arms[a]["runs"], "final_acc") if a in arms else []  # noqa: E731
    lab = lambda a: f"{LABELS[a]} (lr {arms[a]['lr']:g})" if a in arms and "lr" in arms[a] else LABELS[a]  # noqa: E731
    steps = result["steps_at"][-1] if result["steps_at"] else 0
    for ln, base in (("ln_lstm", "lstm"), ("ln_gru", "gru")):
        f = compare(NAME, f"Layer norm helps {'an' if base == 'lstm' else 'a'} {LABELS[base]} on 64-step sequences early in training ({steps} steps)",
                    f"test accuracy after {steps} steps", lab(ln), get(ln), lab(base), get(base), unit="final test acc",
                    key="sequential.lstm" if base == "lstm" else "", context="Each arm at its tuned rate;")
        if ln in result["skipped"]:
            f = f.noted(f"({LABELS[ln]} skipped: {result['skipped'][ln]})")
        out.append(f)
    return out


def table(result: Dict):
    header = ["model", "final test accuracy", "training CPU time (s)"]
    rows = [[LABELS[a], Stat(**r["final_acc"]).fmt(), Stat(**r["train_seconds"]).fmt(1)] for a, r in result["arms"].items()]
    rows += [[LABELS[a], f"skipped: {why}"[:60], ""] for a, why in result["skipped"].items()]
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for arm, r in result["arms"].items():
        band(ax, result["steps_at"], r["curve"], LABELS[arm])
    ax.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1), title="pixel-by-pixel digits")
    ax.legend(fontsize=8)
    return [save(fig, out_dir, "sequential.png")]


def scale(cfg: SequentialConfig, result: Dict) -> str:
    params = count_params(RNNClassifier("ln_lstm", 1, cfg.hidden, 10))
    return (f"1-layer LSTM/GRU, hidden {cfg.hidden} ({params:,} parameters, LN-LSTM); {cfg.steps} Adam steps at batch {cfg.batch} "
            f"(early training); 64-step pixel sequences of the digits; {cfg.seeds} test seeds per arm, after {cfg.tune_seeds} tuning "
            f"seeds × {len(cfg.lrs)} rates ({', '.join(f'{r:g}' for r in cfg.lrs)})")
