r"""What normalization costs: time of one training step (forward + backward + Adam step) of the
same MLP with each norm, on this machine.

Per seed: build the model, run ``warmup`` untimed steps, then time ``repeats`` steps one by one
and keep the median (robust to a neighbour's burst on a shared machine). Each step is timed
twice: the process's CPU time (what the verdicts use: on a shared machine the wall clock mostly
measures the neighbours, while the CPU time of the lab's single-threaded run is the compute the
step needed) and the wall clock (recorded beside it; on an idle machine the two agree). The
table gives the mean ± std of the medians over seeds and the ratio to the unnormalized model.
Also records which normkit backend ran.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

import normkit
from normkit.backends import select_backend_name
from normkit.lab.config import CostConfig
from normkit.lab.experiments._common import (
    LABELS,
    adam,
    pyplot,
    save,
    seeded,
    stat_dict,
    values,
)
from normkit.lab.models import MLP
from normkit.lab.verdict import Stat, compare, compare_noninferior

NAME = "cost"
TITLE = "Cost: training-step time of each norm in the same MLP"
CLAIM = "Normalization costs compute: each norm layer adds time to every training step."


def time_one(cfg: CostConfig, norm: str, seed: int, tick=lambda n=1: None) -> Dict:
    gen = seeded(seed)
    model = MLP(cfg.width, cfg.width, cfg.depth, 10, norm)
    opt = adam(model.parameters(), 1e-3)
    x = torch.randn(cfg.batch, cfg.width, generator=gen)
    y = torch.randint(0, 10, (cfg.batch,), generator=gen)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(cfg.warmup):
        step()
        tick()
    cpu, wall = [], []
    for _ in range(cfg.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start)
        tick()
    return {"median_ms": 1e3 * statistics.median(cpu), "min_ms": 1e3 * min(cpu), "wall_median_ms": 1e3 * statistics.median(wall)}


def run(cfg: CostConfig, seeds: Sequence[int], tracker) -> Dict:
    tracker.experiment(NAME, len(cfg.norms) * len(seeds))
    arms = {}
    # interleave norms within a seed so that a burst of load on a shared machine hits all of them
    per = {norm: [] for norm in cfg.norms}
    for seed in seeds:
        for norm in cfg.norms:
            with tracker.run(f"{LABELS[norm]}, seed {seed}", cfg.warmup + cfg.repeats) as tick:
                per[norm].append(time_one(cfg, norm, seed, tick))
    base = Stat.of([r["median_ms"] for r in per["none"]]).mean if "none" in per else float("nan")
    for norm, runs in per.items():
        s = Stat.of([r["median_ms"] for r in runs])
        arms[norm] = {"step_ms": s.to_dict(), "min_ms": stat_dict([r["min_ms"] for r in runs]),
                      "wall_ms": stat_dict([r["wall_median_ms"] for r in runs]), "ratio_to_none": s.mean / base, "runs": runs}
    probe = torch.randn(2, cfg.width)
    return {
        "arms": arms,
        "shape": {"batch": cfg.batch, "width": cfg.width, "depth": cfg.depth},
        "normkit_backend": select_backend_name(probe, 0.0),
        "normkit_backends_available": normkit.backends.available(),
        "threads": torch.get_num_threads(),
        "margin": cfg.margin,
    }


def findings(result: Dict):
    arms = result["arms"]
    get = lambda a: values(arms[a]["runs"], "median_ms") if a in arms else []  # noqa: E731
    ctx = (f"Training step of a {result['shape']['depth']}-layer, width-{result['shape']['width']} MLP at batch {result['shape']['batch']} "
           f"(normkit backend: {result['normkit_backend']}, {result['threads']} torch thread(s); arms interleaved within each seed, paired by seed),")
    margin = result.get("margin", 0.05)
    return [
        compare(NAME, "Layer norm costs compute", "median CPU time per step in ms", "LayerNorm (normkit)", get("layer"), "no norm", get("none"),
                context=ctx, better="slower", unit="ms/step"),
        compare_noninferior(NAME, f"normkit's LayerNorm is no slower than torch's (margin {100 * margin:g} %)", "median CPU time per step in ms",
                            "LayerNorm (normkit)", get("layer"), "torch LayerNorm", get("torch_layer"), margin=margin, context=ctx, unit="ms/step"),
        compare(NAME, "RMSNorm is cheaper than LayerNorm", "median CPU time per step in ms", "RMSNorm (normkit)", get("rms"),
                "LayerNorm (normkit)", get("layer"), higher_is_better=False, context=ctx, unit="ms/step"),
    ]


def table(result: Dict):
    header = ["norm", "CPU ms per step (median)", "× no norm", "wall ms per step (median)"]
    rows = [[LABELS[n] + (" (normkit)" if n in ("layer", "rms") else ""), Stat(**r["step_ms"]).fmt(3), f"{r['ratio_to_none']:.2f}",
             Stat(**r["wall_ms"]).fmt(3)] for n, r in result["arms"].items()]
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(result["arms"])
    stats = [Stat(**result["arms"][n]["step_ms"]) for n in names]
    ax.bar([LABELS[n] for n in names], [s.mean for s in stats], yerr=[s.std for s in stats], capsize=4)
    ax.set(ylabel="CPU ms per training step (median)", title=f"step time, {result['threads']} torch thread(s)")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    return [save(fig, out_dir, "cost.png")]
