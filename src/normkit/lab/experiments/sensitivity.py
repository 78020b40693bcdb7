r"""Sensitivity to the norm's own hyperparameters: where layer norm helps, and where a bad choice
of gain, bias, eps or learning rate harms.

One small task (a 4-layer ReLU MLP on digits, batch 32, Adam), one factor at a time around the
defaults :math:`\gamma_0 = 1`, :math:`\beta_0 = 0`, :math:`\epsilon = 10^{-5}`, lr :math:`10^{-3}`,
for LayerNorm, RMSNorm (no bias) and no norm (learning rate only). In
:math:`h = \mathrm{relu}(\gamma \hat a + \beta)`:

- the gain initialization :math:`\gamma_0` sets the scale of every pre-activation, as a bad weight
  initialization does without a norm (:math:`\gamma_0 = 10`: activations 10x larger at every layer);
- the bias initialization :math:`\beta_0 = -1` puts about 84 % of the normalized units below zero at
  the start (dead ReLUs), :math:`+1` makes them nearly linear;
- :math:`\epsilon` is negligible while :math:`\epsilon \ll \mathrm{Var}[a]`; at :math:`10^{-1}` it
  shrinks units whose summed inputs have a small variance (no longer a normalization).

For a given seed every setting starts from the same (He-initialized) Linear weights and sees the
same minibatches (the norm's parameters consume no random numbers), so the comparisons are
paired. Each norm's default Adam rate is its best of ``cfg.tune_lrs`` on the tuning seeds (no
norm's too, so "layer norm helps" is measured against no norm at its own best rate); the gain,
bias and eps factors run at that norm's rate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import normkit
from normkit.lab.config import SensitivityConfig
from normkit.lab.data import digits
from normkit.lab.experiments._common import (
    LABELS,
    Timer,
    adam,
    clip_and_step,
    pyplot,
    save,
    seeded,
    stat_dict,
    tune,
    values,
)
from normkit.lab.models import MLP, count_params
from normkit.lab.verdict import Finding, Stat, compare, compare_equivalence, not_measured

NAME = "sensitivity"
TITLE = "Sensitivity: gain/bias initialization, eps and learning rate for LayerNorm, RMSNorm, no norm"
CLAIM = "Layer norm is sensitive to its hyperparameters, such as the gain and bias: chosen badly, they can harm the model."

DEFAULT_EPS = 1e-5  # normkit/torch LayerNorm's default, used for RMSNorm here too so that eps means the same


def settings(cfg: SensitivityConfig) -> List[Tuple[str, str, Dict]]:
    """``(norm, setting name, overrides)`` for every run configuration, one factor at a time."""
    out = [(n, "default", {}) for n in cfg.norms]
    for n in cfg.norms:
        if n == "none":
            continue
        out += [(n, f"gain {g:g}", {"gain": g}) for g in cfg.gains]
        if n == "layer":
            out += [(n, f"bias {b:+g}", {"bias": b}) for b in cfg.biases]
        out += [(n, f"eps {e:g}", {"eps": e}) for e in cfg.eps]
    out += [(n, f"lr {lr:g}", {"lr": lr}) for n in cfg.norms for lr in cfg.lrs]
    return out


def _key(norm: str, setting: str) -> str:
    return f"{norm}@{setting}"


def build(cfg: SensitivityConfig, norm: str, gain: float = 1.0, bias: float = 0.0, eps: float = DEFAULT_EPS) -> torch.nn.Module:
    """The MLP with every norm layer's eps set and its gain/bias initialized to constants."""
    model = MLP(64, cfg.width, cfg.depth, 10, norm)
    for m in model.modules():
        if isinstance(m, (normkit.nn.LayerNorm, normkit.nn.RMSNorm)):
            m.eps = eps
            with torch.no_grad():
                m.weight.fill_(gain)
                if getattr(m, "bias", None) is not None:
                    m.bias.fill_(bias)
    return model


def train_one(cfg: SensitivityConfig, norm: str, overrides: Dict, seed: int, tick=lambda n=1: None, lr: float = 1e-3) -> Dict:
    data = digits()
    gen = seeded(seed)
    model = build(cfg, norm, **{k: v for k, v in overrides.items() if k != "lr"})
    opt = adam(model.parameters(), overrides.get("lr", lr))
    timer, losses = Timer(), []
    for _ in range(cfg.steps):
        idx = torch.randint(0, data.x_train.shape[0], (cfg.batch,), generator=gen)
        with timer:
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            clip_and_step(model, opt, loss)
        losses.append(loss.item())
        tick()
    model.eval()
    with torch.no_grad():
        acc = (model(data.x_test).argmax(-1) == data.y_test).float().mean().item()
    finite = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    return {"final_acc": acc if finite else None, "last_loss": losses[-1] if finite else None, "train_seconds": timer.cpu_seconds}


def run(cfg: SensitivityConfig, seeds: Sequence[int], tracker) -> Dict:
    todo = settings(cfg)
    tracker.experiment(NAME, len(todo) * len(seeds) + len(cfg.norms) * (len(cfg.tune_lrs) * cfg.tune_seeds if len(cfg.tune_lrs) > 1 else 0))
    tuned = tune(NAME, cfg.norms, cfg.tune_lrs, cfg.tune_seeds, cfg.steps, tracker,
                 lambda norm, lr, seed, tick: train_one(cfg, norm, {}, seed, tick, lr)["final_acc"])
    arms = {}
    for norm, name, overrides in todo:
        runs, lr = [], overrides.get("lr", tuned[norm]["lr"])
        for seed in seeds:
            with tracker.run(f"{LABELS[norm]}, {name}, seed {seed}", cfg.steps) as tick:
                runs.append(train_one(cfg, norm, overrides, seed, tick, tuned[norm]["lr"]))
        arms[_key(norm, name)] = {"norm": norm, "setting": name, "lr": lr, "final_acc": stat_dict(values(runs, "final_acc")), "runs": runs}
    return {"norms": list(cfg.norms), "settings": list(dict.fromkeys(name for _, name, _ in todo)), "arms": arms,
            "base_lr": {n: tuned[n]["lr"] for n in cfg.norms}, "tuning": tuned, "lrs": list(cfg.lrs)}


def _v(result: Dict, norm: str, setting: str) -> List:
    arm = result["arms"].get(_key(norm, setting))
    return values(arm["runs"], "final_acc") if arm else []


def _harm(result: Dict, setting: str, what: str) -> Finding:
    claim = f"A {what} harms layer norm"
    if _key("layer", setting) not in result["arms"]:
        return not_measured(NAME, claim, f"setting {setting!r} was not run")
    return compare(NAME, claim, "final test accuracy", "LayerNorm, defaults", _v(result, "layer", "default"),
                   f"LayerNorm, {setting}", _v(result, "layer", setting), unit="final test acc",
                   context=f"The claim holds if the default beats {setting} (all else at the defaults);")


def _base(result: Dict, norm: str) -> str:
    lr = result["base_lr"].get(norm) if isinstance(result["base_lr"], dict) else result["base_lr"]
    return f"{LABELS[norm]} (lr {lr:g})"


def findings(result: Dict) -> List[Finding]:
    out = []
    if "rms" in result["norms"]:
        out.append(compare_equivalence(NAME, "RMSNorm is on par with LayerNorm (±0.02)", "final test accuracy", _base(result, "rms"),
                                       _v(result, "rms", "default"), _base(result, "layer"), _v(result, "layer", "default"), margin=0.02,
                                       unit="final test acc", key="sensitivity.rms", context="Both at their defaults and tuned rates:"))
    out.append(compare(NAME, "Layer norm helps over no norm, each at its tuned rate", "final test accuracy", _base(result, "layer"),
                       _v(result, "layer", "default"), _base(result, "none"), _v(result, "none", "default"), unit="final test acc",
                       context=f"A {len(result['arms'])}-setting sweep's reference point:"))
    gains = [s for s in result["settings"] if s.startswith("gain")]
    biases = [s for s in result["settings"] if s.startswith("bias -")]
    eps = [s for s in result["settings"] if s.startswith("eps")]
    big, small = [s for s in gains if float(s.split()[1]) > 1], [s for s in gains if float(s.split()[1]) < 1]
    if big:
        out.append(_harm(result, max(big, key=lambda s: float(s.split()[1])), "large gain initialization"))
    if small:
        out.append(_harm(result, min(small, key=lambda s: float(s.split()[1])), "small gain initialization"))
    if biases:
        out.append(_harm(result, biases[0], "negative bias initialization"))
    if eps:
        out.append(_harm(result, max(eps, key=lambda s: float(s.split()[1])), "large eps"))
    top = max(result["lrs"])
    out.append(compare(NAME, f"Layer norm trains at a high learning rate ({top:g}) where no norm does worse", "final test accuracy",
                       "LayerNorm", _v(result, "layer", f"lr {top:g}"), "no norm", _v(result, "none", f"lr {top:g}"),
                       unit="final test acc", context=f"At learning rate {top:g} (other settings at their defaults),"))
    return out


def table(result: Dict):
    header = ["setting"] + [f"{LABELS[n]}: final acc" for n in result["norms"]]
    rows = []
    for s in result["settings"]:
        row = [s]
        for n in result["norms"]:
            arm = result["arms"].get(_key(n, s))
            row.append(Stat(**arm["final_acc"]).fmt() if arm else "—")
        rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    settings_ = result["settings"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(settings_)), 3.6))
    width = 0.8 / len(result["norms"])
    for i, n in enumerate(result["norms"]):
        xs, ms, ss = [], [], []
        for j, s in enumerate(settings_):
            arm = result["arms"].get(_key(n, s))
            if arm and arm["final_acc"]["n"]:
                xs.append(j + (i - (len(result["norms"]) - 1) / 2) * width)
                ms.append(arm["final_acc"]["mean"])
                ss.append(arm["final_acc"]["std"])
        ax.bar(xs, ms, width, yerr=ss, capsize=2, label=LABELS[n])
    ax.set_xticks(range(len(settings_)), settings_, rotation=30, fontsize=8, ha="right")
    ax.set(ylabel="final test accuracy", ylim=(0, 1), title="one factor at a time (defaults: gain 1, bias 0, eps 1e-5, tuned lr)")
    ax.legend(fontsize=7)
    return [save(fig, out_dir, "sensitivity.png")]


def scale(cfg: SensitivityConfig, result: Dict) -> str:
    params = count_params(MLP(64, cfg.width, cfg.depth, 10, "layer"))
    return (f"{cfg.depth}-layer ReLU MLP, width {cfg.width} ({params:,} parameters with LayerNorm); {cfg.steps} Adam steps at batch "
            f"{cfg.batch}; digits; {cfg.seeds} test seeds per setting, each norm's rate chosen on {cfg.tune_seeds} tuning seeds × "
            f"{len(cfg.tune_lrs)} rates ({', '.join(f'{r:g}' for r in cfg.tune_lrs)})")
