"""One process's time for layer norm + residual with prenorm, against plain copies (4K aliasing lottery).

Where a row loop's scratch rows land in their pages relative to the call's tensors was, before
cpu_runtime.h's ScratchRows, the heap's choice: the same for every call of a process, different
from process to process. So a slow placement shows as a process whose prenorm calls are all
slow while its copies and its plain residual calls are not. Run it in several processes, with
the build to test first on PYTHONPATH::

    for i in 1 2 3 4 5 6; do PYTHONPATH=src python benchmarks/prenorm_per_process.py; done
"""

from __future__ import annotations

import torch

import normkit
import normkit.functional as F
from normkit.bench.timing import measure


def main() -> int:
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
    ms = {k: [round(measure(f, "cpu", warmup=2, repeats=5).median_s * 1e3, 1) for _ in range(3)]
          for k, f in calls.items()}
    print(f"normkit {normkit.__file__}: ms (three samples) " + "  ".join(f"{k} {v}" for k, v in ms.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
