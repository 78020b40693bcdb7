r"""A small causal character transformer: norm placement × warm-up × learning rate.

post-LN, pre-LN (normkit's fused ``residual=``/``prenorm=True``), no norm (and pre-RMSNorm in
``--full``), each with and without linear warm-up. The whole grid of Adam rates runs on the
tuning seeds; each (placement, warm-up) arm is then tested on the test seeds at the rate with
its lowest mean final validation loss on the tuning seeds (finite runs only), so every arm is
judged at its own best rate, chosen on data its test does not use. Cosine decay to a tenth after
the warm-up for every arm.

What the runs measure: the final validation loss (nats/char), and for instability the **peak
training loss** (its highest value over training) with the **largest rise** of the training loss
above its best value so far (a blow-up; a run whose loss rises by more than ``cfg.spike`` nats is
*spiked*), and whether the loss went **non-finite** (diverged). At the quick preset's scale
(2 layers, width 32, 64 steps) post-LN's known instability without warm-up (Xiong et al. 2020)
need not show; when no post-LN run diverged or spiked, the report says the stability claim is
not testable at this scale instead of estimating it. ``--full`` runs 6 layers of width 64
for 1000 steps with 200 warm-up steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import TransformerConfig
from normkit.lab.data import VOCAB_SIZE, char_batches, stdlib_corpus
from normkit.lab.experiments._common import (
    LABELS,
    Timer,
    adam,
    checkpoints,
    pyplot,
    save,
    seeded,
    stat_dict,
    tuning_seeds,
    values,
)
from normkit.lab.models import CharTransformer, count_params, lr_at
from normkit.lab.verdict import Finding, Stat, compare, compare_equivalence

NAME = "transformer"
TITLE = "Character transformer: post-LN vs pre-LN vs pre-RMSNorm vs no norm, with/without warm-up"
CLAIM = "Transformers rely on layer norm, and its placement matters: pre-LN is stable without warm-up where post-LN is not."


def _key(mode: str, warmup: int, lr: float) -> str:
    return f"{mode}@warmup{warmup}@lr{lr:g}"


def _label(mode: str, warmup: int) -> str:
    return f"{LABELS[mode]}, {'warm-up ' + str(warmup) if warmup else 'no warm-up'}"


def train_one(cfg: TransformerConfig, mode: str, warmup: int, lr: float, seed: int, tick=lambda n=1: None) -> Dict:
    corpus = stdlib_corpus(cfg.chars)
    vgen = torch.Generator().manual_seed(0)
    windows = [char_batches(corpus.val, cfg.batch, cfg.seq_len, vgen) for _ in range(cfg.val_batches)]
    gen = seeded(seed)
    model = CharTransformer(VOCAB_SIZE, cfg.d, cfg.layers, cfg.heads, cfg.seq_len, mode)
    opt = adam(model.parameters(), lr, betas=(0.9, 0.98))
    marks, curve, train_losses, timer, diverged = set(checkpoints(cfg.steps, cfg.evals)), [], [], Timer(), False
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, warmup, cfg.steps)
        x, y = char_batches(corpus.train, cfg.batch, cfg.seq_len, gen)
        with timer:
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
            if not torch.isfinite(loss):
                diverged = True
            else:
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        train_losses.append(loss.item())
        if step + 1 in marks:
            if diverged:
                curve.append(math.nan)
            else:
                model.eval()
                with torch.no_grad():
                    val = sum(F.cross_entropy(model(a).reshape(-1, VOCAB_SIZE), b.reshape(-1)).item() for a, b in windows) / len(windows)
                model.train()
                curve.append(val)
        tick()
        if diverged:  # nothing left to learn: finish the bar, keep the curve's length
            tick(cfg.steps - step - 1)
            curve += [math.nan] * (len(marks) - len(curve))
            break
    final = curve[-1]
    diverged = diverged or not math.isfinite(final)
    finite = all(map(math.isfinite, train_losses))
    best, rise = math.inf, 0.0
    for v in train_losses if finite else []:  # a blow-up: the loss climbs above the best it had reached
        best = min(best, v)
        rise = max(rise, v - best)
    spiked = diverged or not finite or rise > cfg.spike
    return {"curve": curve, "final_loss": None if diverged else final, "nonfinite": diverged, "spiked": spiked,
            "peak_loss": max(train_losses) if finite else None, "rise": rise if finite else None, "train_seconds": timer.cpu_seconds}


def _summary(runs: List[Dict]) -> Dict:
    return {"seeds": len(runs), "nonfinite": sum(r["nonfinite"] for r in runs), "spiked": sum(r["spiked"] for r in runs),
            "final_loss": stat_dict([r["final_loss"] for r in runs]), "peak_loss": stat_dict([r["peak_loss"] for r in runs]),
            "rise": stat_dict([r.get("rise") for r in runs]),
            "train_seconds": stat_dict([r["train_seconds"] for r in runs]), "runs": runs}


def run(cfg: TransformerConfig, seeds: Sequence[int], tracker) -> Dict:
    tune_seeds = tuning_seeds(cfg.tune_seeds) if len(cfg.lrs) > 1 else []
    n_arms = len(cfg.modes) * len(cfg.warmups)
    tracker.experiment(NAME, n_arms * (len(cfg.lrs) * len(tune_seeds) + len(seeds)))
    grid, arms, summary = {}, {}, {}
    for warmup in cfg.warmups:
        for mode in cfg.modes:
            for lr in cfg.lrs if tune_seeds else []:
                runs = []
                for seed in tune_seeds:
                    with tracker.run(f"tuning {_label(mode, warmup)}, lr {lr:g}, seed {seed}", cfg.steps) as tick:
                        runs.append(train_one(cfg, mode, warmup, lr, seed, tick))
                grid[_key(mode, warmup, lr)] = {"mode": mode, "warmup": warmup, "lr": lr, **_summary(runs)}
            best = _sweep_summary(grid, mode, warmup, cfg.lrs) if tune_seeds else {"best_lr": cfg.lrs[0], "largest_finite_lr": None}
            summary[f"{mode}@warmup{warmup}"] = best
            runs = []
            for seed in seeds:
                with tracker.run(f"{_label(mode, warmup)}, lr {best['best_lr']:g}, seed {seed}", cfg.steps) as tick:
                    runs.append(train_one(cfg, mode, warmup, best["best_lr"], seed, tick))
            arms[f"{mode}@warmup{warmup}"] = {"mode": mode, "warmup": warmup, "lr": best["best_lr"], **_summary(runs)}
    unstable = sum(g["spiked"] for g in grid.values()) + sum(a["spiked"] for a in arms.values())  # spiked includes non-finite
    post_unstable = (sum(g["spiked"] for g in grid.values() if g["mode"] == "post_ln")
                     + sum(a["spiked"] for a in arms.values() if a["mode"] == "post_ln"))
    return {"steps_at": checkpoints(cfg.steps, cfg.evals), "lrs": list(cfg.lrs), "modes": list(cfg.modes), "warmups": list(cfg.warmups),
            "grid": grid, "arms": arms, "summary": summary, "unstable_runs": unstable, "post_ln_unstable_runs": post_unstable,
            "tune_seeds": tune_seeds, "spike": cfg.spike,
            "scale": {"layers": cfg.layers, "d": cfg.d, "steps": cfg.steps, "seq_len": cfg.seq_len, "batch": cfg.batch}}


def _sweep_summary(grid: Dict, mode: str, warmup: int, lrs: Sequence[float]) -> Dict:
    """Best rate of one (placement, warm-up) arm on the tuning seeds: the lowest mean final loss
    among the rates whose runs all stayed finite; and the largest such rate."""
    finite = [lr for lr in lrs if grid[_key(mode, warmup, lr)]["nonfinite"] == 0 and grid[_key(mode, warmup, lr)]["final_loss"]["n"]]
    best = min(finite, key=lambda lr: (grid[_key(mode, warmup, lr)]["final_loss"]["mean"], lr)) if finite else min(lrs)
    return {"best_lr": best, "largest_finite_lr": max(finite) if finite else None}


def _v(result: Dict, mode: str, warmup: int, metric: str = "final_loss") -> List:
    arm = result["arms"].get(f"{mode}@warmup{warmup}")
    return values(arm["runs"], metric) if arm else []


def _lab(result: Dict, mode: str, warmup: int) -> str:
    arm = result["arms"].get(f"{mode}@warmup{warmup}")
    return f"{_label(mode, warmup)} (lr {arm['lr']:g})" if arm else _label(mode, warmup)


def findings(result: Dict) -> List[Finding]:
    out = []
    if not result["warmups"]:
        return out
    no_w, w = min(result["warmups"]), max(result["warmups"])
    sc = result["scale"]
    ctx = f"{sc['layers']} layers, width {sc['d']}, {sc['steps']} steps, each arm at its tuned rate:"
    metric = "final validation loss (nats/char)"
    if "pre_ln" in result["modes"] and "post_ln" in result["modes"]:
        out.append(compare_equivalence(NAME, "Pre-LN without warm-up is on par with post-LN with warm-up (±0.05)", metric,
                                       _lab(result, "pre_ln", no_w), _v(result, "pre_ln", no_w), _lab(result, "post_ln", w),
                                       _v(result, "post_ln", w), margin=0.05, context=ctx, unit="val loss, nats/char", key="transformer.preln"))
        f = compare(NAME, "Without warm-up post-LN's training loss rises further above its best than pre-LN's",
                    "largest rise of the training loss above its best so far (nats)", _lab(result, "post_ln", no_w),
                    _v(result, "post_ln", no_w, "rise"), _lab(result, "pre_ln", no_w), _v(result, "pre_ln", no_w, "rise"), context=ctx,
                    unit="loss rise, nats")
        if not result.get("post_ln_unstable_runs", result["unstable_runs"]):
            f = f.noted(f"No post-LN run of the grid or the test went non-finite or rose more than {result.get('spike', 0.5):g} nats above "
                        "its best: post-LN's instability without warm-up is not testable at this scale (--full runs deeper and longer).")
        out.append(f)
        if no_w != w:
            out.append(compare(NAME, "Warm-up helps post-LN", metric, _lab(result, "post_ln", w), _v(result, "post_ln", w),
                               _lab(result, "post_ln", no_w), _v(result, "post_ln", no_w), higher_is_better=False, context=ctx,
                               unit="val loss, nats/char"))
    if "pre_ln" in result["modes"] and "none" in result["modes"]:
        for wu in dict.fromkeys((no_w, w)):
            out.append(compare(NAME, f"Pre-LN reaches a lower loss than no norm ({'warm-up' if wu else 'no warm-up'})", metric,
                               _lab(result, "pre_ln", wu), _v(result, "pre_ln", wu), _lab(result, "none", wu), _v(result, "none", wu),
                               higher_is_better=False, context=ctx, unit="val loss, nats/char"))
    return out


def table(result: Dict):
    header = ["placement", "warm-up"] + [f"lr {lr:g} (tuning seeds): loss; non-finite/spiked" for lr in result["lrs"]] + [
        "tuned lr", "test seeds: final loss", "peak train loss", "largest rise", "non-finite", "spiked"]
    rows = []
    for w in result["warmups"]:
        for mode in result["modes"]:
            row = [LABELS[mode], str(w)]
            for lr in result["lrs"]:
                g = result["grid"].get(_key(mode, w, lr))
                row.append(f"{Stat(**g['final_loss']).fmt()}; {g['nonfinite']}/{g['spiked']}" if g else "—")
            a = result["arms"][f"{mode}@warmup{w}"]
            row += [f"{a['lr']:g}", Stat(**a["final_loss"]).fmt(), Stat(**a["peak_loss"]).fmt(),
                    Stat(**a["rise"]).fmt() if "rise" in a else "—", f"{a['nonfinite']}/{a['seeds']}",
                    f"{a['spiked']}/{a['seeds']}"]
            rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["warmups"]), figsize=(4.5 * len(result["warmups"]), 3.5), squeeze=False)
    for ax, w in zip(axes[0], result["warmups"]):
        for mode in result["modes"]:
            grid = [result["grid"].get(_key(mode, w, lr)) for lr in result["lrs"]]
            if not all(grid):
                continue
            means = [min(g["final_loss"]["mean"], 6.0) if g["final_loss"]["n"] else math.nan for g in grid]
            ax.plot(result["lrs"], means, marker="o", label=LABELS[mode])
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (tuning seeds)",
               title="no warm-up" if not w else f"warm-up {w} steps")
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "transformer.png")]


def scale(cfg: TransformerConfig, result: Dict) -> str:
    params = count_params(CharTransformer(VOCAB_SIZE, cfg.d, cfg.layers, cfg.heads, cfg.seq_len, "pre_ln"))
    return (f"{cfg.layers}-layer causal transformer, width {cfg.d}, {cfg.heads} heads ({params:,} parameters); {cfg.steps} Adam steps "
            f"of {cfg.batch} × {cfg.seq_len} characters, warm-up {' or '.join(map(str, cfg.warmups))} steps; {cfg.seeds} test seeds per "
            f"arm at its tuned rate, after the grid of {len(cfg.lrs)} rates ({', '.join(f'{r:g}' for r in cfg.lrs)}) on "
            f"{cfg.tune_seeds} tuning seeds")
