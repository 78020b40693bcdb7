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
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from rich.console import Console

import normkit
from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.lab import report
from normkit.lab.config import preset
from normkit.lab.experiments import EXPERIMENTS, load
from normkit.lab.stats import holm, holm_verdict
from normkit.lab.tracker import Tracker

__all__ = ["run_lab", "machine_info", "claims_table", "jsonable"]

#: The keys every entry of ``results["claims"]`` carries first (then the rest of the test).
CLAIM_KEYS = ("experiment", "claim", "verdict", "diff", "ci_low", "ci_high", "p", "n")


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


def claims_table(results: Dict, alpha: float = 0.05) -> List[Dict]:
    """One entry per claim of the run: the keys of :data:`CLAIM_KEYS`, then the test's method,
    failure counts and extras, the Holm-adjusted p-value across all the run's claims and the
    verdict that survives it, and the report's sentence."""
    findings = [f for e in results["experiments"].values() for f in e["findings"]]
    adjusted = holm([f["test"].get("p", math.nan) for f in findings])
    out = []
    for f, p_holm in zip(findings, adjusted):
        t = f["test"]
        entry = {"experiment": f["experiment"], "claim": f["claim"], "verdict": f["verdict"], "diff": t.get("diff"),
                 "ci_low": t.get("ci_low"), "ci_high": t.get("ci_high"), "p": t.get("p"), "n": t.get("n")}
        entry.update(p_holm=p_holm, verdict_holm=holm_verdict(f["verdict"], p_holm, alpha), method=t.get("method"),
                     alpha=t.get("alpha"), failed_a=t.get("failed_a"), failed_b=t.get("failed_b"), extra=t.get("extra", {}),
                     metric=f.get("metric", ""), measured=f.get("numbers", ""), sentence=f["sentence"])
        out.append(entry)
    return out


def run_lab(names: Sequence[str], preset_name: str, seeds: int, out: Path, console: Optional[Console] = None, threads: int = 1) -> Dict:
    """Run ``names`` under ``preset_name`` for seeds ``0 .. seeds-1`` with ``threads`` torch
    threads; write ``results.json``, the plots and the reports to ``out``; return the results."""
    for name in names:
        if name not in EXPERIMENTS:
            raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    with torch_threads(threads):
        return _run(names, preset_name, seeds, Path(out), console)


def _run(names: Sequence[str], preset_name: str, seeds: int, out: Path, console: Optional[Console]) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    seed_list = list(range(seeds))
    results: Dict = {"meta": machine_info(), "preset": preset_name, "seeds": seed_list, "experiments": {}}
    total_start, total_cpu = time.perf_counter(), time.process_time()
    with Tracker(console) as tracker:
        for name in names:
            module, cfg = load(name), preset(name, preset_name)
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
            }
            tracker.log(f"[bold]{name}[/] done in {elapsed:.1f} s")
    results["elapsed_s"] = time.perf_counter() - total_start
    results["cpu_s"] = time.process_time() - total_cpu
    results["meta"]["load_average_at_end"] = load_average()
    results["claims"] = claims_table(results)
    results = jsonable(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    return results
