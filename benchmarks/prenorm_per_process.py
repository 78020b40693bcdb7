"""One process's time for layer norm + residual with prenorm, against plain copies (4K aliasing lottery).

Where a row loop's scratch rows land in their pages relative to the call's tensors was, before
cpu_runtime.h's ScratchRows, the heap's choice: the same for every call of a process, different
from process to process. So a slow placement shows as a process whose prenorm calls are all
slow while its copies and its plain residual calls are not. ``--processes N`` runs the
measurement in N fresh processes (the normkit on PYTHONPATH) and prints one line each::

    PYTHONPATH=src python benchmarks/prenorm_per_process.py --processes 6 [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

import normkit
import normkit.functional as F
from normkit._machine import cpu_model, git_commit, load_average
from normkit.bench.report import write_json
from normkit.bench.timing import measure


def one_process() -> dict:
    """This process's medians (ms, three samples of five calls) of each call."""
    torch.set_num_threads(1)
    rows, n = 4096, 2048
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    y, s, c = torch.empty(rows, n), torch.empty(rows, n), torch.empty(rows, n)
    calls = {
        "prenorm": lambda: F.layer_norm(x, (n,), w, b, residual=r, prenorm=True, out=y, residual_out=s),
        "residual": lambda: F.layer_norm(x, (n,), w, b, residual=r, out=y),
        "copy": lambda: c.copy_(x),
    }
    return {k: [round(measure(f, "cpu", warmup=2, repeats=5).median_s * 1e3, 2) for _ in range(3)]
            for k, f in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=0, help="run in this many fresh processes (0: this one)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.processes == 0:
        ms = one_process()
        print(json.dumps(ms) if args.json == "-" else
              f"normkit {normkit.__file__}: ms (three samples) " + "  ".join(f"{k} {v}" for k, v in ms.items()))
        return 0
    record = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(), "threads": 1, "rows": 4096,
              "width": 2048, "normkit": normkit.__file__, "load_average_before": load_average(), "processes": []}
    for k in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--json", "-"], check=True, capture_output=True, text=True)
        ms = json.loads(out.stdout)
        record["processes"].append(ms)
        print(f"process {k + 1}: ms (three samples) " + "  ".join(f"{name} {v}" for name, v in ms.items()), flush=True)
    record["load_average_after"] = load_average()
    if args.json:
        write_json(record, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
