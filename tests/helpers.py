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
