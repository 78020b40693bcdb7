r"""The paper's Table 1, measured: which transformations leave each normalization's output unchanged.

For a layer :math:`h = N(a)`, :math:`a = W x` (no bias, as in the paper's analysis; float64,
:math:`\epsilon = 0` so that eps does not blur exact invariance), with ``W`` of shape
``(d_out, d_in)`` and a batch ``x`` of ``batch`` cases, each seed draws ``W``, ``x`` and the
transformation's parameters and applies:

=========================== =====================================================================
weight matrix re-scaling    :math:`W \to \delta W`
weight matrix re-centering  :math:`W \to W + \mathbf 1 \gamma^\top` (every unit's summed input
                            moves by the same :math:`\gamma^\top x`)
weight vector re-scaling    :math:`w_i \to \delta_i w_i` (one factor per unit)
dataset re-scaling          :math:`x \to \delta x` for every case
dataset re-centering        :math:`x \to x + \gamma` for every case
single case re-scaling      :math:`x_n \to \delta x_n` for one case
=========================== =====================================================================

with :math:`\delta \sim U(2, 5)`, :math:`\gamma \sim \mathcal N(0, I)`. Norms: BatchNorm
(training-mode statistics over the batch), WeightNorm (:math:`a_i = v_i^\top x / \lVert v_i
\rVert`), normkit's ``layer_norm`` and ``rms_norm``. The measurement is the relative change
:math:`\max|h' - h| / \max|h|`; *invariant* means below ``tol`` (float64 rounding is about
:math:`10^{-16}`, a non-invariance is of order 1). The paper's expectations (Table 1, and Zhang &
Sennrich 2019 for RMSNorm) are shown beside the measurements.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

import normkit
from normkit.lab.config import InvarianceConfig
from normkit.lab.experiments._common import LABELS, pyplot, save, stat_dict
from normkit.lab.verdict import Finding, Stat

NAME = "invariance"
TITLE = "Invariance properties (the paper's Table 1), measured in float64"
CLAIM = "Layer norm is invariant to re-scaling and re-centering of the weight matrix and to re-scaling of a single case; batch norm to re-scaling and re-centering of the dataset."

TRANSFORMS = ("weight matrix re-scaling", "weight matrix re-centering", "weight vector re-scaling",
              "dataset re-scaling", "dataset re-centering", "single case re-scaling")

#: Table 1 of Ba et al. (2016); RMSNorm from Zhang & Sennrich (2019), Table 1. True = invariant.
EXPECTED: Dict[str, Tuple[bool, ...]] = {
    "batch": (True, False, True, True, True, False),
    "weight": (True, False, True, False, False, False),
    "layer": (True, True, False, True, False, True),
    "rms": (True, False, False, True, False, True),
}

#: A change of exactly 0 is floored here before taking log10 (below float64's 1.1e-16 rounding).
FLOOR = 1e-17


def normalize(kind: str, w: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``N(W x)`` for a batch ``x`` of shape ``(batch, d_in)``: ``(batch, d_out)``."""
    if kind == "weight":
        return x @ (w / w.norm(dim=1, keepdim=True)).T
    a = x @ w.T
    if kind == "batch":  # training-mode statistics, by hand: F.batch_norm refuses eps = 0
        mean, var = a.mean(0), a.var(0, unbiased=False)
        return (a - mean) / torch.sqrt(var + eps)
    if kind == "layer":
        return normkit.layer_norm(a, (a.shape[1],), eps=eps)
    if kind == "rms":
        return normkit.rms_norm(a, (a.shape[1],), eps=eps)
    raise ValueError(f"norm kind must be one of {', '.join(EXPECTED)}, got {kind!r}")


def transforms(g: torch.Generator, d_out: int, d_in: int) -> Dict[str, Callable]:
    """Each transformation as ``(W, x) -> (W', x')``, its random parameters drawn from ``g``."""
    u = lambda *shape: 2 + 3 * torch.rand(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    delta, deltas, delta_n = u(()), u(d_out, 1), u(())
    gamma_w, gamma_x = torch.randn(d_in, generator=g, dtype=torch.float64), torch.randn(d_in, generator=g, dtype=torch.float64)

    def one_case(w, x):
        x = x.clone()
        x[0] = delta_n * x[0]
        return w, x

    return {
        "weight matrix re-scaling": lambda w, x: (delta * w, x),
        "weight matrix re-centering": lambda w, x: (w + gamma_w[None, :], x),
        "weight vector re-scaling": lambda w, x: (deltas * w, x),
        "dataset re-scaling": lambda w, x: (w, delta * x),
        "dataset re-centering": lambda w, x: (w, x + gamma_x),
        "single case re-scaling": one_case,
    }


def measure(cfg: InvarianceConfig, seed: int) -> Dict[str, Dict[str, float]]:
    """Relative output change of every norm under every transformation, for one seed."""
    g = torch.Generator().manual_seed(70_001 + seed)
    w = torch.randn(cfg.d_out, cfg.d_in, generator=g, dtype=torch.float64) / math.sqrt(cfg.d_in)
    x = torch.randn(cfg.batch, cfg.d_in, generator=g, dtype=torch.float64)
    ts = transforms(g, cfg.d_out, cfg.d_in)
    out: Dict[str, Dict[str, float]] = {}
    for kind in cfg.norms:
        h = normalize(kind, w, x, cfg.eps)
        out[kind] = {}
        for name, t in ts.items():
            h2 = normalize(kind, *t(w, x), cfg.eps)
            out[kind][name] = float((h2 - h).abs().max() / h.abs().max())
    return out


def run(cfg: InvarianceConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(seeds))
    runs = []
    for seed in seeds:
        with tracker.run(f"seed {seed}", 1) as tick:
            runs.append(measure(cfg, seed))
            tick()
    cells = {}
    for kind in cfg.norms:
        for name in TRANSFORMS:
            changes = [r[kind][name] for r in runs]
            cells[f"{kind}|{name}"] = {"max_change": max(changes), "log10_change": stat_dict([math.log10(max(c, FLOOR)) for c in changes]),
                                       "invariant": max(changes) < cfg.tol, "expected": EXPECTED.get(kind, (None,) * 6)[TRANSFORMS.index(name)]}
    return {"norms": list(cfg.norms), "transforms": list(TRANSFORMS), "cells": cells, "runs": runs, "tol": cfg.tol, "eps": cfg.eps,
            "matches": sum(c["invariant"] == c["expected"] for c in cells.values()), "cells_total": len(cells)}


def _log(result: Dict, kind: str, name: str) -> List[float]:
    return [math.log10(max(r[kind][name], FLOOR)) for r in result["runs"]]


def findings(result: Dict) -> List[Finding]:
    return []  # deterministic checks (see checks), not statistical claims


def checks(result: Dict) -> List[Dict]:
    """One deterministic check per cell of Table 1: the measured invariance (the largest relative
    output change over the random layers below ``tol``) equals the paper's. Passes or fails."""
    out = []
    for kind in result["norms"]:
        for name in result["transforms"]:
            c = result["cells"][f"{kind}|{name}"]
            if c["expected"] is None:
                continue
            out.append({"experiment": NAME, "check": f"{LABELS[kind]}: {name} {'leaves the output unchanged' if c['expected'] else 'changes the output'}",
                        "expected_invariant": c["expected"], "measured_invariant": c["invariant"], "max_change": c["max_change"],
                        "tol": result["tol"], "passed": c["invariant"] == c["expected"]})
    return out


def table(result: Dict):
    header = ["norm"] + [f"{t} (max change; paper)" for t in result["transforms"]]
    rows = []
    for kind in result["norms"]:
        row = [LABELS[kind]]
        for name in result["transforms"]:
            c = result["cells"][f"{kind}|{name}"]
            mark = "invariant" if c["invariant"] else "not invariant"
            paper = "" if c["expected"] is None else ("; paper: " + ("invariant" if c["expected"] else "not") + ("" if c["expected"] == c["invariant"] else " — DIFFERS"))
            row.append(f"{c['max_change']:.1e} {mark}{paper}")
        rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    norms, names = result["norms"], result["transforms"]
    grid = [[Stat(**result["cells"][f"{k}|{n}"]["log10_change"]).mean for n in names] for k in norms]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(norms) + 2.2))
    im = ax.imshow(grid, cmap="viridis_r", vmin=-17, vmax=1, aspect="auto")
    ax.set_xticks(range(len(names)), [n.replace(" re-", "\nre-") for n in names], fontsize=7)
    ax.set_yticks(range(len(norms)), [LABELS[k] for k in norms])
    for i, k in enumerate(norms):
        for j, n in enumerate(names):
            c = result["cells"][f"{k}|{n}"]
            ax.text(j, i, ("✓" if c["invariant"] else "✗") + ("" if c["expected"] in (None, c["invariant"]) else " !"), ha="center",
                    va="center", color="w" if grid[i][j] < -8 else "k")
    fig.colorbar(im, ax=ax, label="log10 relative output change")
    ax.set_title("invariance, measured (✓ = change below tolerance; ! = differs from the paper)", fontsize=9)
    return [save(fig, out_dir, "invariance.png")]


def scale(cfg: InvarianceConfig, result: Dict) -> str:
    return f"random float64 layers {cfg.d_out} × {cfg.d_in}, batch {cfg.batch}, eps {cfg.eps:g}; {cfg.seeds} random draws; tolerance {cfg.tol:g}"
