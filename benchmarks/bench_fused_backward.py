"""The CPU backward kernel (``normkit._C.fused_backward``, :file:`csrc/fused_backward.cpp`) called
directly, on the plain case and each option, timed in interleaved pairs against
``dst.copy_(src)`` of one ``(M, N)`` input (:mod:`normkit.bench.paired`): ``time / copy`` is the
median per-pair ratio. ``ideal`` is the bytes one pass of the row math moves over the copy's
(read s and dy, write dx = 1.5; dsum read, dresidual written, dy1 read, dx1 written +0.5 each;
bfloat16 tensors count half); ``raw _C.backward`` is the eager node's entry point (which runs the
same kernel with the options off).

Run::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_fused_backward.py --json benchmarks/results/fused-backward-<date>-<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable, Dict, List

import torch

from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.backends import cpu as compiled
from normkit.bench.paired import estimate_ratio, measure_pairs

F32, BF16 = torch.float32, torch.bfloat16
C = compiled.extension
ALL = (True, False, False, True, True, False, False)  # dx, dW, dB


def _row(name, ideal, *, dtype=F32, rms=False, dsum=False, dres=False, dy1=False, dx1=False, rowscale=False,
         dropout_p=0.0, raw=False):
    return dict(name=name, ideal=ideal, dtype=dtype, rms=rms, dsum=dsum, dres=dres, dy1=dy1, dx1=dx1,
                rowscale=rowscale, dropout_p=dropout_p, raw=raw)


ROWS = (
    _row("LN dx/dW/dB", 1.5),
    _row("LN raw _C.backward", 1.5, raw=True),
    _row("RMS dx/dW", 1.5, rms=True),
    _row("LN bf16", 0.75, dtype=BF16),
    _row("LN bf16 raw _C.backward", 0.75, dtype=BF16, raw=True),
    _row("LN + dsum + dresidual", 2.5, dsum=True, dres=True),
    _row("LN + dsum, raw _C.backward", 2.0, dsum=True, raw=True),
    _row("LN + rowscale", 1.5, rowscale=True),
    _row("LN dropout 0.1", 1.5, dropout_p=0.1),
    _row("LN + dy1 (weight1)", 2.0, dy1=True),
    _row("LN + x1 (dx1)", 2.0, dx1=True),
)


def tensors(rows: int, width: int, dtype: torch.dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    s = (r(rows, width) * 3 + 1).to(dtype)
    s32 = s.float()
    mean = s32.mean(-1)
    rstd = torch.rsqrt(s32.var(-1, unbiased=False) + 1e-5)
    return {"s": s, "dy": r(rows, width).to(dtype), "dy1": r(rows, width).to(dtype), "dsum": r(rows, width).to(dtype),
            "w": r(width), "w1": r(width), "rowscale": torch.rand(rows, generator=g) + 0.5, "mean": mean, "rstd": rstd,
            "ms": torch.rsqrt(s32.square().mean(-1) + 1e-5)}


def make_call(row: dict, t: Dict[str, torch.Tensor]) -> Callable[[], object]:
    rms, dt = row["rms"], row["dtype"]
    mean = None if rms else t["mean"]
    rstd = t["ms"] if rms else t["rstd"]
    dsum = t["dsum"] if row["dsum"] else None
    if row["raw"]:
        return lambda: C.backward(t["dy"], dsum, t["s"], t["w"], mean, rstd, rms)
    needs = (True, row["dx1"], row["dres"], True, not rms, row["dy1"], row["dy1"])
    return lambda: C.fused_backward(
        t["dy"], t["dy1"] if row["dy1"] else None, dsum, t["s"], t["w"], t["w1"] if row["dy1"] else None,
        t["rowscale"] if row["rowscale"] else None, mean, rstd, 1e-5, rms, row["dropout_p"], 1234, needs, dt,
        dt if row["dres"] else None)


def run(rows: int, width: int, threads: List[int], budget_s: float) -> List[dict]:
    g = torch.Generator().manual_seed(1)
    src, dst = torch.randn(rows, width, generator=g), torch.empty(rows, width)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ts = {dt: tensors(rows, width, dt) for dt in (F32, BF16)}
    results = []
    with torch.no_grad():
        for n in threads:
            with torch_threads(n):
                for row in ROWS:
                    timing = measure_pairs(make_call(row, ts[row["dtype"]]), copy, budget_s=budget_s)
                    est = estimate_ratio(timing)
                    results.append({
                        "row": row["name"], "threads": n, "rows": rows, "width": width,
                        "time_over_copy": est.median, "ci_low": est.low, "ci_high": est.high, "pairs": est.pairs,
                        "ideal": row["ideal"], "over_ideal": est.median / row["ideal"],
                        "call_ms": 1e3 * sorted(timing.a_s)[len(timing.a_s) // 2],
                        "copy_ms": 1e3 * sorted(timing.b_s)[len(timing.b_s) // 2],
                    })
                    print(f"{rows}x{width} {n}t {row['name']:28s} {est.median:5.2f}x copy [{est.low:.2f}, {est.high:.2f}]"
                          f"  ideal {row['ideal']:.2f}  /ideal {est.median / row['ideal']:.2f}", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["4096x2048", "64x4096"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of pairs per row")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if C is None:
        sys.exit(f"normkit._C is not built: {compiled.unavailable_reason()}")
    load_start = load_average()
    results = []
    for shape in a.shapes:
        rows, width = (int(v) for v in shape.split("x"))
        results += run(rows, width, a.threads, a.budget)
    if a.json:
        doc = {"suite": "fused-backward", "command": "python " + " ".join(sys.argv),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git": git_commit(),
               "machine": {"cpu": cpu_model(), "torch": torch.__version__, "load_average_start": load_start,
                           "load_average_end": load_average()},
               "results": results}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
