"""How close the CPU layer-norm forward gets to the memory limit, and what the output allocation costs.

At one shape (default 4096 x 4096 float32, 64 MiB in and 64 MiB out) and each thread count it
times, best of ``--repeats`` (after warm-up), in one process:

* ``copy``: ``dst.copy_(src)`` into an existing buffer: this machine's copy bandwidth (the
  memory limit for an op that reads the input once and writes the output once);
* ``kernel``: normkit's forward into an existing buffer (``normkit._C.forward(..., out=y)``);
* ``normkit``: ``normkit.layer_norm`` out of place (the kernel plus a fresh 64 MiB output,
  advised to use transparent huge pages);
* ``torch``: ``torch.nn.functional.layer_norm`` out of place;
* ``alloc``: a fresh output alone: ``torch.empty`` plus the first write of every page (``fill_``
  into the new tensor minus ``fill_`` into an existing one), the cost the out-of-place ops pay on
  top of the kernel.

GB/s count the bytes an op must move (read x, write y). ``kernel / copy`` is the fraction of the
memory limit the kernel reaches; ``alloc share`` is the fraction of the out-of-place time that
is not the kernel. Run::

    .venv/bin/python benchmarks/bench_bandwidth.py --json benchmarks/results/bandwidth-<date>-<cpu>.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable, Dict

import torch

import normkit
from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.backends import cpu as compiled


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(rows: int, n: int, threads: int, repeats: int) -> Dict[str, float]:
    x = torch.randn(rows, n)
    w, b = torch.randn(n), torch.randn(n)
    y = torch.empty_like(x)
    src, dst = torch.randn(rows, n), torch.empty(rows, n)
    nbytes = 2 * x.numel() * x.element_size()  # read once, write once
    with torch_threads(threads):
        t = {
            "copy": best_seconds(lambda: dst.copy_(src), repeats),
            "kernel": best_seconds(lambda: compiled.extension.forward(x, None, w, b, 1e-5, False, False, y), repeats),
            "normkit": best_seconds(lambda: normkit.layer_norm(x, n, w, b), repeats),
            "torch": best_seconds(lambda: torch.nn.functional.layer_norm(x, (n,), w, b), repeats),
            "fill_existing": best_seconds(lambda: dst.fill_(1.0), repeats),
            "fill_fresh": best_seconds(lambda: torch.empty(rows, n).fill_(1.0), repeats),
        }
    alloc = max(t["fill_fresh"] - t["fill_existing"], 0.0)
    return {
        "threads": threads,
        **{f"{k}_ms": v * 1e3 for k, v in t.items()},
        "alloc_ms": alloc * 1e3,
        **{f"{k}_gbs": nbytes / t[k] / 1e9 for k in ("copy", "kernel", "normkit", "torch")},
        "kernel_of_copy": t["copy"] / t["kernel"],
        "normkit_alloc_share": max(t["normkit"] - t["kernel"], 0.0) / t["normkit"],
        "torch_over_normkit": t["torch"] / t["normkit"],
    }


def markdown(result: dict) -> str:
    head = (
        f"{result['cpu']}, torch {result['torch']}, commit {result['commit']}, "
        f"{result['rows']}x{result['n']} float32, best of {result['repeats']}\n\n"
        "| threads | copy GB/s | kernel GB/s | kernel / copy | normkit out-of-place GB/s | fresh-output cost ms | "
        "share of out-of-place time not in the kernel | torch GB/s | torch / normkit time |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {r['threads']} | {r['copy_gbs']:.1f} | {r['kernel_gbs']:.1f} | {r['kernel_of_copy']:.0%} | "
        f"{r['normkit_gbs']:.1f} | {r['alloc_ms']:.1f} | {r['normkit_alloc_share']:.0%} | {r['torch_gbs']:.1f} | "
        f"{r['torch_over_normkit']:.2f}x |"
        for r in result["runs"]
    ]
    return head + "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if compiled.extension is None:
        raise SystemExit(f"normkit._C is not built: {compiled.BACKEND.unavailable_reason()}")
    result = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "load_average_before": load_average(),
        "rows": args.rows,
        "n": args.n,
        "repeats": args.repeats,
        "command": "python benchmarks/bench_bandwidth.py " + " ".join(
            f"--{k} {v}" for k, v in (("rows", args.rows), ("n", args.n), ("threads", args.threads), ("repeats", args.repeats))
        ),
        "runs": [measure(args.rows, args.n, int(t), args.repeats) for t in args.threads.split(",")],
    }
    result["load_average_after"] = load_average()
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
