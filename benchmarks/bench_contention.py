"""Is this machine's compute steady? A time series of a compute-bound and a memory-bound call.

On a shared VM a neighbour on the other hardware thread of a core can take half of its
arithmetic throughput for seconds at a time, without touching memory bandwidth. A memory-bound
call (``dst.copy_(src)``, a layer norm into a buffer) then keeps its time while a
compute-bound one (a layer norm with dropout, whose keep hash costs 13 vector operations per 8
elements; a chain of small in-cache products) slows by up to 2x, and any ratio of the two moves
with the neighbour, not with the code. This samples each call every ``--every`` seconds for
``--seconds`` seconds, one thread, and reports each sample's median of three calls::

    PYTHONPATH=src python benchmarks/bench_contention.py --seconds 40 --json PATH
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import normkit
from normkit._machine import cpu_model, load_average, torch_threads
from normkit.bench.report import write_json
from normkit.bench.timing import measure


def calls(rows: int, width: int):
    g = torch.Generator().manual_seed(0)
    x, src = torch.randn(rows, width, generator=g), torch.randn(rows, width, generator=g)
    w, b = torch.randn(width, generator=g), torch.randn(width, generator=g)
    out, dst = torch.empty_like(x), torch.empty_like(src)
    small, small_out = torch.randn(16, 2048, generator=g), torch.empty(16, 2048)

    def products():  # 50 products of 128 KiB in L2: bound by the multiply's throughput
        for _ in range(50):
            torch.mul(small, 1.0001, out=small_out)

    return {
        "layer_norm dropout 0.1": lambda: normkit.layer_norm(x, (width,), w, b, dropout_p=0.1, training=True, out=out),
        "layer_norm": lambda: normkit.layer_norm(x, (width,), w, b, out=out),
        "copy": lambda: dst.copy_(src),
        "in-cache products": products,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--every", type=float, default=0.3, help="pause between samples (s)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--json")
    args = parser.parse_args()
    fns = calls(args.rows, args.width)
    samples = []
    with torch.no_grad(), torch_threads(1):
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            row = {"t_s": round(time.perf_counter() - start, 2)}
            for name, f in fns.items():  # one call each timed alone (min_sample_s=0), the median of three
                row[name] = round(measure(f, "cpu", warmup=0, repeats=3, min_sample_s=0.0).median_s * 1e3, 3)
            samples.append(row)
            print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            time.sleep(args.every)
    summary = {}
    for name in fns:
        v = sorted(s[name] for s in samples)
        summary[name] = {"min_ms": v[0], "median_ms": statistics.median(v), "max_ms": v[-1]}
    for name, s in summary.items():
        print(f"{name}: min {s['min_ms']:.2f} ms, median {s['median_ms']:.2f}, max {s['max_ms']:.2f}")
    if args.json:
        write_json({"cpu": cpu_model(), "torch": torch.__version__, "rows": args.rows, "width": args.width,
                    "threads": 1, "load_average": load_average(), "summary": summary, "samples": samples}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
