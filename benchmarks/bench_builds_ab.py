"""Two builds of ``normkit._C`` timed against each other in one process: is a kernel change faster?

On a noisy machine (a VM whose speed swings by 15 % between runs) two builds timed in two runs
cannot be compared; here both extension files are loaded into one process under two module
names, and each forward call of the fused kernel (``_C.fused_forward``, every output into a
preallocated buffer, no Python path) runs in interleaved pairs (:mod:`normkit.bench.paired`):
the median per-pair ratio ``old / new`` (above 1: the new build is faster) with its 95 %
interval, and whether the two builds wrote the same bits. Copy a build's ``_C*.so`` aside
before rebuilding, then::

    PYTHONPATH=src python benchmarks/bench_builds_ab.py OLD.so src/normkit/_C*.so \\
        [--rows 4096] [--threads 1] [--calls "LN dropout 0.1;RMS"] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
from typing import Callable, Dict

import torch

from normkit._machine import cpu_model, git_commit, load_average, torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs
from normkit.bench.report import write_json

F32, BF16 = torch.float32, torch.bfloat16


def load_build(path: str, tag: str):
    """The extension file at ``path`` as module ``<tag>._C`` (a second build needs its own name)."""
    name = f"{tag}._C"
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path, loader=loader))
    loader.exec_module(module)
    return module


def tensors(rows: int, n: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(rows, n, generator=g) for k in ("x", "r", "x1")}
    t.update(w=torch.randn(n, generator=g), b=torch.randn(n, generator=g), rs=torch.rand(rows, generator=g) + 0.5,
             w1=torch.randn(n, generator=g), y=torch.empty(rows, n), y1=torch.empty(rows, n), s=torch.empty(rows, n),
             y16=torch.empty(rows, n, dtype=BF16), y16_1=torch.empty(rows, n, dtype=BF16))
    t.update(x16=t["x"].bfloat16(), r16=t["r"].bfloat16(), x1_16=t["x1"].bfloat16())
    return t


def calls(C, t: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], object]]:
    """name -> (the call on build C, the output it writes)."""
    x, r, x1, w, b, rs, y, s, y16 = (t[k] for k in ("x", "r", "x1", "w", "b", "rs", "y", "s", "y16"))

    def fwd(x, r, x1, rs, w, b, rms, p, out_dtype, store_sum, out, s_out=None, w1=None, y1=None, masks=False):
        # (sums float32)
        return lambda: C.fused_forward(x, r, x1, rs, w, b, w1, b if w1 is not None else None, 1e-5, rms, p, 7, F32,
                                       out_dtype, store_sum, masks, out, y1, s_out)

    return {
        "LN": (fwd(x, None, None, None, w, b, False, 0.0, F32, False, y), y),
        "LN + residual": (fwd(x, r, None, None, w, b, False, 0.0, F32, False, y), y),
        "LN + residual + rowscale": (fwd(x, r, None, rs, w, b, False, 0.0, F32, False, y), y),
        "LN + residual + x1": (fwd(x, r, x1, None, w, b, False, 0.0, F32, False, y), y),
        "LN + rowscale": (fwd(x, None, None, rs, w, b, False, 0.0, F32, False, y), y),
        "LN + weight1/bias1": (fwd(x, None, None, None, w, b, False, 0.0, F32, False, y, w1=t["w1"], y1=t["y1"]), y),
        "LN dropout 0.1": (fwd(x, None, None, None, w, b, False, 0.1, F32, False, y), y),
        "LN dropout 0.1 + residual, prenorm": (fwd(x, r, None, None, w, b, False, 0.1, F32, True, y, s), y),
        "LN dropout 0.1 + x1": (fwd(x, None, x1, None, w, b, False, 0.1, F32, False, y), y),
        "LN dropout 0.1, mask": (fwd(x, None, None, None, w, b, False, 0.1, F32, False, y, masks=True), y),
        "LN out_dtype=bfloat16": (fwd(x, None, None, None, w, b, False, 0.0, BF16, False, y16), y16),
        "LN bf16 dropout 0.1": (fwd(t["x16"], None, None, None, w, b, False, 0.1, BF16, False, y16), y16),
        "LN bf16 residual_in_fp32, prenorm": (fwd(t["x16"], t["r16"], None, None, w, b, False, 0.0, BF16, True, y16, s),
                                              y16),
        "LN bf16 + residual + x1": (fwd(t["x16"], t["r16"], t["x1_16"], None, w, b, False, 0.0, BF16, False, y16), y16),
        "LN bf16 + residual + rowscale": (fwd(t["x16"], t["r16"], None, rs, w, b, False, 0.0, BF16, False, y16), y16),
        "LN bf16 + weight1/bias1": (fwd(t["x16"], None, None, None, w, b, False, 0.0, BF16, False, y16, w1=t["w1"],
                                        y1=t["y16_1"]), y16),
        "RMS": (fwd(x, None, None, None, w, None, True, 0.0, F32, False, y), y),
        "RMS dropout 0.1": (fwd(x, None, None, None, w, None, True, 0.1, F32, False, y), y),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed pairs per call")
    parser.add_argument("--calls", help="semicolon-separated names (default: all)")
    parser.add_argument("--json")
    args = parser.parse_args()
    old, new = load_build(args.old, "old"), load_build(args.new, "new")
    t = tensors(args.rows, args.width)
    old_calls, new_calls = calls(old, t), calls(new, t)
    names = args.calls.split(";") if args.calls else list(old_calls)
    results = []
    record = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(), "threads": args.threads,
              "rows": args.rows, "width": args.width, "old": args.old, "new": args.new,
              "load_average_before": load_average(), "results": results}
    with torch.no_grad(), torch_threads(args.threads):
        for name in names:
            (fo, out), (fn, _) = old_calls[name], new_calls[name]
            fo()
            want = out.clone()
            fn()
            same = torch.equal(out, want)
            est = estimate_ratio(measure_pairs(fo, fn, budget_s=args.seconds))
            results.append({"call": name, "old_over_new": est.median, "ci_low": est.low, "ci_high": est.high,
                            "pairs": est.pairs, "same_bits": same})
            print(f"{name}: old / new {est.median:.3f} [{est.low:.3f}, {est.high:.3f}] ({est.pairs} pairs), "
                  f"same bits: {same}", flush=True)
    record["load_average_after"] = load_average()
    if args.json:
        write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
