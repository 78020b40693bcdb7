"""What a call costs beyond its kernel: the per-call time of a few-element call (4 x 64 float32,
no gradients, 1 thread), where the kernel is a fraction of a microsecond and the rest is the
path to it: torch's ``F.layer_norm``, normkit's plain call (the C++ ``try_norm``), the same
into ``out=`` / ``residual_out=`` buffers, dropout without gradients (also ``try_norm``), and
calls with fused options (the Python path of ``dispatch.fused_norm``). The best of 5 batches of ``--calls`` calls, in microseconds::

    PYTHONPATH=src python benchmarks/bench_call_overhead.py [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict

import torch

import normkit
from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.bench.report import write_json


def per_call_us(fn: Callable[[], object], calls: int, batches: int = 5) -> float:
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def cases() -> Dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    x, r, x1 = (torch.randn(4, 64, generator=g) for _ in range(3))
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    out, res_out, out16 = torch.empty(4, 64), torch.empty(4, 64), torch.empty(4, 64, dtype=torch.bfloat16)
    ln = normkit.layer_norm
    return {
        "torch F.layer_norm": lambda: torch.nn.functional.layer_norm(x, (64,), w, b),
        "layer_norm": lambda: ln(x, (64,), w, b),
        "layer_norm, out=": lambda: ln(x, (64,), w, b, out=out),
        "+ residual, prenorm": lambda: ln(x, (64,), w, b, residual=r, prenorm=True),
        "+ residual, prenorm, out=, residual_out=": lambda: ln(x, (64,), w, b, residual=r, prenorm=True, out=out,
                                                              residual_out=res_out),
        "dropout 0.1 (no gradients: try_norm)": lambda: ln(x, (64,), w, b, dropout_p=0.1),
        "dropout 0.1 + residual, prenorm, out=, residual_out=": lambda: ln(x, (64,), w, b, residual=r, prenorm=True,
                                                                           dropout_p=0.1, out=out,
                                                                           residual_out=res_out),
        "out_dtype=bfloat16, out=": lambda: ln(x, (64,), w, b, out_dtype=torch.bfloat16, out=out16),
        "+ residual + x1": lambda: ln(x, (64,), w, b, residual=r, x1=x1),
        "+ residual, residual_in_fp32": lambda: ln(x, (64,), w, b, residual=r, residual_in_fp32=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    with torch.no_grad(), torch_threads(1):
        for name, fn in cases().items():
            us = per_call_us(fn, args.calls)
            results.append({"call": name, "us_per_call": us})
            print(f"{name}: {us:.1f} us", flush=True)
    if args.json:
        record = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(), "threads": 1,
                  "shape": [4, 64], "load_average": load_average(), "results": results,
                  "command": f"python benchmarks/bench_call_overhead.py --calls {args.calls}"}
        write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
