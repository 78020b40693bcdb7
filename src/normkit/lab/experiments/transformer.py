r"""A small causal character transformer: norm placement × learning-rate warm-up.

post-LN, pre-LN (normkit's fused ``residual=``/``prenorm=True``), pre-RMSNorm and no norm,
each with and without linear warm-up, at a learning rate chosen high on purpose (Xiong et al.
2020: post-LN needs warm-up; pre-LN trains without it). Cosine decay to a tenth after the
warm-up for every arm.

A run *fails* if its loss becomes non-finite or its final validation loss is not below the
**unigram threshold**: the cross-entropy of the corpus' own character frequencies, what a
model that ignores all context achieves (a collapsed or diverged model sits at or above it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import TransformerConfig
from normkit.lab.data import VOCAB_SIZE, char_batches, stdlib_corpus, unigram_nats
from normkit.lab.experiments._common import LABELS, Timer, band, curve_stats, pyplot, save, seeded, stat_dict
from normkit.lab.experiments.lstm import checkpoints
from normkit.lab.models import CharTransformer, lr_at
from normkit.lab.verdict import Finding, Stat, compare

NAME = "transformer"
TITLE = "Character transformer: post-LN vs pre-LN vs pre-RMSNorm vs no norm, with/without warm-up"
CLAIM = "Transformers rely on layer norm, and its placement matters: pre-LN is stable without warm-up where post-LN is not."


def _key(mode: str, warmup: int) -> str:
    return f"{mode}@warmup{warmup}"


def _label(mode: str, warmup: int) -> str:
    return f"{LABELS[mode]}, {'warm-up ' + str(warmup) if warmup else 'no warm-up'}"


def train_one(cfg: TransformerConfig, mode: str, warmup: int, seed: int, threshold: float, tick=lambda n=1: None) -> Dict:
    corpus = stdlib_corpus(cfg.chars)
    vgen = torch.Generator().manual_seed(0)
    windows = [char_batches(corpus.val, cfg.batch, cfg.seq_len, vgen) for _ in range(cfg.val_batches)]
    gen = seeded(seed)
    model = CharTransformer(VOCAB_SIZE, cfg.d, cfg.layers, cfg.heads, cfg.seq_len, mode)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    marks, curve, train_losses, timer, diverged = set(checkpoints(cfg.steps, cfg.evals)), [], [], Timer(), False
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.lr, warmup, cfg.steps)
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
    failed = diverged or not math.isfinite(final) or final >= threshold
    return {"curve": curve, "final_loss": final if math.isfinite(final) else None, "failed": failed, "nonfinite": diverged,
            "max_train_loss": max(train_losses), "train_seconds": timer.cpu_seconds}


def run(cfg: TransformerConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.modes) * len(cfg.warmups) * len(seeds))
    threshold = unigram_nats(stdlib_corpus(cfg.chars).train)
    arms = {}
    for warmup in cfg.warmups:
        for mode in cfg.modes:
            runs = []
            for seed in seeds:
                with tracker.run(f"{_label(mode, warmup)}, seed {seed}", cfg.steps) as tick:
                    runs.append(train_one(cfg, mode, warmup, seed, threshold, tick))
            arms[_key(mode, warmup)] = {
                "mode": mode,
                "warmup": warmup,
                "failures": sum(r["failed"] for r in runs),
                "seeds": len(runs),
                # a failed run counts as failed (non-finite) in the loss statistics
                "final_loss": stat_dict([math.nan if r["failed"] else r["final_loss"] for r in runs]),
                "final_loss_all": stat_dict([r["final_loss"] for r in runs]),
                "train_seconds": stat_dict([r["train_seconds"] for r in runs]),
                "curve": curve_stats([r["curve"] for r in runs]),
                "runs": runs,
            }
    return {"steps_at": checkpoints(cfg.steps, cfg.evals), "threshold": threshold, "lr": cfg.lr,
            "modes": list(cfg.modes), "warmups": list(cfg.warmups), "arms": arms}


def findings(result: Dict) -> List[Finding]:
    arms, out = result["arms"], []
    no_w, w = min(result["warmups"]), max(result["warmups"])
    get = lambda m, wu: Stat(**arms[_key(m, wu)]["final_loss"]) if _key(m, wu) in arms else Stat.of([])  # noqa: E731
    fails = lambda m, wu: f"{arms[_key(m, wu)]['failures']}/{arms[_key(m, wu)]['seeds']}" if _key(m, wu) in arms else "n/a"  # noqa: E731
    ctx = (f"At learning rate {result['lr']:g} without warm-up (failed runs: pre-LN {fails('pre_ln', no_w)}, "
           f"post-LN {fails('post_ln', no_w)}; failure = non-finite or final loss ≥ the unigram threshold {result['threshold']:.3f}),")
    out.append(compare(NAME, "Pre-LN trains stably without warm-up where post-LN does not", "final validation loss (nats/char; failed runs count as failed)",
                       "pre-LN", get("pre_ln", no_w), "post-LN", get("post_ln", no_w), higher_is_better=False, context=ctx,
                       unit="val loss, nats/char"))
    if w != no_w:
        out.append(compare(NAME, "Warm-up rescues post-LN", "final validation loss (nats/char)",
                           f"post-LN with warm-up {w}", get("post_ln", w), "post-LN without warm-up", get("post_ln", no_w), higher_is_better=False, unit="val loss, nats/char",
                           context=f"Failed runs: with warm-up {fails('post_ln', w)}, without {fails('post_ln', no_w)};"))
    out.append(compare(NAME, "Transformers need normalization", "final validation loss (nats/char)",
                       "pre-LN", get("pre_ln", no_w), "no norm", get("none", no_w), higher_is_better=False, unit="val loss, nats/char",
                       context=f"Without warm-up (no-norm failed runs: {fails('none', no_w)}),"))
    return out


def table(result: Dict):
    header = ["norm placement"] + [f"{'warm-up ' + str(w) if w else 'no warm-up'}: final loss (failed)" for w in result["warmups"]]
    rows = []
    for mode in result["modes"]:
        row = [LABELS[mode]]
        for w in result["warmups"]:
            arm = result["arms"][_key(mode, w)]
            row.append(f"{Stat(**arm['final_loss_all']).fmt()} ({arm['failures']}/{arm['seeds']} failed)")
        rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(result["warmups"]), figsize=(4.5 * len(result["warmups"]), 3.5), squeeze=False)
    for ax, w in zip(axes[0], result["warmups"]):
        for mode in result["modes"]:
            curve = result["arms"][_key(mode, w)]["curve"]
            clipped = {"mean": [min(m, 6.0) if math.isfinite(m) else math.nan for m in curve["mean"]], "std": curve["std"]}
            band(ax, result["steps_at"], clipped, LABELS[mode])
        ax.axhline(result["threshold"], color="k", linestyle="--", linewidth=1, label="unigram threshold")
        ax.set(xlabel="step", ylabel="validation loss (nats/char, clipped at 6)", title="no warm-up" if not w else f"warm-up {w} steps", ylim=(1.5, 6.2))
        ax.legend(fontsize=7)
    return [save(fig, out_dir, "transformer.png")]
