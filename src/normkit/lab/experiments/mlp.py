"""Deep MLP on digits (permutation-invariant, the paper's PI-MNIST setting in miniature).

Every norm (none, BatchNorm, LayerNorm, RMSNorm) at every batch size, the same number of Adam
steps each; every ReLU layer He-initialized, and each (norm, batch size) at the Adam rate of
``cfg.lrs`` that gave it the best mean test accuracy over the curve on the tuning seeds
(:func:`~normkit.lab.experiments._common.tune`). Test accuracy is measured at checkpoints along training (the training curve) and
at the end, in eval mode (BatchNorm then uses its running statistics). Every arm at a batch
size sees the same minibatches for a given seed, so the claims are paired by seed.

BatchNorm at batch size 1 is not a failed run: PyTorch's ``BatchNorm1d`` refuses a one-row
batch in training mode ("Expected more than 1 value per channel"), so it *cannot be run*; it is
reported as such and left out of the tests. What batch size 1 can show is whether layer norm
trains there at all, so that claim compares it with no norm.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import MLPConfig
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
from normkit.lab.models import MLP, count_params
from normkit.lab.verdict import Finding, Stat, compare, compare_equivalence, not_measured

NAME = "mlp"
TITLE = "Deep MLP on digits: training speed and batch-size (in)dependence"
CLAIM = "Layer norm speeds up training, and unlike batch norm does not depend on the batch, so it works at batch size 1."


def _key(norm: str, bs: int) -> str:
    return f"{norm}@{bs}"


def _checkpoints(cfg: MLPConfig) -> List[int]:
    return checkpoints(cfg.steps, cfg.evals)


def train_one(cfg: MLPConfig, norm: str, bs: int, seed: int, tick=lambda n=1: None, lr: float = 1e-3) -> Dict:
    """One run: returns the test-accuracy curve, final accuracy, training seconds, or the error."""
    data = digits()
    gen = seeded(seed)
    model = MLP(data.x_train.shape[1], cfg.width, cfg.depth, 10, norm)
    opt = adam(model.parameters(), lr)
    checkpoints, curve, timer = set(_checkpoints(cfg)), [], Timer()
    try:
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, data.x_train.shape[0], (bs,), generator=gen)
            with timer:
                loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
                clip_and_step(model, opt, loss)
            if step in checkpoints:
                curve.append(accuracy(model, data.x_test, data.y_test))
            tick()
    except ValueError as exc:  # BatchNorm1d at batch size 1: "Expected more than 1 value per channel"
        return {"status": "cannot run", "error": str(exc).splitlines()[0], "curve": [math.nan] * len(checkpoints), "final_acc": None, "seconds": timer.cpu_seconds}
    return {"status": "ok", "curve": curve, "final_acc": curve[-1], "mean_acc": sum(curve) / len(curve), "seconds": timer.cpu_seconds}


def run(cfg: MLPConfig, seeds: Sequence[int], tracker) -> Dict:
    tune_runs = len(cfg.lrs) * cfg.tune_seeds if len(cfg.lrs) > 1 else 0
    tracker.experiment(NAME, len(cfg.norms) * len(cfg.batch_sizes) * (len(seeds) + tune_runs))
    arms, tuned = {}, {}
    for bs in cfg.batch_sizes:
        tuned[bs] = tune(NAME, cfg.norms, cfg.lrs, cfg.tune_seeds, cfg.steps, tracker,
                         lambda norm, lr, seed, tick: train_one(cfg, norm, bs, seed, tick, lr).get("mean_acc"),
                         label=lambda norm: f"{LABELS[norm]}, batch {bs}")
        for norm in cfg.norms:
            runs, lr = [], tuned[bs][norm]["lr"]
            for seed in seeds:
                with tracker.run(f"{LABELS[norm]}, batch {bs}, lr {lr:g}, seed {seed}", cfg.steps) as tick:
                    runs.append(train_one(cfg, norm, bs, seed, tick, lr))
            errors = sorted({r["error"] for r in runs if r["status"] != "ok"})
            arms[_key(norm, bs)] = {
                "norm": norm,
                "batch_size": bs,
                "lr": lr,
                "tuning": tuned[bs][norm],
                "final_acc": stat_dict([r["final_acc"] for r in runs]),
                "mean_acc": stat_dict([r.get("mean_acc") for r in runs]),
                "seconds": stat_dict([r["seconds"] for r in runs]),
                "curve": curve_stats([r["curve"] for r in runs]),
                "errors": errors,
                "runs": runs,
            }
    return {"steps_at": _checkpoints(cfg), "norms": list(cfg.norms), "batch_sizes": list(cfg.batch_sizes), "arms": arms}


def _v(result: Dict, norm: str, bs: int, metric: str):
    """Per-seed values of ``metric`` for one arm (``[]`` if the arm was not run)."""
    arm = result["arms"].get(_key(norm, bs))
    return values(arm["runs"], metric) if arm else []


def _runnable(result: Dict, norm: str, bs: int) -> bool:
    arm = result["arms"].get(_key(norm, bs))
    return arm is not None and all(r["status"] == "ok" for r in arm["runs"])


def _lr(result: Dict, norm: str, bs: int) -> str:
    arm = result["arms"].get(_key(norm, bs))
    return f"lr {arm['lr']:g}" if arm and "lr" in arm else ""


def findings(result: Dict) -> List[Finding]:
    bss, norms, out = result["batch_sizes"], result["norms"], []
    if "layer" not in norms or "none" not in norms:
        return out
    mid = 32 if 32 in bss else bss[-1]
    lab = lambda norm, bs: f"{LABELS[norm]} ({_lr(result, norm, bs)})"  # noqa: E731
    out.append(compare(
        NAME, "Layer norm speeds up training of a deep MLP", "test accuracy averaged over the training curve",
        lab("layer", mid), _v(result, "layer", mid, "mean_acc"), lab("none", mid), _v(result, "none", mid, "mean_acc"),
        context=f"At batch size {mid}, He init, each arm at its tuned rate,", unit="test acc, mean over the curve", key="mlp.speed",
    ))
    one = min(bss)
    f = compare(
        NAME, f"Layer norm trains a deep MLP at batch size {one}", "final test accuracy",
        lab("layer", one), _v(result, "layer", one, "final_acc"), lab("none", one), _v(result, "none", one, "final_acc"),
        context=f"At batch size {one}, against no norm,", unit="final test acc", key="mlp.batch1" if one == 1 else "",
    )
    bn = result["arms"].get(_key("batch", one))
    if bn and bn["errors"]:
        f = f.noted(f"BatchNorm cannot be run at batch size {one} (PyTorch raises: {bn['errors'][0]}); it is not counted as a failed run.")
    out.append(f)
    if "batch" in norms:
        tiny = min((b for b in bss if b > 1), default=None)
        if tiny is not None and tiny != mid:
            claim = f"At batch size {tiny}, layer norm beats batch norm"
            if not _runnable(result, "batch", tiny):
                out.append(not_measured(NAME, claim, f"BatchNorm cannot run at batch size {tiny}"))
            else:
                out.append(compare(NAME, claim, "final test accuracy", lab("layer", tiny), _v(result, "layer", tiny, "final_acc"),
                                   lab("batch", tiny), _v(result, "batch", tiny, "final_acc"), context=f"At batch size {tiny},",
                                   unit="final test acc"))
        if _runnable(result, "batch", mid):
            out.append(compare_equivalence(
                NAME, f"At batch size {mid}, layer norm is on par with batch norm (±0.02)", "final test accuracy",
                lab("layer", mid), _v(result, "layer", mid, "final_acc"), lab("batch", mid), _v(result, "batch", mid, "final_acc"),
                margin=0.02, context=f"At batch size {mid},", unit="final test acc"))
    return out


def table(result: Dict):
    header = ["norm"] + [f"batch {bs}: final acc (tuned lr)" for bs in result["batch_sizes"]]
    rows = []
    for norm in result["norms"]:
        row = [LABELS[norm]]
        for bs in result["batch_sizes"]:
            arm = result["arms"][_key(norm, bs)]
            row.append("cannot run (PyTorch raises)" if arm["errors"] and arm["final_acc"]["n"] == 0
                       else f"{Stat(**arm['final_acc']).fmt()} ({arm.get('lr', 0):g})")
        rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    bss = result["batch_sizes"]
    fig, axes = plt.subplots(1, len(bss) + 1, figsize=(3.2 * (len(bss) + 1), 3.2), squeeze=False)
    for ax, bs in zip(axes[0], bss):
        failed = []
        for norm in result["norms"]:
            arm = result["arms"][_key(norm, bs)]
            band(ax, result["steps_at"], arm["curve"], LABELS[norm])
            if arm["errors"]:
                failed.append(LABELS[norm])
        if failed:
            ax.text(0.03, 0.93, f"{', '.join(failed)}: cannot run", transform=ax.transAxes, fontsize=7, color="0.3")
        ax.set(title=f"batch size {bs}", xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    ax = axes[0][-1]
    for norm in result["norms"]:
        stats = [Stat(**result["arms"][_key(norm, bs)]["final_acc"]) for bs in bss]
        ax.errorbar(bss, [s.mean for s in stats], yerr=[0 if math.isnan(s.std) else s.std for s in stats], marker="o", capsize=3, label=LABELS[norm])
    ax.set(xscale="log", title="final accuracy vs batch size", xlabel="batch size", ylim=(0, 1))
    ax.legend(fontsize=7)
    return [save(fig, out_dir, "mlp.png")]


def scale(cfg: MLPConfig, result: Dict) -> str:
    d = digits()
    params = count_params(MLP(d.x_train.shape[1], cfg.width, cfg.depth, 10, "layer"))
    return (f"{cfg.depth}-layer ReLU MLP, width {cfg.width} ({params:,} parameters with LayerNorm); {cfg.steps} Adam steps at batch "
            f"{', '.join(map(str, cfg.batch_sizes))}; digits, {d.x_train.shape[0]} train / {d.x_test.shape[0]} test images; "
            f"{cfg.seeds} test seeds per arm, after {cfg.tune_seeds} tuning seeds × {len(cfg.lrs)} rates ({', '.join(f'{r:g}' for r in cfg.lrs)})")
