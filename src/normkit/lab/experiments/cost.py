r"""Cost, as an engineering measurement: micro-benchmarks of the norm op itself.

Timing a whole training step mostly times the matrix products around the norm (a few percent of
the work); here the op is timed alone, forward and forward + backward, at a small and a large
shape: torch's ``F.layer_norm`` / ``F.rms_norm`` against normkit's ``layer_norm`` / ``rms_norm``
(with weight and bias where the op has them, float32, one thread). The ops are timed in
``blocks`` interleaved blocks: in each block every op runs ``calls`` calls once, in an order
rotated from block to block, so that a burst of load on a shared machine hits all of them and
the ratios pair by block. Reported: CPU milliseconds per call (median over blocks) and the
ratio normkit / torch as a geometric mean over blocks with its 95 % t interval. An estimate
for engineering decisions, not a claim of the paper: it gets no verdict.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

import normkit
from normkit.backends import select_backend_name
from normkit.lab.config import CostConfig
from normkit.lab.experiments._common import pyplot, save
from normkit.lab.stats import test_claim

NAME = "cost"
TITLE = "Cost: the norm op itself, forward and backward (micro-benchmark, an engineering section)"
CLAIM = "Not a claim: what normkit's layer_norm / rms_norm cost per call against torch's, on this machine."

OP_LABELS = {"torch_layer": "torch F.layer_norm", "layer": "normkit.layer_norm", "torch_rms": "torch F.rms_norm", "rms": "normkit.rms_norm"}
PAIRS = (("layer", "torch_layer"), ("rms", "torch_rms"))


def _op(name: str, width: int) -> Callable:
    w, b = torch.randn(width, requires_grad=True), torch.randn(width, requires_grad=True)
    return {
        "torch_layer": lambda x: F.layer_norm(x, (width,), w, b),
        "layer": lambda x: normkit.layer_norm(x, (width,), w, b),
        "torch_rms": lambda x: F.rms_norm(x, (width,), w),
        "rms": lambda x: normkit.rms_norm(x, (width,), w),
    }[name]


def _timed(fn: Callable, x: torch.Tensor, calls: int, backward: bool) -> float:
    """CPU ms per call of ``fn(x)`` (and its backward) over ``calls`` calls."""
    g = torch.randn_like(x) if backward else None
    start = time.process_time()
    for _ in range(calls):
        if backward:
            xg = x.detach().requires_grad_()
            fn(xg).backward(g)
        else:
            with torch.no_grad():
                fn(x)
    return 1e3 * (time.process_time() - start) / calls


def run(cfg: CostConfig, seeds: Sequence[int], tracker) -> Dict:
    cells: Dict[str, List[float]] = {}
    tracker.experiment(NAME, len(cfg.shapes) * 2)
    gen = torch.Generator().manual_seed(0)
    for rows, width in cfg.shapes:
        x = torch.randn(rows, width, generator=gen)
        ops = {name: _op(name, width) for name in cfg.ops}
        for backward in (False, True):
            tag = f"{rows}x{width}|{'fwd+bwd' if backward else 'fwd'}"
            with tracker.run(f"{tag}", cfg.blocks) as tick:
                for fn in ops.values():  # warm-up: kernels compiled, buffers allocated
                    _timed(fn, x, 2, backward)
                names = list(ops)
                for block in range(cfg.blocks):
                    k = block % len(names)
                    for name in names[k:] + names[:k]:
                        cells.setdefault(f"{name}|{tag}", []).append(_timed(ops[name], x, cfg.calls, backward))
                    tick()
    ratios = {}
    for key in {k.split("|", 1)[1] for k in cells}:
        for a, b in PAIRS:
            if f"{a}|{key}" in cells and f"{b}|{key}" in cells:
                la = [math.log(max(v, 1e-9)) for v in cells[f"{a}|{key}"]]
                lb = [math.log(max(v, 1e-9)) for v in cells[f"{b}|{key}"]]
                t = test_claim(la, lb)  # paired by block: mean log ratio and its 95 % interval
                ratios[f"{a}/{b}|{key}"] = {"ratio": math.exp(t.diff) if math.isfinite(t.diff) else None,
                                            "ci_low": math.exp(t.ci_low) if math.isfinite(t.ci_low) else None,
                                            "ci_high": math.exp(t.ci_high) if math.isfinite(t.ci_high) else None, "blocks": t.n}
    probe = torch.randn(2, cfg.shapes[0][1])
    return {"cells": {k: {"median_ms": statistics.median(v), "ms": v} for k, v in cells.items()}, "ratios": ratios,
            "shapes": [list(s) for s in cfg.shapes], "ops": list(cfg.ops), "blocks": cfg.blocks, "calls": cfg.calls,
            "normkit_backend": select_backend_name(probe, 0.0), "normkit_backends_available": normkit.backends.available(),
            "threads": torch.get_num_threads()}


def findings(result: Dict) -> list:
    return []  # an engineering measurement: no claim, no verdict


def table(result: Dict):
    header = ["shape (rows × width)", "pass"] + [f"{OP_LABELS[o]}: ms/call" for o in result["ops"]] + [
        f"{a} / {b} [95 % CI]" for a, b in PAIRS]
    rows = []
    for r, w in result["shapes"]:
        for p in ("fwd", "fwd+bwd"):
            key = f"{r}x{w}|{p}"
            row = [f"{r} × {w}", p] + [f"{result['cells'][f'{o}|{key}']['median_ms']:.4f}" for o in result["ops"]]
            for a, b in PAIRS:
                q = result["ratios"].get(f"{a}/{b}|{key}")
                row.append(f"{q['ratio']:.3f} [{q['ci_low']:.3f}, {q['ci_high']:.3f}]" if q and q["ratio"] is not None else "—")
            rows.append(row)
    return header, rows


def plots(result: Dict, out_dir: Path) -> List[Path]:
    plt = pyplot()
    keys = [k for k in result["ratios"]]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    vals = [result["ratios"][k]["ratio"] or math.nan for k in keys]
    lo = [v - (result["ratios"][k]["ci_low"] or v) for k, v in zip(keys, vals)]
    hi = [(result["ratios"][k]["ci_high"] or v) - v for k, v in zip(keys, vals)]
    ax.errorbar(range(len(keys)), vals, yerr=[lo, hi], fmt="o", capsize=4)
    ax.axhline(1.0, color="k", linewidth=1)
    ax.set_xticks(range(len(keys)), [k.replace("|", "\n") for k in keys], fontsize=6)
    ax.set(ylabel="normkit / torch time per call", title=f"norm op micro-benchmark, {result['threads']} thread(s)")
    return [save(fig, out_dir, "cost.png")]


def scale(cfg: CostConfig, result: Dict) -> str:
    return f"shapes {', '.join(f'{r}×{w}' for r, w in cfg.shapes)}; {cfg.blocks} interleaved blocks × {cfg.calls} calls per op and pass"
