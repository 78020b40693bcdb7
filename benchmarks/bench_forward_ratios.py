"""The CPU layer-norm forward against a copy and against torch, in interleaved pairs, per shape.

For each thread count and shape, ``normkit._C.forward(..., out=y)`` (the kernel into an existing
buffer) is timed in interleaved pairs (:mod:`normkit.bench.paired`) against ``dst.copy_(src)``
of the same bytes and against ``torch.nn.functional.layer_norm``; printed: copy time / kernel
time (the fraction of copy bandwidth the kernel reaches; above 0.8 is issue 23's target),
torch time / kernel time, and the kernel's median time as cycles per element per thread at a
nominal clock (``--ghz``). Run::

    PYTHONPATH=src python benchmarks/bench_forward_ratios.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from normkit._machine import cpu_model, git_commit, load_average
from normkit.backends import cpu as compiled
from normkit.bench.paired import estimate_ratio, measure_pairs

SHAPES = ((4096, 4096, "float32"), (64, 4096, "float32"), (1024, 4096, "float32"), (8192, 768, "float32"),
          (1024, 1024, "float32"), (8192, 1024, "float32"), (4096, 4096, "bfloat16"), (8192, 1024, "bfloat16"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed pairs per comparison")
    parser.add_argument("--ghz", type=float, default=2.6, help="nominal clock for cycles per element")
    parser.add_argument("--json")
    args = parser.parse_args()
    ext = compiled.extension
    runs = []
    result = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(),
              "load_average_before": load_average(), "runs": runs,
              "command": f"python benchmarks/bench_forward_ratios.py --threads {args.threads} --seconds {args.seconds}"}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for rows, n, dt in SHAPES:
            dtype = getattr(torch, dt)
            x = torch.randn(rows, n).to(dtype)
            w, b = torch.randn(n), torch.randn(n)
            y, src = torch.empty_like(x), torch.randn(rows, n).to(dtype)
            dst = torch.empty_like(src)
            kernel = lambda: ext.forward(x, None, w, b, 1e-5, False, False, y)  # noqa: E731
            vs_copy = measure_pairs(kernel, lambda: dst.copy_(src), budget_s=args.seconds)
            wt, bt = w.to(dtype), b.to(dtype)
            vs_torch = measure_pairs(kernel, lambda: torch.nn.functional.layer_norm(x, (n,), wt, bt), budget_s=args.seconds)
            kernel_s = sorted(vs_copy.a_s)[len(vs_copy.a_s) // 2]
            run = {"threads": threads, "rows": rows, "n": n, "dtype": dt,
                   "copy_over_kernel": 1 / estimate_ratio(vs_copy).median,
                   "torch_over_kernel": 1 / estimate_ratio(vs_torch).median,
                   "kernel_us": kernel_s * 1e6,
                   "cycles_per_element": kernel_s * args.ghz * 1e9 * threads / (rows * n)}
            runs.append(run)
            print(f"{threads} thread(s) {rows} x {n} {dt}: kernel at {run['copy_over_kernel']:.2f} of copy, "
                  f"{run['torch_over_kernel']:.2f}x torch, {run['kernel_us']:.0f} us, "
                  f"{run['cycles_per_element']:.2f} cycles/element", flush=True)
    result["load_average_after"] = load_average()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
