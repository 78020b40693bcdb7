"""Run a list of experiments for a number of seeds, time each, and write ``results.json``,
the plots and the reports into the output directory."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from rich.console import Console

import normkit
from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.lab import claims as primary
from normkit.lab import report
from normkit.lab.config import preset
from normkit.lab.experiments import EXPERIMENTS, load
from normkit.lab.tracker import Tracker

__all__ = ["run_lab", "machine_info", "claims_table", "jsonable"]

#: The keys every entry of ``results["claims"]`` (the primary claims) carries.
CLAIM_KEYS = ("key", "experiment", "claim", "source", "verdict", "diff", "ci_low", "ci_high", "p", "p_adjusted", "n", "mde")


def machine_info() -> Dict:
    """Versions and machine facts recorded with every result."""
    return {
        "cpu_model": cpu_model(),
        "commit": git_commit(),
        "load_average_at_start": load_average(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "normkit": normkit.__version__,
        "normkit_backends": normkit.backends.available(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def jsonable(obj):
    """``obj`` with non-finite floats as ``None`` (strict JSON has no NaN) and tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def claims_table(results: Dict, alpha: float = primary.ALPHA) -> List[Dict]:
    """The pre-registered primary claims (:data:`normkit.lab.claims.PRIMARY`, in its order), each
    tested at ``alpha / len(PRIMARY)`` whatever subset of experiments ran, with its minimum
    detectable effect; a claim whose experiment did not run is *not measured*."""
    return primary.evaluate([f for e in results["experiments"].values() for f in e["findings"]], alpha)


def run_lab(names: Sequence[str], preset_name: str, seeds: Optional[int], out: Path, console: Optional[Console] = None,
            threads: int = 1) -> Dict:
    """Run ``names`` under ``preset_name`` for test seeds ``0 .. seeds-1`` (``None``: each
    experiment's own ``cfg.seeds``) with ``threads`` torch threads; write ``results.json``, the
    plots and the reports to ``out``; return the results."""
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ValueError(f"seeds must be None or an int >= 1, got {seeds!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    with torch_threads(threads):
        return _run(names, preset_name, seeds, Path(out), console)


def _run(names: Sequence[str], preset_name: str, seeds: Optional[int], out: Path, console: Optional[Console]) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    results: Dict = {"meta": machine_info(), "preset": preset_name, "seeds": {}, "experiments": {},
                     "primary_claims": [p.to_dict() for p in primary.PRIMARY]}
    total_start, total_cpu = time.perf_counter(), time.process_time()
    with Tracker(console) as tracker:
        for name in names:
            module, cfg = load(name), preset(name, preset_name)
            if seeds is not None and hasattr(cfg, "seeds") and name not in ("cost",):
                cfg = replace(cfg, seeds=seeds)
            seed_list = list(range(getattr(cfg, "seeds", 1)))
            results["seeds"][name] = seed_list
            start, start_cpu = time.perf_counter(), time.process_time()
            result = module.run(cfg, seed_list, tracker)
            elapsed = time.perf_counter() - start
            header, rows = module.table(result)
            results["experiments"][name] = {
                "title": module.TITLE,
                "claim": module.CLAIM,
                "config": asdict(cfg),
                "elapsed_s": elapsed,
                "findings": [f.to_dict() for f in module.findings(result)],
                "table": {"header": header, "rows": rows},
                "plots": [p.name for p in module.plots(result, out)],
                "cpu_s": time.process_time() - start_cpu,  # this process's CPU time: what the run needed, load aside
                "result": result,
                "scale": module.scale(cfg, result) if hasattr(module, "scale") else "",
                "checks": module.checks(result) if hasattr(module, "checks") else [],
            }
            tracker.log(f"[bold]{name}[/] done in {elapsed:.1f} s")
    results["elapsed_s"] = time.perf_counter() - total_start
    results["cpu_s"] = time.process_time() - total_cpu
    results["meta"]["load_average_at_end"] = load_average()
    results["claims"] = claims_table(results)
    results["exploratory"] = primary.exploratory([f for e in results["experiments"].values() for f in e["findings"]])
    results = jsonable(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    return results
