"""Input generators and tolerances shared by the test modules.

Inputs are fresh random draws (never zeros) from a generator seeded per test, so a failure
reproduces; widths include the odd sizes kernels get wrong (1, 3, 1000, 4097).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch

import normkit
from normkit.backends import get_backend

LOW_PRECISION = (torch.float16, torch.bfloat16)


def randn(shape: Sequence[int], dtype=torch.float32, *, seed: int = 0, offset: float = 0.0, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    """Normal(offset, scale) in float64, rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale + offset).to(dtype)
    return t.requires_grad_(requires_grad)


def params(n_shape: Sequence[int], dtype=torch.float32, *, seed: int = 1):
    """A gain near 1 and a bias near 0, both random so that a swapped or ignored one shows."""
    w = randn(n_shape, torch.float64, seed=seed, scale=0.5, offset=1.0).to(dtype)
    b = randn(n_shape, torch.float64, seed=seed + 1, scale=0.5).to(dtype)
    return w, b


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_truth(got: torch.Tensor, truth: torch.Tensor, baseline: Optional[torch.Tensor], *, slack: float = 2.0, floor: float = 1e-5, what: str = "") -> None:
    """``got`` is within ``slack`` × the error of ``baseline`` (PyTorch's own computation in the
    same dtype) from a float64 ``truth``, plus a small floor — the flash-attention rule."""
    err = max_err(got, truth)
    allowed = floor * max(1.0, truth.abs().max().item() if truth.numel() else 0.0)
    if baseline is not None:
        allowed += slack * max_err(baseline, truth)
    assert err <= allowed, f"{what}: max error {err:.3g} exceeds allowed {allowed:.3g}"


def tolerance(dtype: torch.dtype) -> dict:
    """rtol/atol for comparing one implementation with another in the same dtype."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
    }[dtype]


def backend_or_skip(name: str):
    import pytest

    reason = get_backend(name).unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return get_backend(name)


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    with normkit.use_backend(name):
        yield


def run_two_gloo_processes(worker, args: tuple = (), *, world: int = 2, timeout_s: float = 240.0) -> None:
    """Run ``worker(rank, port, *args)`` in ``world`` spawned processes that form a gloo group on
    a free loopback port. A worker's exception fails the caller with its traceback; a worker
    still running after ``timeout_s`` is killed and fails the test (a hang, not a slow run)."""
    import socket
    import time

    import pytest
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.start_processes(worker, args=(port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):  # raises (with the worker's traceback) if a worker failed
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"workers {alive} still running after {timeout_s} s: killed (a hang, not a slow run)")
