"""How long a preset takes, estimated from measured steps (``--full`` takes hours: too long to
time whole on a shared machine before every change).

    python -m normkit.lab.estimate --preset full [--seeds 5] [--steps 10] [--json out.json]

For each experiment, every arm of the preset runs for one seed with the number of training steps
(stream samples for ``online``, timed steps for ``cost``) cut to ``--steps``, everything else
(model sizes, evaluations, arms) as in the preset; the measured time is scaled linearly by the
preset's steps over ``--steps`` and by the number of runs per arm: the test seeds plus the tuning
runs (tuning seeds × learning rates; an upper bound for ``sensitivity``, whose factor settings
are not tuned). The shortened run evaluates once,
and that evaluation is scaled with the steps, so the estimate counts more evaluations than the
preset runs: an upper bound (by about one evaluation per ``--steps`` steps). Kernel compilation
happens before the timing (a smoke run first). One thread, like the lab.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Dict, List, Optional

from normkit.lab.config import DEFAULT_SEEDS, PRESET_NAMES, preset
from normkit.lab.experiments import EXPERIMENTS, load
from normkit.lab.tracker import SilentTracker

__all__ = ["estimate", "main"]


def _shrunk(cfg, k: int):
    """``cfg`` with its step count cut to ``k``, and the factor that scales the time back."""
    names = {f.name for f in fields(cfg)}
    if "steps" in names:
        evals = {"evals": 1} if "evals" in names else {}  # one evaluation per k steps, scaled with them: an upper bound
        warm = {"warmups": tuple(min(w, k // 2) for w in cfg.warmups)} if "warmups" in names else {}
        return replace(cfg, steps=min(cfg.steps, k), **evals, **warm), cfg.steps / min(cfg.steps, k)
    if "length" in names:  # online: samples of the stream; the windows must fit in it
        n = max(2 * k, 8)
        return replace(cfg, length=min(cfg.length, n), window=min(cfg.window, n // 4)), cfg.length / min(cfg.length, n)
    if "blocks" in names:  # cost: blocks of interleaved calls
        return replace(cfg, blocks=min(cfg.blocks, 2)), cfg.blocks / min(cfg.blocks, 2)
    return cfg, 1.0


def _runs_per_arm(cfg, seeds: Optional[int]) -> int:
    """Test seeds plus tuning runs per arm (the shortened run does one test seed and no tuning)."""
    names = {f.name for f in fields(cfg)}
    if "blocks" in names:
        return 1
    test = seeds if seeds is not None else getattr(cfg, "seeds", DEFAULT_SEEDS)
    lrs = getattr(cfg, "tune_lrs", None) or getattr(cfg, "lrs", ())
    return test + (getattr(cfg, "tune_seeds", 0) * len(lrs) if len(lrs) > 1 else 0)


def estimate(preset_name: str, seeds: Optional[int] = None, steps: int = 10, names: Optional[List[str]] = None) -> Dict:
    """Estimated seconds per experiment of ``preset_name`` at ``seeds`` seeds (see the module doc)."""
    import torch

    from normkit._machine import torch_threads

    out: Dict[str, Dict] = {}
    with torch_threads(1):
        for name in names or EXPERIMENTS:
            module = load(name)
            module.run(preset(name, "smoke"), [0], SilentTracker())  # compile and warm up first
            full = preset(name, preset_name)
            cfg, factor = _shrunk(full, steps)
            if "tune_seeds" in {f.name for f in fields(cfg)}:
                cfg = replace(cfg, tune_seeds=0)
            runs = _runs_per_arm(full, seeds)
            start, cpu = time.perf_counter(), time.process_time()
            module.run(cfg, [0], SilentTracker())
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            out[name] = {"measured_wall_s": wall, "measured_cpu_s": cpu, "scale": factor * runs,
                         "estimate_wall_s": wall * factor * runs, "estimate_cpu_s": cpu * factor * runs}
            print(f"{name}: measured {cpu:.1f} s CPU, x {factor * runs:.1f}", file=sys.stderr, flush=True)
    total = {k: sum(v[k] for v in out.values()) for k in ("estimate_wall_s", "estimate_cpu_s")}
    return {"preset": preset_name, "seeds": seeds, "steps_measured": steps, "experiments": out, "total": total,
            "torch": torch.__version__}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m normkit.lab.estimate", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESET_NAMES, default="full")
    parser.add_argument("--seeds", type=int, default=None, help="test seeds per arm (default: each experiment's own)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT")
    args = parser.parse_args(argv)
    from normkit.lab.runner import machine_info

    result = estimate(args.preset, args.seeds, args.steps, args.experiments or None)
    result["meta"] = machine_info()
    for name, e in result["experiments"].items():  # noqa: B007
        print(f"{name:12s} measured {e['measured_cpu_s']:7.1f} s CPU ({e['measured_wall_s']:7.1f} s wall) x {e['scale']:7.1f}"
              f" = {e['estimate_cpu_s'] / 60:7.1f} min CPU ({e['estimate_wall_s'] / 60:7.1f} min wall)")
    t = result["total"]
    print(f"total: {t['estimate_cpu_s'] / 3600:.1f} h CPU, {t['estimate_wall_s'] / 3600:.1f} h wall ({args.preset}, "
          f"{args.seeds or 'per-experiment'} test seeds, tuning included)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
