"""Which CPU forward path an option call should take: the evidence for ``fused::option_rows``.

The option calls of ``normkit bench --suite options`` (into ``out=`` / ``residual_out=``
buffers) and their RMS-norm twins, at 4096 x 2048 (from DRAM) and 1024 x 2048 (in the
last-level cache), each timed in interleaved pairs against ``dst.copy_(src)`` of its input
(:mod:`normkit.bench.paired`) at 1 thread; printed and saved: time / copy with its 95 %
interval. Run it once per build, each from its own source tree, to compare the one-read
option loop (``csrc/fused_options_cpu.cpp``) against the row passes (``FwdPlan``,
``csrc/fused_cpu.cpp``), alternating the two builds::

    PYTHONPATH=src python benchmarks/bench_option_paths.py --json PATH
"""

from __future__ import annotations

import argparse
import json
from typing import Callable, Dict

import torch

import normkit
from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs

SHAPES = ((4096, 2048), (1024, 2048))
BF16 = torch.bfloat16


def calls(t: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], object]]:
    """name -> the call, every output into a preallocated buffer."""
    n = t["x"].shape[-1]
    w, b, out, out16, s32 = t["w"], t["b"], t["out"], t["out16"], t["s32"]
    ln, rms = normkit.layer_norm, normkit.rms_norm
    return {
        "LN + residual + x1": lambda: ln(t["x"], (n,), w, b, residual=t["r"], x1=t["x1"], out=out),
        "LN + residual + rowscale": lambda: ln(t["x"], (n,), w, b, residual=t["r"], rowscale=t["rs"], out=out),
        "LN dropout 0.1": lambda: ln(t["x"], (n,), w, b, dropout_p=0.1, training=True, out=out),
        "LN out_dtype=bfloat16": lambda: ln(t["x"], (n,), w, b, out_dtype=BF16, out=out16),
        "LN bf16 residual_in_fp32": lambda: ln(t["x16"], (n,), w, b, residual=t["r16"], residual_in_fp32=True, out=out16),
        "LN bf16 residual_in_fp32, prenorm": lambda: ln(t["x16"], (n,), w, b, residual=t["r16"], residual_in_fp32=True,
                                                        prenorm=True, out=out16, residual_out=s32),
        "RMS + residual + x1": lambda: rms(t["x"], (n,), w, residual=t["r"], x1=t["x1"], out=out),
        "RMS + residual + rowscale": lambda: rms(t["x"], (n,), w, residual=t["r"], rowscale=t["rs"], out=out),
        "RMS dropout 0.1": lambda: rms(t["x"], (n,), w, dropout_p=0.1, training=True, out=out),
    }


def tensors(rows: int, width: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g)
    r = torch.randn(rows, width, generator=g)
    return {
        "x": x, "r": r, "x1": torch.randn(rows, width, generator=g), "rs": torch.rand(rows, generator=g) + 0.5,
        "x16": x.bfloat16(), "r16": r.bfloat16(), "w": torch.randn(width, generator=g), "b": torch.randn(width, generator=g),
        "out": torch.empty(rows, width), "out16": torch.empty(rows, width, dtype=BF16), "s32": torch.empty(rows, width),
        "src": torch.randn(rows, width, generator=g), "dst": torch.empty(rows, width),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="timed pairs per call")
    parser.add_argument("--json")
    args = parser.parse_args()
    results = []
    record = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(), "threads": 1,
              "load_average_before": load_average(), "results": results,
              "command": f"python benchmarks/bench_option_paths.py --seconds {args.seconds}"}
    with torch.no_grad(), torch_threads(1):
        for rows, width in SHAPES:
            t = tensors(rows, width)
            copy = lambda: t["dst"].copy_(t["src"])  # noqa: E731
            for name, fn in calls(t).items():
                est = estimate_ratio(measure_pairs(fn, copy, budget_s=args.seconds))
                results.append({"call": name, "rows": rows, "width": width, "time_over_copy": est.median,
                                "ci_low": est.low, "ci_high": est.high, "pairs": est.pairs})
                print(f"{rows}x{width} {name}: {est.median:.2f}x copy [{est.low:.2f}, {est.high:.2f}]", flush=True)
    record["load_average_after"] = load_average()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
