"""The fused CPU kernels (``CpuBackend.fused_forward``, :file:`csrc/fused_cpu.cpp`) on the rows of
``normkit bench --suite options`` (:mod:`normkit.bench.options`), called directly: no autograd,
no Python composition, so each row measures the kernel and the outputs it allocates.

Each row is timed in interleaved pairs against ``dst.copy_(src)`` of ``x``
(:mod:`normkit.bench.paired`), at 1 and 2 threads: ``time / copy`` is the median per-pair
ratio, ``ideal`` the bytes one fused pass moves over the bytes of that copy (read ``x`` and write
``y`` = 1; a residual read +0.5; a stored sum +0.5; ``y1`` +0.5; ``x1`` +0.5; bfloat16 tensors
count half), ``/ ideal`` their quotient. Two variants of each row:

* ``alloc``: the kernel allocates its outputs (what a call without ``out=`` pays: a fresh
  output of 32 MiB is page-faulted and zeroed by the OS on first write);
* ``buffers``: every output is written into a preallocated buffer (``out``, ``out1``,
  ``residual_out``): the kernel alone, comparable to the copy into an existing ``dst``.

Run::

    .venv/bin/python benchmarks/bench_fused_kernel.py --json benchmarks/results/fused-kernel-<date>-<cpu>.json
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
from normkit.contract import KernelSpec
from normkit.bench.paired import estimate_ratio, measure_pairs

BACKEND = compiled.CpuBackend()
F32, BF16 = torch.float32, torch.bfloat16


def _row(name: str, ideal: float, *, x="x", residual=None, x1=None, rowscale=False, w1=False, sum_dtype=None,
         out_dtype=None, store_sum=False, dropout_p=0.0):
    return dict(name=name, ideal=ideal, x=x, residual=residual, x1=x1, rowscale=rowscale, w1=w1, sum_dtype=sum_dtype,
                out_dtype=out_dtype, store_sum=store_sum, dropout_p=dropout_p)


# the rows of normkit.bench.options (out=buf is the buffers variant of the first row)
ROWS = (
    _row("layer_norm(x)", 1.0),
    _row("+ residual", 1.5, residual="r"),
    _row("+ residual, prenorm", 2.0, residual="r", store_sum=True),
    _row("+ weight1/bias1", 1.5, w1=True),
    _row("+ residual + x1", 2.0, residual="r", x1="x1"),
    _row("+ residual + rowscale", 1.5, residual="r", rowscale=True),
    # bf16 x and residual (0.25 + 0.25), float32 sum stored (0.5), bf16 y (0.25)
    _row("bf16 residual_in_fp32, prenorm", 1.25, x="x16", residual="r16", sum_dtype=F32, store_sum=True),
    _row("out_dtype=bfloat16", 0.75, out_dtype=BF16),
    # not a row of the options suite: dropout's hash in the loop (read x, write y)
    _row("dropout 0.1", 1.0, dropout_p=0.1),
)


def tensors(rows: int, width: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    return {
        "x": x, "src": torch.randn(rows, width, generator=g), "dst": torch.empty(rows, width),
        "r": torch.randn(rows, width, generator=g), "x1": torch.randn(rows, width, generator=g),
        "rowscale": torch.rand(rows, generator=g) + 0.5, "x16": x.bfloat16(),
        "r16": torch.randn(rows, width, generator=g).bfloat16(),
        "w": torch.randn(width, generator=g), "b": torch.randn(width, generator=g),
        "w1": torch.randn(width, generator=g), "b1": torch.randn(width, generator=g),
    }


def make_call(row: dict, t: Dict[str, torch.Tensor], buffers: bool) -> Callable[[], object]:
    x = t[row["x"]]
    residual = None if row["residual"] is None else t[row["residual"]]
    sum_dtype = row["sum_dtype"] or (residual.dtype if residual is not None else x.dtype)
    out_dtype = row["out_dtype"] or x.dtype
    spec = KernelSpec(is_rms=False, eps=1e-5, dropout_p=row["dropout_p"], sum_dtype=sum_dtype, out_dtype=out_dtype,
                      store_sum=row["store_sum"])
    args = (x, residual, None if row["x1"] is None else t[row["x1"]], t["rowscale"] if row["rowscale"] else None,
            t["w"], t["b"], t["w1"] if row["w1"] else None, t["b1"] if row["w1"] else None, spec, 1234)
    bufs = {}
    if buffers:
        bufs["out"] = torch.empty(x.shape, dtype=out_dtype)
        if row["w1"]:
            bufs["out1"] = torch.empty(x.shape, dtype=out_dtype)
        if row["store_sum"]:
            bufs["residual_out"] = torch.empty(x.shape, dtype=sum_dtype)
    return lambda: BACKEND.fused_forward(*args, **bufs)


def run(rows: int, width: int, threads: List[int], budget_s: float) -> List[dict]:
    t = tensors(rows, width)
    copy = lambda: t["dst"].copy_(t["src"])  # noqa: E731
    results = []
    with torch.no_grad():
        for n in threads:
            with torch_threads(n):
                for row in ROWS:
                    for variant in ("alloc", "buffers"):
                        timing = measure_pairs(make_call(row, t, variant == "buffers"), copy, budget_s=budget_s)
                        est = estimate_ratio(timing)
                        r = {
                            "option": row["name"], "variant": variant, "threads": n, "rows": rows, "width": width,
                            "time_over_copy": est.median, "ci_low": est.low, "ci_high": est.high, "pairs": est.pairs,
                            "ideal": row["ideal"], "over_ideal": est.median / row["ideal"],
                            "call_ms": 1e3 * sorted(timing.a_s)[len(timing.a_s) // 2],
                            "copy_ms": 1e3 * sorted(timing.b_s)[len(timing.b_s) // 2],
                        }
                        results.append(r)
                        print(f"{n}t {variant:8s} {row['name']:32s} {est.median:5.2f}x copy "
                              f"[{est.low:.2f}, {est.high:.2f}]  ideal {row['ideal']:.2f}  /ideal {r['over_ideal']:.2f}",
                              flush=True)
    return results


def markdown(results: List[dict]) -> str:
    threads = sorted({r["threads"] for r in results})
    by = {(r["option"], r["variant"], r["threads"]): r for r in results}
    head = ["call", "ideal"] + [f"{n}t {v}: time/copy (/ideal)" for v in ("alloc", "buffers") for n in threads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        cells = [row["name"], f"{row['ideal']:.2f}"]
        for v in ("alloc", "buffers"):
            for n in threads:
                r = by.get((row["name"], v, n))
                cells.append("-" if r is None else f"{r['time_over_copy']:.2f}x ({r['over_ideal']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of pairs per row")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    if compiled.extension is None:
        sys.exit(f"normkit._C is not built: {compiled.unavailable_reason()}")
    load_start = load_average()
    results = run(a.rows, a.width, a.threads, a.budget)
    table = markdown(results)
    print(table)
    if a.json:
        doc = {
            "suite": "fused-kernel",
            "command": "python " + " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git_commit(),
            "machine": {"cpu": cpu_model(), "torch": torch.__version__, "load_average_start": load_start,
                        "load_average_end": load_average()},
            "results": results,
            "markdown": table,
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)


if __name__ == "__main__":
    main()
