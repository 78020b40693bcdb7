"""Time per call against where an output starts in its page, relative to the input (4K aliasing).

A load whose address matches a store still in flight in its low 12 bits (the page offset)
waits for that store on x86 cores, though the two addresses differ: "4K aliasing". A row
kernel that stores y[j] and then loads x[j + k] a few vectors later pays for it on every
vector when y starts k elements after x modulo 4 KiB. Which offsets a user's tensors have is
the allocator's choice: fresh tensors of one size from mmap share one offset (0 apart);
tensors from the heap are 64-byte aligned anywhere in a page.

For each call, the output named by --shift is placed `delta` bytes after the input modulo
4 KiB (the other outputs stay at 0 apart), for each delta in -256..512 in steps of 64, the
deltas timed in turn, round after round; prints each delta's median time over the median at
delta 0::

    PYTHONPATH=src python benchmarks/bench_page_offsets.py --threads 1 --json OUT.json

``--shift scratch`` moves the row loops' scratch rows instead (``_C.set_scratch_offset``: one
after another, `delta` bytes after x, every delta of the page in steps of 64) against their own
placement (cpu_runtime.h ScratchRows), whose time is the 1.0 there.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import normkit.functional as F
from normkit._machine import cpu_model, git_commit
from normkit.backends import cpu as compiled
from normkit.bench.timing import measure

PAGE = 4096


def at_offset(buffer: torch.Tensor, anchor: torch.Tensor, delta: int, shape) -> torch.Tensor:
    """A view of buffer of `shape` starting `delta` bytes after anchor's start, modulo a page."""
    size = buffer.element_size()
    start = ((anchor.data_ptr() + delta - buffer.data_ptr()) % PAGE) // size
    view = buffer[start:start + torch.Size(shape).numel()].view(shape)
    assert (view.data_ptr() - anchor.data_ptr()) % PAGE == delta % PAGE
    return view


def calls(rows: int, width: int, shift: str):
    """(name, make(delta) -> zero-argument call) for each call timed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=g)
    r = torch.randn(rows, width, generator=g)
    w, b, w1, b1 = (torch.randn(width, generator=g) for _ in range(4))
    spare = [torch.empty(rows * width + PAGE) for _ in range(3)]
    fixed = [at_offset(s, x, 0, x.shape) for s in spare]

    def outputs(delta):
        names = ("y", "y1", "s")
        return [at_offset(spare[k], x, delta, x.shape) if shift == name else fixed[k]
                for k, name in enumerate(names)]

    def plain(delta):
        y, _, _ = outputs(delta)
        return lambda: F.layer_norm(x, (width,), w, b, out=y)

    def rms(delta):
        y, _, _ = outputs(delta)
        return lambda: F.rms_norm(x, (width,), w, out=y)

    def prenorm(delta):
        y, _, s = outputs(delta)
        return lambda: F.layer_norm(x, (width,), w, b, residual=r, prenorm=True, out=y, residual_out=s)

    def two_outputs(delta):
        y, y1, _ = outputs(delta)
        return lambda: F.layer_norm(x, (width,), w, b, weight1=w1, bias1=b1, out=y, out1=y1)

    if shift == "scratch":  # every output at 0 apart; the scratch rows moved (None: placed)
        y, _, s = fixed
        set_offset = compiled.extension.set_scratch_offset
        scratch_calls = {
            "layer_norm + residual": lambda: F.layer_norm(x, (width,), w, b, residual=r, out=y),
            "layer_norm + residual, prenorm": lambda: F.layer_norm(x, (width,), w, b, residual=r, prenorm=True,
                                                                   out=y, residual_out=s),
            "layer_norm dropout 0.1 + residual, prenorm": lambda: F.layer_norm(
                x, (width,), w, b, residual=r, prenorm=True, dropout_p=0.1, out=y, residual_out=s),
        }

        def moved(call):
            def make(delta):
                offset = -1 if delta is None else delta % PAGE
                return lambda: (set_offset(offset), call(), set_offset(-1))
            return make

        return [(name, moved(call)) for name, call in scratch_calls.items()]
    made = {"layer_norm": plain, "rms_norm": rms}
    if shift in ("y", "s"):
        made["layer_norm + residual, prenorm"] = prenorm
    if shift in ("y", "y1"):
        made["layer_norm + weight1/bias1"] = two_outputs
    return list(made.items())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--shift", choices=("y", "y1", "s", "scratch"), default="y")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    deltas = [None, *range(0, PAGE, 64)] if a.shift == "scratch" else list(range(-256, 512 + 1, 64))
    base = None if a.shift == "scratch" else 0
    out = {"cpu": cpu_model(), "torch": torch.__version__, "commit": git_commit(), "rows": a.rows, "width": a.width,
           "threads": a.threads, "shift": a.shift, "baseline": "placed" if base is None else "delta 0", "calls": {}}
    for name, make in calls(a.rows, a.width, a.shift):
        fns = {d: make(d) for d in deltas}
        times = {d: [] for d in deltas}
        for _ in range(a.rounds):
            for d in deltas:
                times[d].append(measure(fns[d], "cpu", warmup=1, repeats=3).median_s)
        med = {d: statistics.median(t) for d, t in times.items()}
        rel = {("placed" if d is None else d): med[d] / med[base] for d in deltas}
        out["calls"][name] = {"ms_at_baseline": med[base] * 1e3, "time_over_baseline": rel}
        print(f"{name} ({a.shift} - x, bytes mod 4 KiB; time / time at {out['baseline']}, "
              f"which is {med[base] * 1e3:.2f} ms)")
        print("  " + "  ".join(f"{d}: {v:.2f}" for d, v in rel.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
