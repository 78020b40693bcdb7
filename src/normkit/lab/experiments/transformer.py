r"""A small causal character transformer: norm placement × warm-up × learning rate.

post-LN, pre-LN (normkit's fused ``residual=``/``prenorm=True``), no norm (and pre-RMSNorm in
``--full``), each with and without linear warm-up, each on a sweep of Adam learning rates, so
that every arm is judged at its own best rate (Xiong et al. 2020: post-LN needs warm-up at a
high rate; pre-LN trains without it). Cosine decay to a tenth after the warm-up for every arm.

Words follow the numbers. A run **diverged** if its training loss became non-finite; it
**stalled** if its final validation loss is not below the **unigram threshold**, the
cross-entropy of the corpus' own character frequencies (what a model that ignores all context
achieves). Either is a *failed* run. An arm's **largest stable learning rate** is the largest
rate of the sweep at which none of its seeds failed; its **best learning rate** the one with the
lowest mean final loss among those.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import TransformerConfig
from normkit.lab.data import VOCAB_SIZE, char_batches, stdlib_corpus, unigram_nats
from normkit.lab.experiments._common import (
    LABELS,
    Timer,
    adam,
    checkpoints,
    pyplot,
    save,
    seeded,
    stat_dict,
    values,
)
from normkit.lab.models import CharTransformer, lr_at
from normkit.lab.verdict import Finding, Stat, compare, compare_failures, not_measured

NAME = "transformer"
TITLE = "Character transformer: post-LN vs pre-LN vs pre-RMSNorm vs no norm, with/without warm-up"
CLAIM = "Transformers rely on layer norm, and its placement matters: pre-LN is stable without warm-up where post-LN is not."


def _key(mode: str, warmup: int, lr: float) -> str:
    return f"{mode}@warmup{warmup}@lr{lr:g}"


def _label(mode: str, warmup: int) -> str:
    return f"{LABELS[mode]}, {'warm-up ' + str(warmup) if warmup else 'no warm-up'}"


def train_one(cfg: TransformerConfig, mode: str, warmup: int, lr: float, seed: int, threshold: float, tick=lambda n=1: None) -> Dict:
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
    status = "diverged" if diverged else "stalled" if final >= threshold else "ok"
    return {"curve": curve, "final_loss": None if diverged else final, "status": status, "failed": status != "ok",
            "nonfinite": diverged, "max_train_loss": max(train_losses), "train_seconds": timer.cpu_seconds}


def run(cfg: TransformerConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.modes) * len(cfg.warmups) * len(cfg.lrs) * len(seeds))
    threshold = unigram_nats(stdlib_corpus(cfg.chars).train)
    arms = {}
    for warmup in cfg.warmups:
        for mode in cfg.modes:
            for lr in cfg.lrs:
                runs = []
                for seed in seeds:
                    with tracker.run(f"{_label(mode, warmup)}, lr {lr:g}, seed {seed}", cfg.steps) as tick:
                        runs.append(train_one(cfg, mode, warmup, lr, seed, threshold, tick))
                arms[_key(mode, warmup, lr)] = {
                    "mode": mode, "warmup": warmup, "lr": lr, "seeds": len(runs),
                    "diverged": sum(r["status"] == "diverged" for r in runs),
                    "stalled": sum(r["status"] == "stalled" for r in runs),
                    "final_loss": stat_dict([r["final_loss"] for r in runs]),
                    "train_seconds": stat_dict([r["train_seconds"] for r in runs]),
                    "runs": runs,
                }
    summary = {f"{mode}@warmup{w}": _sweep_summary(arms, mode, w, cfg.lrs) for mode in cfg.modes for w in cfg.warmups}
    return {"steps_at": checkpoints(cfg.steps, cfg.evals), "threshold": threshold, "lrs": list(cfg.lrs),
            "modes": list(cfg.modes), "warmups": list(cfg.warmups), "arms": arms, "summary": summary}


def _sweep_summary(arms: Dict, mode: str, warmup: int, lrs: Sequence[float]) -> Dict:
    """Largest stable and best learning rate of one (placement, warm-up) arm."""
    stable = [lr for lr in lrs if arms[_key(mode, warmup, lr)]["diverged"] + arms[_key(mode, warmup, lr)]["stalled"] == 0]
    best = min(stable, key=lambda lr: arms[_key(mode, warmup, lr)]["final_loss"]["mean"]) if stable else None
    return {"largest_stable_lr": max(stable) if stable else None, "best_lr": best}


def _failed(arm: Dict) -> int:
    return arm["diverged"] + arm["stalled"]


def _how(arm: Dict) -> str:
    return f"{arm['diverged']} diverged, {arm['stalled']} stalled"


def findings(result: Dict) -> List[Finding]:
    arms, out, summary = result["arms"], [], result["summary"]
    no_w, w, top = min(result["warmups"]), max(result["warmups"]), max(result["lrs"])
    words = (f"failed = diverged (non-finite loss) or stalled (final loss ≥ the unigram threshold "
             f"{result['threshold']:.3f} nats/char)")
    if all(_key(m, no_w, top) in arms for m in ("pre_ln", "post_ln")):
        pre, post = arms[_key("pre_ln", no_w, top)], arms[_key("post_ln", no_w, top)]
        out.append(compare_failures(
            NAME, "Pre-LN trains without warm-up at a learning rate where post-LN does not", "pre-LN", _failed(pre), pre["seeds"],
            "post-LN", _failed(post), post["seeds"], what="failed",
            context=f"At the sweep's largest learning rate {top:g}, no warm-up ({words}; pre-LN {_how(pre)}, post-LN {_how(post)}),"))
    if w != no_w and _key("post_ln", w, top) in arms:
        with_w, without = arms[_key("post_ln", w, top)], arms[_key("post_ln", no_w, top)]
        out.append(compare_failures(
            NAME, "Warm-up rescues post-LN at a high learning rate", f"post-LN, warm-up {w}", _failed(with_w), with_w["seeds"],
            "post-LN, no warm-up", _failed(without), without["seeds"], what="failed",
            context=f"At learning rate {top:g} ({words}; with warm-up {_how(with_w)}, without {_how(without)}),"))
    for wu in dict.fromkeys((no_w, w)):
        claim = f"Transformers need normalization ({'with warm-up' if wu else 'without warm-up'})"
        best_pre, best_none = summary.get(f"pre_ln@warmup{wu}", {}).get("best_lr"), summary.get(f"none@warmup{wu}", {}).get("best_lr")
        if best_pre is None or best_none is None:
            out.append(not_measured(NAME, claim, f"an arm has no learning rate at which all seeds trained (pre-LN best: {best_pre}, no norm best: {best_none})"))
            continue
        out.append(compare(
            NAME, claim, "final validation loss (nats/char)",
            f"pre-LN (lr {best_pre:g})", values(arms[_key("pre_ln", wu, best_pre)]["runs"], "final_loss"),
            f"no norm (lr {best_none:g})", values(arms[_key("none", wu, best_none)]["runs"], "final_loss"),
            higher_is_better=False, unit="val loss, nats/char",
            context=(f"{'With warm-up ' + str(wu) if wu else 'Without warm-up'}, each arm at its best learning rate of the sweep "
                     f"{', '.join(format(x, 'g') for x in result['lrs'])} (chosen on the same seeds, for both arms alike),")))
    return out


def table(result: Dict):
    header = ["placement", "warm-up"] + [f"lr {lr:g}: final loss (diverged/stalled)" for lr in result["lrs"]] + ["largest stable lr", "best lr"]
    rows = []
    for mode in result["modes"]:
        for w in result["warmups"]:
            row = [LABELS[mode], str(w) if w else "none"]
            for lr in result["lrs"]:
                arm = result["arms"][_key(mode, w, lr)]
                row.append(f"{Stat(**arm['final_loss']).fmt()} ({arm['diverged']}/{arm['stalled']} of {arm['seeds']})")
            s = result["summary"][f"{mode}@warmup{w}"]
            row += [format(s["largest_stable_lr"], "g") if s["largest_stable_lr"] else "none", format(s["best_lr"], "g") if s["best_lr"] else "none"]
            rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["warmups"]), figsize=(4.5 * len(result["warmups"]), 3.5), squeeze=False)
    for ax, w in zip(axes[0], result["warmups"]):
        for mode in result["modes"]:
            arms = [result["arms"][_key(mode, w, lr)] for lr in result["lrs"]]
            means = [min(a["final_loss"]["mean"], 6.0) if a["final_loss"]["n"] else math.nan for a in arms]
            stds = [a["final_loss"]["std"] if a["final_loss"]["n"] else 0.0 for a in arms]
            line = ax.errorbar(result["lrs"], means, yerr=stds, marker="o", capsize=3, label=LABELS[mode])
            for lr, a, m in zip(result["lrs"], arms, means):
                if _failed(a):
                    ax.annotate(f"{a['diverged']}d/{a['stalled']}s", (lr, m if math.isfinite(m) else 5.8), fontsize=7,
                                color=line[0].get_color(), xytext=(3, 3), textcoords="offset points")
        ax.axhline(result["threshold"], color="k", linestyle="--", linewidth=1, label="unigram threshold (stalled above)")
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (nats/char)",
               title="no warm-up" if not w else f"warm-up {w} steps")
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "transformer.png")]
