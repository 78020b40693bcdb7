"""The ``"numba"`` backend: numba kernels (:mod:`normkit.backends.numba_kernels`) on CPU tensors.

The CPU default when the compiled kernels (the ``"cpu"`` backend, :mod:`normkit.backends.cpu`)
are not built; otherwise forced with ``normkit.backends.use("numba")``.
Handles float32 and bfloat16 input without dropout; everything else (float64, float16,
``dropout_p > 0``) falls back to the reference. The launchers here do the torch <-> numpy
plumbing, all zero-copy: inputs are contiguous (``normkit.functional`` made them so once),
a NumPy array interface views their memory (bfloat16 as ``uint16`` bits), and outputs are allocated
with ``torch.empty`` and filled in place by the kernels. Outputs of 4 MiB or more are advised
to use transparent huge pages before the first write (as NumPy does for its own arrays): the
page faults of a fresh 64 MiB tensor otherwise cost several times the kernel.

Threads: a parallel kernel uses ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)`` numba
threads, so ``torch.set_num_threads`` is the one knob and the two pools never oversubscribe
the cores (with numba's ``omp`` threading layer both even share libgomp's worker threads).
Row chunks are handed out one at a time, so a core busy with another process delays one
chunk rather than half the rows. Small calls (few elements, or one row) run a serial kernel
in the calling thread: waking a thread pool costs more than normalizing a few rows. Which
path runs and how rows are chunked depend on the shape only, never on the thread count, so
results are bit-identical for any number of threads.

First call: numba compiles each kernel for the dtype it meets (``cache=True`` stores the
machine code in ``__pycache__`` next to the module, so later processes only load it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from normkit.backends.base import Backend, BackwardResult, ForwardResult
from normkit.backends.numpy_view import as_numpy

try:  # numba is a hard dependency, but a broken install must fall back, not fail the import
    import numba

    from normkit.backends import numba_kernels as _kernels
    from normkit.backends.numba_runtime import Threads as _Threads
    from normkit.backends.memory import empty_like as _empty_like
    from normkit.backends.numba_runtime import thread_budget as _thread_budget

    _UNAVAILABLE: Optional[str] = None
except Exception as _exc:  # ImportError, or numba refusing this numpy/llvmlite
    numba = _kernels = None
    _UNAVAILABLE = f"numba cannot be imported: {type(_exc).__name__}: {_exc}"

__all__ = ["NumbaBackend", "BACKEND", "SERIAL_MAX_ELEMENTS", "rows_per_chunk"]

_DTYPES = (torch.float32, torch.bfloat16)
#: Calls with at most this many elements (or a single row) run the serial kernel.
SERIAL_MAX_ELEMENTS = 1 << 15
#: At most this many row chunks: bounds the (n_chunks, N) partial sums of backward.
_MAX_CHUNKS = 64
#: At least this many rows per chunk (keeps the partial sums small against the data) ...
_MIN_CHUNK_ROWS = 8
#: ... and at least this many elements per chunk (amortizes scheduling of narrow rows).
_MIN_CHUNK_ELEMENTS = 1 << 14
_REDUCE_COLS = 1024


def rows_per_chunk(rows: int, n: int) -> int:
    """Rows per parallel work item; a function of the shape alone (determinism)."""
    per = max(-(-rows // _MAX_CHUNKS), _MIN_CHUNK_ROWS, -(-_MIN_CHUNK_ELEMENTS // n))
    return min(per, rows)


def _is_serial(rows: int, n: int) -> bool:
    return rows == 1 or rows * n <= SERIAL_MAX_ELEMENTS


#: Zero-copy numpy view of a contiguous CPU tensor (bfloat16 as its uint16 bits).
_np = as_numpy


_IDENTITY: dict = {}


def _param(p: Optional[Tensor], n: int, fill: float):
    """A gain/bias as a contiguous float32 ``(n,)`` numpy array; ``None`` becomes the exact
    identity (ones / zeros, cached: small calls are dominated by such overheads)."""
    if p is None:
        key = (n, fill)
        arr = _IDENTITY.get(key)
        if arr is None:
            if len(_IDENTITY) > 32:
                _IDENTITY.clear()
            arr = _IDENTITY[key] = torch.full((n,), fill, dtype=torch.float32).numpy()
        return arr
    if p.dtype != torch.float32 or not p.is_contiguous():
        p = p.to(torch.float32).contiguous()
    return _np(p)


class NumbaBackend(Backend):
    name = "numba"
    default_for = ("cpu",)

    def unavailable_reason(self) -> Optional[str]:
        return _UNAVAILABLE

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return x.device.type == "cpu" and x.dtype in _DTYPES and dropout_p == 0.0

    def empty_like(self, t: Tensor) -> Tensor:
        return _empty_like(t)

    def forward(self, x, residual, weight, bias, eps, is_rms, dropout_p, seed, store_sum) -> ForwardResult:
        if dropout_p != 0.0:
            raise ValueError(f"the numba backend does not implement dropout (got dropout_p={dropout_p}); supports() says so")
        k = _kernels
        rows, n = x.shape
        has_res = residual is not None
        store = bool(store_sum and has_res)
        y = _empty_like(x)
        s = _empty_like(x) if store else None
        rstd = torch.empty(rows, dtype=torch.float32)
        mean = None if is_rms else torch.empty(rows, dtype=torch.float32)
        xa, ya = _np(x), _np(y)
        args = (
            xa,
            _np(residual) if has_res else xa,
            _param(weight, n, 1.0),
            _param(bias, n, 0.0),
            ya,
            _np(s) if store else ya,
            _np(rstd if mean is None else mean),
            _np(rstd),
            float(eps),
            bool(is_rms),
            has_res,
            store,
        )
        if _is_serial(rows, n) or _thread_budget() == 1:
            k.fwd_serial(*args)  # rows are independent: the same bits as the parallel kernel
        else:
            with _Threads(numba):
                k.fwd_parallel(*args, rows_per_chunk(rows, n))
        if store_sum and not has_res:
            s = x  # no residual, no dropout: the normalized input is x itself
        return y, s, mean, rstd

    def backward(self, dy, dsum, s, weight, mean, rstd, is_rms, dropout_p, seed) -> BackwardResult:
        if dropout_p != 0.0:
            raise ValueError(f"the numba backend does not implement dropout (got dropout_p={dropout_p})")
        if not is_rms and mean is None:
            raise ValueError("layer norm backward needs the row means saved by forward, got mean=None")
        k = _kernels
        rows, n = dy.shape
        dx = _empty_like(dy)
        dw = torch.empty(n, dtype=torch.float32)
        db = torch.empty(n, dtype=torch.float32)
        s = s.contiguous()
        dya = _np(dy)
        rstda = _np(rstd.to(torch.float32).contiguous())
        head = (
            _np(s),
            dya,
            _np(dsum.contiguous()) if dsum is not None else dya,
            _param(weight, n, 1.0),
            rstda if is_rms else _np(mean.to(torch.float32).contiguous()),
            rstda,
            _np(dx),
        )
        flags = (bool(is_rms), dsum is not None)
        if _is_serial(rows, n):
            k.bwd_serial(*head, _np(dw).reshape(1, n), _np(db).reshape(1, n), *flags)
        else:
            per = rows_per_chunk(rows, n)
            chunks = -(-rows // per)
            dw_part = torch.empty((chunks, n), dtype=torch.float32)
            db_part = torch.empty((chunks, n), dtype=torch.float32)
            if _thread_budget() == 1:  # same chunks and summation order as the parallel path
                k.bwd_chunked_serial(*head, _np(dw_part), _np(db_part), *flags, per)
                k.sum_partials_serial(_np(dw_part), _np(db_part), _np(dw), _np(db))
            else:
                with _Threads(numba):
                    k.bwd_parallel(*head, _np(dw_part), _np(db_part), *flags, per)
                    k.sum_partials(_np(dw_part), _np(db_part), _np(dw), _np(db), _REDUCE_COLS)
        # Without dropout the residual's gradient is dx itself; ops.py copies it only if wanted.
        return dx, dx, dw, db


BACKEND = NumbaBackend()
