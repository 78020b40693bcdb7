"""``normkit bench --suite shapes``: normkit's modules against torch.nn's, as a user meets them.

The ``kernels`` suite asks how close each kernel gets to the memory bandwidth on 64 MiB
tensors. This suite asks what a user swapping ``torch.nn.LayerNorm`` for
``normkit.nn.LayerNorm`` sees at the shapes models use: a few rows (inference, small batches)
up to 4096 x 4096, one and two threads, Python dispatch and autograd included.

Every cell is one (op, mode, rows x width, threads) and compares two modules with the same
parameters: ``torch.nn.LayerNorm(N)`` / ``torch.nn.RMSNorm(N)`` with a random gain (and bias),
and ``normkit.nn.LayerNorm`` / ``RMSNorm`` loaded from its ``state_dict``. Modes:

* ``inference``: ``module(x)`` under :func:`torch.no_grad` (modules in eval mode);
* ``fwd+bwd``: ``module(x).backward(dy)`` with ``x`` requiring grad, then every gradient set
  to ``None`` (``zero_grad(set_to_none=True)``, as a training loop does);
* ``add+norm``: a pre-LN residual stream, forward and backward of both outputs. normkit's
  fused ``module(x, h, prenorm=True)`` against torch's ``s = x + h; module(s)``, returning
  ``(y, s)`` either way.

Calls are timed in interleaved pairs (:mod:`normkit.bench.paired`); a cell's number is the
median of the per-pair ratios *torch time / normkit time* (above 1: normkit is faster), with a
95 % order-statistic interval. :func:`summarize` checks the targets of issue 13.
"""

from __future__ import annotations

import datetime
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from normkit import _machine
from normkit._machine import load_average, torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs

__all__ = ["Cell", "Settings", "make_cells", "run_suite", "summarize", "git_commit", "load_average",
           "torch_threads"]

OPS: Tuple[str, ...] = ("layer_norm", "rms_norm")
MODES: Tuple[str, ...] = ("inference", "fwd+bwd", "add+norm")
ROWS: Tuple[int, ...] = (1, 8, 128, 1024, 4096)
WIDTHS: Tuple[int, ...] = (768, 1024, 4096)
THREADS: Tuple[int, ...] = (1, 2)
QUICK_ROWS: Tuple[int, ...] = (1, 128)
QUICK_WIDTHS: Tuple[int, ...] = (768,)
SHORT_OP = {"layer_norm": "LN", "rms_norm": "RMS"}

#: Issue 13's "done when", as ratios (torch time / normkit time) measured in one run.
NOISE_FLOOR = 0.9  # every cell
MEDIAN_TARGET = 1.2  # the median over cells
LARGE_SHAPE, LARGE_TARGET = (4096, 4096), 1.5  # LN and RMS, inference and fwd+bwd


@dataclass(frozen=True)
class Settings:
    """How each cell is timed (see :func:`normkit.bench.paired.measure_pairs`).

    The defaults give about 0.5 s of timed pairs per cell, at least 9 pairs (a 95 % interval
    from the 2nd and 8th of them), so the 4096-row cells, where one torch call can take a
    tenth of a second or more, take longer than that and most of the suite's time.
    """

    cell_seconds: float = 0.5
    target_batch_s: float = 3e-3  # one half of a pair: a batch of calls this long
    min_pairs: int = 9
    max_pairs: int = 101
    pairs: Optional[int] = None  # exactly this many pairs instead of the time budget
    warmup: int = 3
    confidence: float = 0.95


#: ``--quick``: a smoke test in seconds, not a measurement.
QUICK = Settings(cell_seconds=0.02, target_batch_s=5e-4, min_pairs=6, max_pairs=12, warmup=1)


@dataclass(frozen=True)
class Cell:
    op: str
    mode: str
    rows: int
    width: int
    threads: int

    @property
    def label(self) -> str:
        return f"{SHORT_OP[self.op]} {self.mode} {self.rows}x{self.width} {self.threads}t"


def make_cells(ops: Sequence[str] = OPS, modes: Sequence[str] = MODES, rows: Sequence[int] = ROWS,
               widths: Sequence[int] = WIDTHS, threads: Sequence[int] = THREADS) -> List[Cell]:
    """The grid in measuring order: by thread count, then shape, then op, then mode."""
    for name, values, allowed in (("op", ops, OPS), ("mode", modes, MODES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"unknown {name} {bad[0]!r}; expected one of {', '.join(allowed)}")
    return [Cell(op, mode, m, n, t) for t in threads for m in rows for n in widths for op in ops for mode in modes]


def make_modules(op: str, width: int, dtype: torch.dtype, seed: int) -> Tuple[torch.nn.Module, torch.nn.Module]:
    """``(torch module, normkit module)`` with the same random parameters (gain ~ 1 + 0.1 N(0, 1),
    bias ~ 0.1 N(0, 1)), so a kernel that ignored them would not compute the same thing."""
    import normkit.nn

    g = torch.Generator().manual_seed(seed)
    if op == "layer_norm":
        ref, mine = torch.nn.LayerNorm(width, dtype=dtype), normkit.nn.LayerNorm(width, dtype=dtype)
    else:
        ref, mine = torch.nn.RMSNorm(width, dtype=dtype), normkit.nn.RMSNorm(width, dtype=dtype)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
        if getattr(ref, "bias", None) is not None:
            ref.bias.copy_(0.1 * torch.randn(width, generator=g))
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def make_inputs(rows: int, width: int, dtype: torch.dtype, seed: int) -> Dict[str, torch.Tensor]:
    """x, h (the residual stream), dy, ds ~ N(0, 1), shape ``(rows, width)``."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(rows, width, generator=g).to(dtype) for k in ("x", "h", "dy", "ds")}


def build_call(module: torch.nn.Module, mode: str, tensors: Dict[str, torch.Tensor], fused: bool) -> Callable[[], None]:
    """The zero-argument call timed for ``mode`` (module docstring); ``fused``: the module takes
    the residual itself (normkit), else the add is a separate op (torch)."""
    module.train(mode != "inference")
    params = list(module.parameters())
    if mode == "inference":
        x = tensors["x"]

        def inference():
            with torch.no_grad():
                module(x)

        return inference
    x = tensors["x"].detach().requires_grad_()
    dy = tensors["dy"]
    if mode == "fwd+bwd":
        leaves = [x, *params]

        def fwd_bwd():
            module(x).backward(dy)
            for t in leaves:
                t.grad = None

        return fwd_bwd
    if mode != "add+norm":
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    h = tensors["h"].detach().requires_grad_()
    grads = (dy, tensors["ds"])
    leaves = [x, h, *params]

    if fused:
        def add_norm():
            torch.autograd.backward(module(x, h, prenorm=True), grads)
            for t in leaves:
                t.grad = None
    else:
        def add_norm():
            s = x + h
            torch.autograd.backward((module(s), s), grads)
            for t in leaves:
                t.grad = None

    return add_norm


def normkit_path(op: str, mode: str, x: torch.Tensor, module: torch.nn.Module) -> Optional[str]:
    """How normkit runs the cell's call: its route (:func:`normkit.functional.route`) and, for
    the kernel routes, the backend. ``None`` if that cannot be told."""
    try:
        from normkit.backends import select_backend
        from normkit.functional import route

        r = torch.empty_like(x) if mode == "add+norm" else None
        xg = x if mode == "inference" else x.detach().requires_grad_()
        with torch.set_grad_enabled(mode != "inference"):
            path = route(xg, r, module.weight, getattr(module, "bias", None), op == "rms_norm", 0.0)
        if path.startswith("eager"):
            path += "/" + select_backend(x, 0.0).name
        return path
    except Exception:  # diagnostic only: the internals it reads may change
        return None


def run_suite(cells: Sequence[Cell], settings: Settings = Settings(), *, dtype: torch.dtype = torch.float32,
              seed: int = 0, on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Measure every cell; one result dict per cell, in the order given."""
    rng = random.Random(seed)
    results: List[dict] = []
    key, modules, tensors, max_diff = None, None, None, None
    for cell in cells:
        if (cell.op, cell.rows, cell.width) != key:  # the modes and thread counts of a shape share these
            key = (cell.op, cell.rows, cell.width)
            tensors = modules = None
            modules = make_modules(cell.op, cell.width, dtype, seed)
            tensors = make_inputs(cell.rows, cell.width, dtype, seed)
            with torch.no_grad():  # a bench of a wrong answer is worth nothing: record the gap
                max_diff = (modules[0](tensors["x"]) - modules[1](tensors["x"])).abs().max().item()
        ref, mine = modules
        with torch_threads(cell.threads):
            timing = measure_pairs(
                build_call(ref, cell.mode, tensors, fused=False), build_call(mine, cell.mode, tensors, fused=True),
                warmup=settings.warmup, target_batch_s=settings.target_batch_s, budget_s=settings.cell_seconds,
                min_pairs=settings.min_pairs, max_pairs=settings.max_pairs, pairs=settings.pairs, rng=rng)
            path = normkit_path(cell.op, cell.mode, tensors["x"], mine)
        est = estimate_ratio(timing, settings.confidence)
        row = {
            **asdict(cell), "dtype": str(dtype).replace("torch.", ""), "normkit_path": path,
            "ratio": est.median, "ci_low": est.low, "ci_high": est.high, "ci_coverage": est.coverage,
            "pairs": est.pairs,
            "torch_ms": statistics.median(timing.a_s) * 1e3, "normkit_ms": statistics.median(timing.b_s) * 1e3,
            "inner": {"torch": timing.inner_a, "normkit": timing.inner_b},
            "max_abs_diff": max_diff,
            # the raw record: per-call microseconds of each pair, and whether torch ran first
            "torch_us": [round(s * 1e6, 3) for s in timing.a_s],
            "normkit_us": [round(s * 1e6, 3) for s in timing.b_s],
            "torch_first": [int(f) for f in timing.a_first],
        }
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results


def summarize(cells: Sequence[dict]) -> dict:
    """Issue 13's done-when statistics over the measured cells: the slowest cell, the median
    over cells, the 4096 x 4096 inference and fwd+bwd cells, and which targets are met
    (``None``: the grid did not include what a target needs)."""
    if not cells:
        return {"cells": 0, "targets": []}
    worst = min(cells, key=lambda c: c["ratio"])
    median = statistics.median(c["ratio"] for c in cells)
    large = [c for c in cells if (c["rows"], c["width"]) == LARGE_SHAPE and c["mode"] in ("inference", "fwd+bwd")]
    below = [c for c in cells if c["ratio"] < NOISE_FLOOR]

    def brief(c: dict) -> dict:
        return {k: c[k] for k in ("op", "mode", "rows", "width", "threads", "ratio", "ci_low", "ci_high")}

    targets = [
        {"target": f"every cell >= {NOISE_FLOOR}x torch", "measured": worst["ratio"],
         "met": not below, "failing": len(below)},
        {"target": f"median over cells >= {MEDIAN_TARGET}x torch", "measured": median, "met": median >= MEDIAN_TARGET},
        {"target": f"LN/RMS inference and fwd+bwd at {LARGE_SHAPE[0]}x{LARGE_SHAPE[1]} >= {LARGE_TARGET}x torch",
         "measured": min((c["ratio"] for c in large), default=None),
         "met": all(c["ratio"] >= LARGE_TARGET for c in large) if large else None},
    ]
    return {"cells": len(cells), "min": brief(worst), "median": median, "below_noise_floor": [brief(c) for c in below],
            "large": [brief(c) for c in large], "targets": targets}


def git_commit() -> Optional[dict]:
    """``{"commit": short hash, "dirty": tracked files changed}`` of this checkout (from
    :func:`normkit._machine.git_commit`), or ``None`` outside a git checkout."""
    full = _machine.git_commit()
    if not full:
        return None
    commit, _, dirty = full.partition("+")
    return {"commit": commit[:7], "dirty": bool(dirty)}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
