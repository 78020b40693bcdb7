r"""What ``normkit bench`` measures: ops, directions, shapes, and the bytes each case must move.

Achieved bandwidth is ``bytes_moved / time``, where ``bytes_moved`` counts what *must* cross
the memory bus for the op, each tensor once: inputs read once, outputs written once. An
implementation that reads ``x`` twice (one pass for the statistics, one to normalize) pays
for it in time, not in the byte count, so GB/s compares implementations on equal terms and
against the machine's copy bandwidth (:mod:`normkit.bench.copy_bandwidth`).

With ``M`` rows, width ``N``, element size ``e`` (bytes of the input dtype) and parameter
element size ``p`` (weights have the input's dtype in the benchmark):

================  ==========================================  ===============================
op                forward (inference)                         backward
================  ==========================================  ===============================
layer_norm        read x, write y: ``2MNe``; read w, b:       read x, dy; write dx: ``3MNe``;
                  ``2Np``                                     read w, write dw, db: ``3Np``
rms_norm          ``2MNe + Np`` (w only)                      ``3MNe + 2Np`` (w; dw)
add_layer_norm    read x, r; write y, s: ``4MNe`` ;           read s, dy, ds; write dx, dr:
                  ``2Np``                                     ``5MNe``; ``3Np``
add_rms_norm      ``4MNe + Np``                               ``5MNe + 2Np``
================  ==========================================  ===============================

``add_*`` is the fused residual add with the pre-norm output: ``s = x + r``, ``y = norm(s)``,
both returned (the residual stream of a pre-LN transformer block); its backward takes the
gradients of both outputs (``dy``, ``ds``) and produces ``dx`` and ``dr``. ``fwd+bwd`` is the
sum of the two columns. The per-row statistics (mean, rstd: 8 bytes a row, a fraction ``2/N``
of one row of ``x`` in fp32) are not counted: they can be recomputed rather than stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

OPS: Tuple[str, ...] = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
DIRECTIONS: Tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

EPS = 1e-5

# CPU: every shape moves at least 64 MiB per (M, N) tensor in fp32, far beyond the last-level
# cache, so the numbers are DRAM bandwidth, not cache bandwidth.
CPU_WIDTHS: Tuple[int, ...] = (256, 1024, 4096, 16384)
CPU_ELEMENTS = 1 << 24
# CUDA: the sweep of issue 4, capped at 2**28 elements per tensor (1 GiB in fp32) so the ~8
# full-size tensors of an add+norm backward, for every implementation, fit in an 80 GB GPU.
CUDA_WIDTHS: Tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
CUDA_ROWS: Tuple[int, ...] = (4096, 8192, 16384, 32768)
CUDA_MAX_ELEMENTS = 1 << 28
# --quick: tiny shapes that run in well under a second each (tests, smoke checks).
QUICK_SHAPES: Tuple[Tuple[int, int], ...] = ((64, 256), (32, 1000))


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    op: str
    direction: str
    rows: int
    width: int
    dtype: torch.dtype

    @property
    def has_residual(self) -> bool:
        return self.op.startswith("add_")

    @property
    def is_rms(self) -> bool:
        return self.op.endswith("rms_norm")

    @property
    def bytes(self) -> int:
        return bytes_moved(self.op, self.direction, self.rows, self.width, self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(sorted(DTYPES))}") from None


def _check(op: str, direction: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)}")


def bytes_moved(op: str, direction: str, rows: int, width: int, dtype: torch.dtype,
                param_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes that ``op`` must move in ``direction`` on a ``(rows, width)`` input (module docstring)."""
    _check(op, direction)
    e = torch.empty((), dtype=dtype).element_size()
    p = torch.empty((), dtype=param_dtype or dtype).element_size()
    big = rows * width * e  # one (M, N) tensor
    n_params = 1 if op.endswith("rms_norm") else 2  # w, or w and b
    residual = op.startswith("add_")
    fwd = (4 if residual else 2) * big + n_params * width * p
    # backward: read w, write one gradient per parameter
    bwd = (5 if residual else 3) * big + (1 + n_params) * width * p
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]


def default_widths(device: str) -> Tuple[int, ...]:
    return CUDA_WIDTHS if device == "cuda" else CPU_WIDTHS


def default_shapes(device: str, dtype: torch.dtype, widths: Optional[Sequence[int]] = None,
                   rows: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """``(rows, width)`` pairs: the cross product when ``rows`` is given, else the device's
    default rows for each width (CPU: ``rows = 2**24 / width`` in fp32, i.e. 64 MiB per
    tensor, and the same byte size for 16-bit dtypes; CUDA: 4096..32768 rows within the
    per-tensor cap)."""
    widths = tuple(widths) if widths else default_widths(device)
    if rows:
        return [(m, n) for n in widths for m in rows]
    if device == "cuda":
        return [(m, n) for n in widths for m in CUDA_ROWS if m * n <= CUDA_MAX_ELEMENTS]
    scale = 4 // torch.empty((), dtype=dtype).element_size()
    return [(max(1, CPU_ELEMENTS * scale // n), n) for n in widths]


def make_cases(ops: Sequence[str], directions: Sequence[str],
               shapes: Sequence[Tuple[int, int]], dtype: torch.dtype) -> List[Case]:
    for op in ops:
        for direction in directions:
            _check(op, direction)
    return [Case(op, d, m, n, dtype) for (m, n) in shapes for op in ops for d in directions]


def make_inputs(case: Case, device: str, seed: int = 0) -> Dict[str, Optional[Tensor]]:
    """Fresh random tensors for ``case``: x (and r) ~ N(0, 1); w ~ 1 + 0.1 N(0, 1); b ~ 0.1 N(0, 1);
    upstream gradients dy (and ds) ~ N(0, 1)."""
    # Drawn on the device itself: a GiB-sized tensor drawn on the host would take seconds.
    g = torch.Generator(device=device).manual_seed(seed)
    m, n, dt = case.rows, case.width, case.dtype

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, device=device) * scale + shift).to(dt)

    return {
        "x": rand(m, n),
        "residual": rand(m, n) if case.has_residual else None,
        "weight": rand(n, scale=0.1, shift=1.0),
        "bias": None if case.is_rms else rand(n, scale=0.1),
        "dy": rand(m, n),
        "ds": rand(m, n) if case.has_residual else None,
    }
