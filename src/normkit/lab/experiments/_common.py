"""Helpers shared by the experiment modules: seeding, curves over seeds, plotting set-up."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from normkit.lab.verdict import Stat

__all__ = ["tune", "tuning_seeds", "TUNE_SEED0", "seeded", "curve_stats", "stat", "stat_dict", "pyplot", "save", "clip_and_step", "Timer", "warm_up", "LABELS", "adam",
           "values", "checkpoints"]

#: Human names for arm keys, used in tables, plots and sentences.
LABELS = {
    "none": "no norm",
    "batch": "BatchNorm",
    "batch_frozen": "BatchNorm (frozen stats)",
    "torch_layer": "torch LayerNorm",
    "layer": "LayerNorm",
    "rms": "RMSNorm",
    "running": "RunningNormalizer",
    "lstm": "LSTM",
    "ln_lstm": "LayerNormLSTM",
    "gru": "GRU",
    "ln_gru": "LayerNormGRU",
    "post_ln": "post-LN",
    "pre_ln": "pre-LN",
    "pre_rms": "pre-RMSNorm",
    "layer2d": "LayerNorm2d (over C)",
    "layer_chw": "LayerNormCHW (over C,H,W)",
    "group": "GroupNorm",
    "weight": "WeightNorm",
}


#: Tuning seeds are 1000, 1001, ...: disjoint from the test seeds 0 .. n-1, so the rate an arm is
#: tested at was not chosen on the data of its test.
TUNE_SEED0 = 1000


def tuning_seeds(k: int) -> List[int]:
    return [TUNE_SEED0 + i for i in range(k)]


def tune(name: str, arms: Sequence[str], lrs: Sequence[float], k: int, ticks: int, tracker,
         score: Callable[[str, float, int, Callable], Optional[float]], label: Callable[[str], str] = lambda a: LABELS[a]) -> Dict[str, Dict]:
    """Each arm's learning rate, chosen on ``k`` tuning seeds: ``score(arm, lr, seed, tick)`` (higher
    is better; ``None`` or non-finite for a failed run, which makes that rate ineligible) for every
    rate of ``lrs``; the rate with the best mean score wins (ties: the smaller rate). Returns per arm
    ``{"lr": chosen, "scores": {str(lr): mean or None}, "seeds": [...]}``. With ``k = 0`` or a
    single rate nothing runs and the first rate is chosen."""
    seeds = tuning_seeds(k)
    out: Dict[str, Dict] = {}
    for arm in arms:
        means: Dict[str, Optional[float]] = {}
        if k == 0 or len(lrs) == 1:
            out[arm] = {"lr": lrs[0], "scores": {}, "seeds": []}
            continue
        for lr in lrs:
            vals = []
            for seed in seeds:
                with tracker.run(f"tuning {label(arm)}, lr {lr:g}, seed {seed}", ticks) as tick:
                    vals.append(score(arm, lr, seed, tick))
            ok = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
            means[f"{lr:g}"] = sum(ok) / len(ok) if len(ok) == len(vals) else None
        eligible = [lr for lr in lrs if means[f"{lr:g}"] is not None]
        best = max(eligible, key=lambda lr: (means[f"{lr:g}"], -lr)) if eligible else min(lrs)
        out[arm] = {"lr": best, "scores": means, "seeds": seeds}
        tracker.log(f"{name}: {label(arm)} tuned to lr {best:g}")
    return out


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """Adam with PyTorch's fused CPU/GPU implementation: one kernel for all parameters instead
    of a Python loop over them (the lab's models are small, so the loop was 20-40 % of a step)."""
    return torch.optim.Adam(params, lr=lr, fused=True, **kwargs)


def values(runs: Sequence[Dict], key: str) -> List[Optional[float]]:
    """``runs[i][key]`` for every run, in seed order (what the paired tests pair on)."""
    return [r.get(key) for r in runs]


def checkpoints(steps: int, evals: int) -> List[int]:
    """``evals`` evaluation steps spread evenly over ``steps`` (the last one is ``steps``)."""
    return sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows of ``x`` whose argmax prediction is ``y``, in eval mode (train mode is
    restored afterwards)."""
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


def seeded(seed: int) -> torch.Generator:
    """Seed torch's global generator (initialization, dropout) and return a data-order generator."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(10_007 + seed)


def stat(values: Sequence[Optional[float]]) -> Stat:
    return Stat.of(values)


def stat_dict(values: Sequence[Optional[float]]) -> Dict[str, float]:
    return Stat.of(values).to_dict()


def curve_stats(curves: Sequence[Sequence[Optional[float]]]) -> Dict[str, List[float]]:
    """Pointwise mean and std over seeds of equally long curves (non-finite points left out)."""
    if not curves:
        return {"mean": [], "std": []}
    points = [Stat.of(col) for col in zip(*curves)]
    return {"mean": [p.mean for p in points], "std": [p.std for p in points]}


def clip_and_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float = 0.0) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def warm_up(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One untimed forward and backward, so that one-time costs (JIT compilation of a kernel,
    lazy initialization) do not land in the first seed's training time."""
    model(x).float().sum().backward()


def run_arms(name: str, arms: Sequence[str], seeds: Sequence[int], ticks: int, tracker, train_one: Callable,
             warm: Optional[Callable] = None) -> Tuple[Dict[str, List[Dict]], Dict[str, str]]:
    """``train_one(arm, seed, tick)`` for every arm and seed, each under its own progress bar of
    ``ticks`` steps. ``warm(arm)``, if given, runs once before an arm's first seed (see
    :func:`warm_up`). An arm whose model cannot be built (``ImportError``: an optional
    dependency is missing) is skipped with the reason and its remaining seeds are not run.
    Returns ``(runs per arm, reason per skipped arm)``, arms in the given order."""
    runs_by_arm: Dict[str, List[Dict]] = {}
    skipped: Dict[str, str] = {}
    for arm in arms:
        runs: List[Dict] = []
        for seed in seeds:
            with tracker.run(f"{LABELS[arm]}, seed {seed}", ticks) as tick:
                try:
                    if warm is not None and not runs:
                        warm(arm)
                    runs.append(train_one(arm, seed, tick))
                except ImportError as exc:
                    skipped[arm] = str(exc)
                    tracker.log(f"[yellow]{name}: skipping {LABELS[arm]}: {exc}[/]")
                    break
        if arm not in skipped:
            runs_by_arm[arm] = runs
    return runs_by_arm, skipped


class Timer:
    """Seconds of training only (evaluation excluded): ``with timer: ...``.

    ``seconds`` is wall-clock time; ``cpu_seconds`` the CPU time of this process
    (:func:`time.process_time`, all its threads). The lab's time comparisons use the CPU time:
    on a machine shared with other jobs the wall clock mostly measures the neighbours, while
    the CPU time of a single-threaded run is the compute it needed (on an idle machine the two
    agree).
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def __enter__(self) -> "Timer":
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds += time.perf_counter() - self._start
        self.cpu_seconds += time.process_time() - self._cpu


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save(fig, out_dir: Path, name: str) -> Path:
    path = Path(out_dir) / name
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def band(ax, x, curve: Dict[str, List[float]], label: str) -> None:
    """Mean line with a ±1 std band."""
    mean = [math.nan if m is None else m for m in curve["mean"]]
    std = [0.0 if (s is None or not math.isfinite(s)) else s for s in curve["std"]]
    (line,) = ax.plot(x, mean, label=label)
    ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2, color=line.get_color())
