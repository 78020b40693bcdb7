r"""The ``"triton"`` backend: fused layer norm / RMS norm kernels for CUDA tensors.

The kernels are in :mod:`normkit.backends.triton_kernels`: one forward and one backward kernel
implementing the fused contract (:mod:`normkit.contract`), each option a constexpr;
:meth:`TritonBackend.forward` / :meth:`~TritonBackend.backward` (the plain contract) launch the
same kernels with the options off. This module holds the backend class, the launch
configuration and the launchers. It never imports the kernels module before the first
launch, and asks Triton nothing until :meth:`TritonBackend.unavailable_reason` is called.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors through Triton's interpreter:
slow, but anyone can check the backend without a GPU, and it is how the test suite runs it
(``tests/conftest.py``). Triton reads the variable when it is imported, and ``import torch``'s
custom-op machinery imports Triton on ``import normkit``: set it before starting Python.

Launch heuristics. They are derived from the kernels' structure and from ptxas's static resource
report for sm_90 (registers and spill stack per kernel variant, compiled ahead of time without a
GPU); they have *not* been timed on a GPU.

* **Whole row on chip** while the row fits without register spills: up to 16K elements in
  forward (8K with dropout, whose Philox rounds need registers), 8K in backward (4K with dropout;
  backward also keeps float32 accumulator tiles for dweight/dbias), and never more than
  ``max_fused_bytes`` (64 KiB) per row. Then ``BLOCK_N = next_pow2(N)`` and each element is read
  and written once, the minimum traffic. Wider rows take the looped path in ``loop_block_n``
  (4096) chunks: forward reads the input twice, backward runs a row-statistics pass first, so
  any width works at the cost of one extra read of the input.
* **Several rows per program for small N**: tiles of ``BLOCK_M x BLOCK_N`` with ``BLOCK_M =
  min_tile // BLOCK_N`` (at least 4096 elements per program), so narrow rows give few, full
  programs instead of many nearly empty ones (meant to keep small widths from being slower than
  eager).
* **num_warps from the tile size**: 8 elements per thread (``tile / 256`` warps, clamped to
  1..32). At 16 per thread the backward kernel already spills at 4K-8K wide rows; 8 leaves room
  for the float32 copies backward keeps (s, dy, s_hat, g_hat, accumulators).
  A backward with a second output (``dy1``: two gradient streams, four float32 accumulator
  tiles for dw/db/dw1/db1) gets 4 elements per thread, so at most 4096 elements per row on chip
  (32 warps) and tiles of at least 2048: ptxas reports 64-128 bytes of spill stack for that
  variant at 8 per thread, none at 4 (``tests/triton_aot.py --all``). No GPU was available for
  this choice either: the spill report chose it; it is not timed.
* **Persistent backward grid**: ``min(row tiles, SMs x max(1, 32 // num_warps))`` programs, each
  looping over row tiles with a stride, so the ``(programs, N)`` float32 partial-sum buffer for
  dweight/dbias stays small and its final ``sum(0)`` is cheap. No atomics: the same input gives
  the same bits every run (on the same GPU model, whose SM count fixes the grid).
* Under the interpreter programs run one after another in Python, so the grid is kept small
  (tiles of at least 16K elements, a backward grid of 2 programs): there the number of programs
  costs, not their size.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from normkit.backends.base import Backend
from normkit.contract import ForwardOut, GradNeeds, GradsOut, KernelSpec, sum_is_input

__all__ = ["BACKEND", "LaunchConfig", "TritonBackend", "launch_config"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_FUSED_BYTES = 64 * 1024
# Widest row (elements) kept whole on chip, by (backward, dropout): the widest with no register
# spills in ptxas's sm_90 resource report at 8-16 elements per thread (see module docstring).
MAX_SINGLE_PASS = {(False, False): 16384, (False, True): 8192, (True, False): 8192, (True, True): 4096}
ELEMENTS_PER_THREAD = 8
LOOP_BLOCK_N = 4096
MIN_TILE = 4096
_INTERPRETER_MIN_TILE = 16384
_INTERPRETER_SMS = 2


def _interpreting() -> bool:
    """Whether Triton kernels run in its interpreter: ``TRITON_INTERPRET=1`` was set when Triton
    was imported (it decides at import time; ``torch`` imports it on ``import normkit``)."""
    return _interpreter_state() == "on"


def _interpreter_state() -> str:
    """``"on"``, ``"off"``, or ``"too late"`` (the variable is set but Triton was already
    imported without it)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "off"
    language = sys.modules.get("triton.language")
    if language is None or not hasattr(language, "sum"):
        return "on"  # Triton will be imported with the variable set
    return "on" if _imported_interpreted(language) else "too late"


def _imported_interpreted(language) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(language.sum, InterpretedFunction)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class LaunchConfig:
    """How one call is tiled: ``block_m x block_n`` tiles, ``single_pass`` when the whole row
    fits (``block_n >= N``), ``num_warps`` per program, and ``grid`` programs (forward: one per
    row tile; backward: the persistent program count)."""

    block_m: int
    block_n: int
    single_pass: bool
    num_warps: int
    grid: int


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(
    rows: int,
    n: int,
    element_size: int,
    *,
    backward: bool,
    sm_count: int,
    dropout: bool = False,
    interpreter: bool = False,
    max_fused_bytes: int = MAX_FUSED_BYTES,
    loop_block_n: int = LOOP_BLOCK_N,
    min_tile: Optional[int] = None,
    second_output: bool = False,
) -> LaunchConfig:
    """The launch configuration for an ``(rows, n)`` input (heuristics in the module docstring).
    ``second_output``: a backward with ``dy1`` (four float32 accumulators, two gradient streams),
    which gets half the elements per thread."""
    per_thread = ELEMENTS_PER_THREAD // 2 if second_output else ELEMENTS_PER_THREAD
    widest = 32 * 32 * per_thread if second_output else MAX_SINGLE_PASS[backward, dropout]  # 32 warps
    block_n = _next_pow2(n)
    single_pass = block_n <= min(max_fused_bytes // element_size, MAX_SINGLE_PASS[backward, dropout], widest)
    if not single_pass:
        block_n = min(_next_pow2(loop_block_n), block_n, widest)
    if min_tile is None:
        min_tile = _INTERPRETER_MIN_TILE if interpreter else MIN_TILE
    if second_output and not interpreter:
        min_tile //= 2
    block_m = min(_next_pow2(rows), max(1, min_tile // block_n))
    tile = block_m * block_n
    num_warps = max(1, min(32, _next_pow2(tile) // (32 * per_thread)))
    n_tiles = math.ceil(rows / block_m)
    grid = n_tiles
    if backward:
        per_sm = 1 if interpreter else max(1, 32 // num_warps)
        grid = max(1, min(n_tiles, (_INTERPRETER_SMS if interpreter else sm_count) * per_sm))
    return LaunchConfig(block_m, block_n, single_pass, num_warps, grid)


class TritonBackend(Backend):
    """Triton kernels (see :mod:`normkit.backends.triton_kernels`) behind the backend contract.

    ``max_fused_bytes``, ``loop_block_n`` and ``min_tile`` override the launch heuristics; tests
    use tiny ones to exercise the looped (wide-row) path and the persistent loop on small inputs.
    """

    name = "triton"
    default_for = ("cuda",)

    def __init__(
        self,
        *,
        max_fused_bytes: int = MAX_FUSED_BYTES,
        loop_block_n: int = LOOP_BLOCK_N,
        min_tile: Optional[int] = None,
    ):
        self.max_fused_bytes = int(max_fused_bytes)
        self.loop_block_n = int(loop_block_n)
        self.min_tile = min_tile

    def unavailable_reason(self) -> Optional[str]:
        return _unavailable_reason(torch.cuda.is_available(), _interpreter_state())

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        if x.dtype not in _DTYPES:
            return False
        return x.is_cuda or (x.device.type == "cpu" and _interpreting())

    def _config(self, x: Tensor, backward: bool, dropout: bool = False, element_size: Optional[int] = None,
                second_output: bool = False) -> LaunchConfig:
        rows, n = x.shape
        sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 1
        return launch_config(
            rows,
            n,
            x.element_size() if element_size is None else element_size,
            backward=backward,
            sm_count=sms,
            dropout=dropout,
            interpreter=not x.is_cuda,
            max_fused_bytes=self.max_fused_bytes,
            loop_block_n=self.loop_block_n,
            min_tile=self.min_tile,
            second_output=second_output,
        )

    # The plain contract is the fused one with its options off: the same two kernels serve both.

    # --- the fused contract (normkit.contract): one forward and one backward kernel,
    # every option a constexpr switch.

    def fused_supports(self, x: Tensor, spec: KernelSpec) -> bool:
        # float64 anywhere (x, a float64 residual's sum, the output) makes the contract's Acc
        # float64; the kernels compute in float32, so such calls go to another backend.
        return self.supports(x, spec.dropout_p) and spec.sum_dtype in _DTYPES and spec.out_dtype in _DTYPES

    def fused_forward(
        self, x, residual, x1, rowscale, weight, bias, weight1, bias1, spec: KernelSpec, seed: int,
        out=None, out1=None, residual_out=None,
    ) -> ForwardOut:
        """:meth:`Backend.fused_forward` in one launch of ``_fused_fwd_kernel``, which writes
        ``out`` / ``out1`` / ``residual_out`` itself when they are given."""
        if x.numel() == 0:
            return super().fused_forward(x, residual, x1, rowscale, weight, bias, weight1, bias1, spec, seed,
                                         out, out1, residual_out)
        k = _kernels()
        rows, n = x.shape
        dropout = spec.dropout_p > 0.0
        forms_sum = not sum_is_input(x, residual, x1, rowscale, spec)
        # A sum is written when one is formed and asked for, or when x itself is the sum and the
        # caller's residual_out is to receive it (the kernel's store saves a separate copy).
        store_sum = spec.store_sum and (forms_sum or residual_out is not None)
        cfg = self._config(x, backward=False, dropout=dropout, element_size=max(x.element_size(), spec.sum_dtype.itemsize))
        new = functools.partial(torch.empty, (rows, n), device=x.device)
        y = new(dtype=spec.out_dtype) if out is None else out
        y1 = None if weight1 is None else (new(dtype=spec.out_dtype) if out1 is None else out1)
        s = None if not store_sum else (new(dtype=spec.sum_dtype) if residual_out is None else residual_out)
        store_mask = spec.store_mask and dropout
        mask = new(dtype=torch.bool) if store_mask else None
        mask1 = new(dtype=torch.bool) if store_mask and x1 is not None else None
        f32 = dict(dtype=torch.float32, device=x.device)
        mean = None if spec.is_rms else torch.empty(rows, **f32)
        rstd = torch.empty(rows, **f32)
        with _on_device(x):
            k._fused_fwd_kernel[(cfg.grid,)](
                x, residual, x1, rowscale, weight, bias, weight1, bias1, y, y1, s, mask, mask1, mean, rstd,
                rows, n, float(spec.eps), float(spec.dropout_p), _keep_scale(spec.dropout_p), int(seed), rows * n,
                IS_RMS_NORM=spec.is_rms,
                HAS_RESIDUAL=residual is not None,
                HAS_X1=x1 is not None,
                HAS_ROWSCALE=rowscale is not None,
                HAS_DROPOUT=dropout,
                STORE_DROPOUT_MASK=store_mask,
                HAS_W=weight is not None,
                HAS_B=bias is not None,
                HAS_W1=weight1 is not None,
                HAS_B1=weight1 is not None and bias1 is not None,
                STORE_SUM=store_sum,
                SUM_DTYPE=_TL_DTYPES[spec.sum_dtype](),
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                SINGLE_PASS=cfg.single_pass,
                num_warps=cfg.num_warps,
            )
        if spec.store_sum and s is None:
            s = x  # no sum is formed: s is x itself (contract.sum_is_input)
        return ForwardOut(y, y1, s, mean, rstd, mask, mask1)

    def fused_backward(
        self, dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, spec: KernelSpec, seed: int,
        needs: GradNeeds, x_dtype: torch.dtype, residual_dtype,
    ) -> GradsOut:
        """:meth:`Backend.fused_backward` in one launch of ``_fused_bwd_kernel`` (after
        ``_fused_bwd_row_stats_kernel`` on the looped path); every gradient a tensor of its own."""
        rows, n = s.shape
        if s.numel() == 0:
            return super().fused_backward(dy, dy1, dsum, s, weight, weight1, rowscale, mean, rstd, spec, seed, needs,
                                          x_dtype, residual_dtype)
        k = _kernels()
        dropout = spec.dropout_p > 0.0
        cfg = self._config(s, backward=True, dropout=dropout, element_size=max(s.element_size(), x_dtype.itemsize),
                           second_output=dy1 is not None)
        new = functools.partial(torch.empty, (rows, n), device=s.device)
        dx = new(dtype=x_dtype) if needs.x else None
        dx1 = new(dtype=x_dtype) if needs.x1 else None
        dres = new(dtype=residual_dtype) if needs.residual else None
        f32 = dict(dtype=torch.float32, device=s.device)
        # Partial sums (one row per program) of the parameter gradients asked for; a gradient of
        # a missing dy / dy1 is zero and needs no kernel work.
        need = dict(dw=needs.weight and dy is not None, db=needs.bias and dy is not None,
                    dw1=needs.weight1 and dy1 is not None, db1=needs.bias1 and dy1 is not None)
        parts = {name: torch.empty((cfg.grid, n), **f32) if on else None for name, on in need.items()}
        c1 = c2 = None
        with _on_device(s):
            if not cfg.single_pass:
                c1, c2 = torch.empty(rows, **f32), torch.empty(rows, **f32)
                k._fused_bwd_row_stats_kernel[(math.ceil(rows / cfg.block_m),)](  # one program per tile
                    s, dy, dy1, weight, weight1, mean, rstd, c1, c2, rows, n,
                    IS_RMS_NORM=spec.is_rms,
                    HAS_DY=dy is not None,
                    HAS_DY1=dy1 is not None,
                    HAS_W=weight is not None,
                    BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n,
                    num_warps=cfg.num_warps,
                )
            k._fused_bwd_kernel[(cfg.grid,)](
                s, dy, dy1, dsum, weight, weight1, rowscale, mean, rstd, c1, c2, dx, dx1, dres,
                parts["dw"], parts["db"], parts["dw1"], parts["db1"],
                rows, n, float(spec.dropout_p), _keep_scale(spec.dropout_p), int(seed), rows * n,
                IS_RMS_NORM=spec.is_rms,
                HAS_DY=dy is not None,
                HAS_DY1=dy1 is not None,
                HAS_DSUM=dsum is not None,
                HAS_W=weight is not None,
                HAS_ROWSCALE=rowscale is not None,
                HAS_DROPOUT=dropout,
                NEED_DX=needs.x,
                NEED_DX1=needs.x1,
                NEED_DRES=needs.residual,
                NEED_DW=need["dw"],
                NEED_DB=need["db"],
                NEED_DW1=need["dw1"],
                NEED_DB1=need["db1"],
                BLOCK_M=cfg.block_m,
                BLOCK_N=cfg.block_n,
                SINGLE_PASS=cfg.single_pass,
                num_warps=cfg.num_warps,
            )

        def total(name: str, asked: bool):
            # One final fixed-order reduction of the per-program partial sums: deterministic.
            if not asked:
                return None
            return torch.zeros(n, **f32) if parts[name] is None else parts[name].sum(0)

        return GradsOut(dx, dx1, dres, total("dw", needs.weight), total("db", needs.bias),
                        total("dw1", needs.weight1), total("db1", needs.bias1))


def _keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p) if dropout_p > 0.0 else 1.0


def _on_device(x: Tensor):
    """Launch on ``x``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _tl_dtype(name: str):
    def get():
        import triton.language as tl

        return getattr(tl, name)

    return get


# The Triton dtype a torch dtype rounds to inside a kernel (looked up at launch: importing
# triton.language here would import Triton with normkit).
_TL_DTYPES = {torch.float32: _tl_dtype("float32"), torch.float16: _tl_dtype("float16"), torch.bfloat16: _tl_dtype("bfloat16")}


@functools.lru_cache(maxsize=1)
def _kernels():
    from normkit.backends import triton_kernels

    return triton_kernels


@functools.lru_cache(maxsize=8)
def _unavailable_reason(cuda: bool, interpreter: str) -> Optional[str]:
    if not cuda and interpreter == "off":
        return "no CUDA device, and TRITON_INTERPRET=1 is not set (set it before starting Python to run the kernels on CPU tensors through Triton's interpreter)"
    if not cuda and interpreter == "too late":
        return "TRITON_INTERPRET=1 was set after Triton was imported (import normkit imports it through torch); set it before starting Python"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'normkit[triton]')"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install: say why rather than fail on first use
        return f"Triton is installed but cannot be imported: {exc}"
    return None


BACKEND = TritonBackend()
