"""Two CPU measurements quoted in BENCHMARKS.md that the `normkit bench` sweep does not make.

1. Process CPU time against wall time for a 6-block MLP (LayerNorm -> Linear(512) -> GELU,
   input 256 x 512) under ``torch.set_num_threads(1)``. CPU time far above wall time means a
   thread pool is spinning next to the work.
2. Fused residual add + layer_norm backward at 4096 x 4096 float32, timed alone with
   ``torch.autograd.grad(..., retain_graph=True)``, and forward + backward together. The
   median of 15 runs after 3 warm-ups.

    .venv/bin/python benchmarks/cpu_overheads.py
"""

from __future__ import annotations

import time

import torch

import normkit


def _median_ms(fn, repeats: int = 15, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return sorted(samples)[repeats // 2] * 1e3


def one_thread_cpu_time(steps: int = 50) -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(256, 512)
        for cls in (torch.nn.LayerNorm, normkit.nn.LayerNorm):
            blocks = []
            for _ in range(6):
                blocks += [cls(512), torch.nn.Linear(512, 512), torch.nn.GELU()]
            model = torch.nn.Sequential(*blocks).eval()
            with torch.no_grad():
                for _ in range(5):
                    model(x)
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    model(x)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            name = f"{cls.__module__.split('.')[0]}.nn.LayerNorm"
            print(f"1 thread, 6-block MLP forward with {name}: wall {wall / steps * 1e3:.2f} ms, "
                  f"process CPU {cpu / steps * 1e3:.2f} ms")
    finally:
        torch.set_num_threads(saved)


def fused_add_backward() -> None:
    n = 4096
    x, r = torch.randn(n, n, requires_grad=True), torch.randn(n, n, requires_grad=True)
    w, b = torch.randn(n, requires_grad=True), torch.randn(n, requires_grad=True)
    dy = torch.randn(n, n)
    y = normkit.layer_norm(x, n, w, b, residual=r)
    bwd = _median_ms(lambda: torch.autograd.grad(y, (x, r, w, b), dy, retain_graph=True))
    both = _median_ms(lambda: torch.autograd.grad(normkit.layer_norm(x, n, w, b, residual=r), (x, r, w, b), dy))
    print(f"add + layer_norm 4096x4096 float32 ({torch.get_num_threads()} threads): backward {bwd:.2f} ms, "
          f"forward + backward {both:.2f} ms")


if __name__ == "__main__":
    one_thread_cpu_time()
    fused_add_backward()
