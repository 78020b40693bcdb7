r"""Character-level language model on the standard-library corpus: LSTM vs LayerNormLSTM.

Validation bits per character, :math:`\mathrm{bpc} = \mathrm{CE}_\text{nats} / \ln 2`, on fixed
validation windows, measured at checkpoints against optimizer steps and against the training
time (evaluation excluded), so that both "better per step" and "better per second" can be read
off. Training time is the process's CPU time (see :class:`~normkit.lab.experiments._common.Timer`:
robust to other jobs on a shared machine, equal to wall-clock on an idle one); the wall-clock
time is recorded beside it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from normkit.lab.config import LSTMConfig
from normkit.lab.data import VOCAB_SIZE, char_batches, stdlib_corpus
from normkit.lab.experiments._common import (
    LABELS,
    Timer,
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
from normkit.lab.models import CharRNN, count_params
from normkit.lab.verdict import Finding, Stat, compare

NAME = "lstm"
TITLE = "Character language model (stdlib source): LSTM vs LayerNormLSTM"
CLAIM = "Layer norm especially helps recurrent networks: an LSTM with layer norm trains faster."


def _val_bpc(model, windows) -> float:
    model.eval()
    with torch.no_grad():
        nats = sum(F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1)).item() for x, y in windows) / len(windows)
    model.train()
    return nats / math.log(2)


def train_one(cfg: LSTMConfig, arm: str, seed: int, tick=lambda n=1: None, lr: float = 3e-3) -> Dict:
    corpus = stdlib_corpus(cfg.chars)
    vgen = torch.Generator().manual_seed(0)  # the same validation windows for every run
    windows = [char_batches(corpus.val, cfg.batch, cfg.seq_len, vgen) for _ in range(cfg.val_batches)]
    gen = seeded(seed)
    model = CharRNN(arm, VOCAB_SIZE, cfg.embed, cfg.hidden)
    opt = adam(model.parameters(), lr)
    marks, bpc, secs, timer = set(checkpoints(cfg.steps, cfg.evals)), [], [], Timer()
    for step in range(1, cfg.steps + 1):
        x, y = char_batches(corpus.train, cfg.batch, cfg.seq_len, gen)
        with timer:
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
            clip_and_step(model, opt, loss, cfg.clip)
        if step in marks:
            bpc.append(_val_bpc(model, windows))
            secs.append(timer.cpu_seconds)
        tick()
    return {"bpc": bpc, "seconds": secs, "final_bpc": bpc[-1], "train_seconds": timer.cpu_seconds, "wall_seconds": timer.seconds}


def _score(cfg: LSTMConfig):
    """Tuning score: minus the final validation bits/char (a diverged run scores None)."""
    def score(arm, lr, seed, tick):
        bpc = train_one(cfg, arm, seed, tick, lr)["final_bpc"]
        return -bpc if math.isfinite(bpc) else None
    return score


def run(cfg: LSTMConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.arms) * (len(seeds) + (len(cfg.lrs) * cfg.tune_seeds if len(cfg.lrs) > 1 else 0)))
    tuned = tune(NAME, cfg.arms, cfg.lrs, cfg.tune_seeds, cfg.steps, tracker, _score(cfg))
    corpus = stdlib_corpus(cfg.chars)
    runs_by_arm, skipped = run_arms(
        NAME, cfg.arms, seeds, cfg.steps, tracker,
        lambda arm, seed, tick: train_one(cfg, arm, seed, tick, tuned[arm]["lr"]),
        warm=lambda arm: warm_up(CharRNN(arm, VOCAB_SIZE, cfg.embed, cfg.hidden), torch.zeros(2, 3, dtype=torch.long)),
    )
    arms = {
        arm: {
            "lr": tuned[arm]["lr"],
            "tuning": tuned[arm],
            "final_bpc": stat_dict([r["final_bpc"] for r in runs]),
            "train_seconds": stat_dict([r["train_seconds"] for r in runs]),
            "wall_seconds": stat_dict([r["wall_seconds"] for r in runs]),
            "curve": curve_stats([r["bpc"] for r in runs]),
            "seconds_curve": curve_stats([r["seconds"] for r in runs]),
            "runs": runs,
        }
        for arm, runs in runs_by_arm.items()
    }
    return {
        "steps_at": checkpoints(cfg.steps, cfg.evals),
        "arms": arms,
        "skipped": skipped,
        "corpus": {"files": list(corpus.files), "sha256": corpus.sha256, "chars": corpus.chars},
    }


def time_to_reach(run: Dict, target: float) -> float:
    r"""Training (CPU) seconds a run needed to reach validation bpc ``target``: linear interpolation
    between checkpoints, starting from the uniform model's :math:`\log_2 V` at time 0 (``nan``
    if it never got there)."""
    t0, b0 = 0.0, math.log2(VOCAB_SIZE)
    if target >= b0:  # no worse than the uniform model: reached before training
        return 0.0
    for b, t in zip(run["bpc"], run["seconds"]):
        if b <= target:
            return t0 + (t - t0) * (b0 - target) / (b0 - b) if b0 > b else t
        t0, b0 = t, b
    return math.nan


def findings(result: Dict) -> List[Finding]:
    arms = result["arms"]
    get = lambda a, m: values(arms[a]["runs"], m) if a in arms else []  # noqa: E731
    lab = lambda a: f"{LABELS[a]} (lr {arms[a]['lr']:g})" if a in arms and "lr" in arms[a] else LABELS[a]  # noqa: E731
    steps = result["steps_at"][-1] if result["steps_at"] else 0
    out = [compare(NAME, f"Layer norm helps an LSTM language model early in training ({steps} steps)",
                   f"validation bits per character after {steps} steps", lab("ln_lstm"), get("ln_lstm", "final_bpc"), lab("lstm"),
                   get("lstm", "final_bpc"), higher_is_better=False, unit="val bits/char", key="lstm.early",
                   context="Each arm at its tuned rate;")]
    if "lstm" in arms and "ln_lstm" in arms:
        # per second: training time each run needed to reach a bpc that every run reached
        target = max(r["final_bpc"] for a in ("lstm", "ln_lstm") for r in arms[a]["runs"])
        ln = [time_to_reach(r, target) for r in arms["ln_lstm"]["runs"]]
        base = [time_to_reach(r, target) for r in arms["lstm"]["runs"]]
        out.append(compare(NAME, "Layer norm helps an LSTM language model (per second of training)", "training CPU seconds to reach it",
                           "LayerNormLSTM", ln, "LSTM", base, higher_is_better=False, digits=2, unit=f"s to reach {target:.2f} bits/char",
                           context=f"Target: validation {target:.3f} bits/char (the worst final value of any run);"))
    if "ln_lstm" in result["skipped"]:
        f = out[0]
        out[0] = f.noted(f"(LayerNormLSTM skipped: {result['skipped']['ln_lstm']})")
    return out


def table(result: Dict):
    header = ["model", "final val bpc", "training CPU time (s)", "training wall time (s)"]
    rows = [[LABELS[a], Stat(**r["final_bpc"]).fmt(), Stat(**r["train_seconds"]).fmt(1), Stat(**r["wall_seconds"]).fmt(1)]
            for a, r in result["arms"].items()]
    rows += [[LABELS[a], f"skipped: {why}"[:60], "", ""] for a, why in result["skipped"].items()]
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for arm, r in result["arms"].items():
        band(a1, result["steps_at"], r["curve"], LABELS[arm])
        a2.plot(r["seconds_curve"]["mean"], r["curve"]["mean"], marker="o", label=LABELS[arm])
    a1.set(xlabel="step", ylabel="validation bits/char", title="vs steps")
    a2.set(xlabel="training time (CPU s)", ylabel="validation bits/char", title="vs time (mean over seeds)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    return [save(fig, out_dir, "lstm.png")]


def scale(cfg: LSTMConfig, result: Dict) -> str:
    params = count_params(CharRNN("ln_lstm", VOCAB_SIZE, cfg.embed, cfg.hidden))
    return (f"1-layer LSTM, hidden {cfg.hidden} ({params:,} parameters with layer norm); {cfg.steps} Adam steps of {cfg.batch} × "
            f"{cfg.seq_len} characters (early training, far from converged); corpus of {cfg.chars:,} characters of Python's standard "
            f"library; {cfg.seeds} test seeds per arm, after {cfg.tune_seeds} tuning seeds × {len(cfg.lrs)} rates "
            f"({', '.join(f'{r:g}' for r in cfg.lrs)})")
