"""Run a list of experiments for a number of seeds, time each, and write ``results.json``,
the plots and the reports into the output directory."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import torch
from rich.console import Console

import normkit
from normkit.lab import report
from normkit.lab.config import preset
from normkit.lab.experiments import EXPERIMENTS, load
from normkit.lab.tracker import Tracker

__all__ = ["run_lab", "machine_info", "jsonable", "torch_threads", "idle_numba_workers"]


def machine_info() -> Dict:
    """Versions and machine facts recorded with every result."""
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "normkit": normkit.__version__,
        "normkit_backends": normkit.backends(),
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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` (normkit's numba kernels follow torch's
    count), restoring the previous count afterwards.

    The lab's models are small: one thread is about as fast as two on an idle machine, and on a
    shared one it is many times faster, because a multi-threaded op waits at a barrier for a
    thread that the OS has descheduled (measured: 25-50x per training step under load).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def idle_numba_workers() -> Optional[str]:
    """Ask numba for its ``workqueue`` threading layer when the process has not launched a
    numba thread pool yet and the user did not choose one (``NUMBA_THREADING_LAYER``).

    Why: numba's default OpenMP pool keeps its workers spin-waiting after every parallel
    kernel, so after the first large normalization the process burns a second core for the rest
    of the run (measured: CPU time per training step doubled, wall time unchanged on an idle
    machine, worse on a shared one). ``workqueue`` workers sleep. Results do not change: the
    CPU backend's work split depends on the shape only. Returns the layer chosen, or ``None``.
    """
    if "NUMBA_THREADING_LAYER" in os.environ:
        return None
    try:
        import numba
        from numba.np.ufunc import parallel
    except Exception:  # numba missing or broken: the CPU backend falls back anyway
        return None
    if getattr(parallel, "_is_initialized", True):
        return None
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"


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
    total_start = time.perf_counter()
    with Tracker(console) as tracker:
        for name in names:
            module, cfg = load(name), preset(name, preset_name)
            start = time.perf_counter()
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
                "result": result,
            }
            tracker.log(f"[bold]{name}[/] done in {elapsed:.1f} s")
    results["elapsed_s"] = time.perf_counter() - total_start
    results = jsonable(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report.write(results, out)
    return results
