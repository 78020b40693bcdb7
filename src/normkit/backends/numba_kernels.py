r"""numba kernels of the ``"cpu"`` backend: layer norm and RMS norm, forward and backward.

One kernel per direction; flags select the variant at run time, outside the inner loops
(``is_rms``, ``has_res``: fused residual add, ``store_sum``: prenorm output, ``has_dsum``:
gradient of the prenorm output). An absent gain or bias is passed as ones / zeros, which is
exact (``v * 1 + 0 == v`` for every ``v`` but ``-0.0``), so there are no weight flags.

Design (the row is the unit of work, as in the flash-attention / Apex kernels):

* Each row is read from memory **once**: the statistics take two passes over it while it sits
  in L1/L2 — the mean, then the sum of squared deviations (exact at large means where
  :math:`E[s^2] - E[s]^2` cancels) — and a third pass writes the output. With a residual, the
  sum ``x + r`` is formed once into a per-chunk float32 scratch row, rounded to the input
  dtype as :mod:`normkit.reference` does. Memory traffic is thus the minimum: inputs read
  once, outputs written once.
* Forward, per row :math:`s` of length :math:`N`:

  .. math::
      \mu = \tfrac1N \textstyle\sum_j s_j \;(0 \text{ for RMS}),\quad
      r = \big(\tfrac1N \textstyle\sum_j (s_j - \mu)^2 + \epsilon\big)^{-1/2},\quad
      y_j = (s_j - \mu)\, r\, w_j + b_j

* Backward, with :math:`\hat s = (s - \mu) r` and :math:`g = dy \odot w`:

  .. math::
      ds = r\,\big(g - \overline{g} - \hat s\,\overline{g \hat s}\big)
      \;\text{(RMS: } ds = r\,(g - \hat s\,\overline{g \hat s})\text{)},\quad
      dw = \textstyle\sum_\text{rows} dy\,\hat s,\quad db = \sum_\text{rows} dy

  ``ds`` is per row. ``dw``/``db`` are accumulated into float32 partial sums, one row of a
  ``(n_chunks, N)`` buffer per chunk of consecutive rows; the chunking depends only on the
  shape (never on the thread count or scheduling) and the partials are summed in chunk order,
  so the gradients are bit-identical run to run and for any number of threads.
* bfloat16 tensors are passed as ``uint16`` views of their bits and converted in the kernel:
  bf16 -> f32 is a 16-bit shift; f32 -> bf16 rounds to nearest even and keeps NaN a (quiet)
  NaN, like PyTorch's conversion. Statistics and accumulations are always float32.
* ``fastmath={'reassoc', 'contract'}``: reassociation lets LLVM vectorize the row sums (their
  order is then fixed by the compiled code, so results stay deterministic), contraction allows
  FMAs. No ``nnan``/``ninf``/``arcp``/``afn``: NaN and Inf propagate as in the reference and
  ``1/sqrt`` is exact-rounded.
* Drivers come in two kinds per direction: ``*_parallel`` (``parallel=True``, ``prange`` over
  chunks of rows) and ``*_serial`` (no thread pool: for a few rows the fork/join costs more
  than the work). Both run the same inlined row code.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from normkit._numba_bits import f32_as_u32, u32_as_f32

__all__ = [
    "fwd_serial",
    "fwd_parallel",
    "bwd_serial",
    "bwd_parallel",
    "sum_partials",
    "f32_to_bf16_bits",
    "bf16_bits_to_f32",
]

_FASTMATH = {"reassoc", "contract"}
_JIT = dict(cache=True, fastmath=_FASTMATH, error_model="numpy", nogil=True, boundscheck=False)
_F32 = np.float32


# --- float32 <-> bfloat16 bits ---------------------------------------------------------------


@njit(inline="always", **_JIT)
def _bf16_to_f32(h):
    return u32_as_f32(np.uint32(h) << np.uint32(16))


@njit(inline="always", **_JIT)
def _f32_to_bf16(v):
    """Round-to-nearest-even float32 -> bfloat16 bits; NaN stays NaN (quiet bit set)."""
    b = f32_as_u32(v)
    hi = b >> np.uint32(16)
    rounded = (b + np.uint32(0x7FFF) + (hi & np.uint32(1))) >> np.uint32(16)
    is_nan = (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    # A select, not a branch: one return keeps the loops that inline this vectorizable.
    return np.uint16(is_nan * (hi | np.uint32(0x0040)) + (not is_nan) * rounded)


# Element access by array dtype: float32 arrays directly, uint16 arrays as bfloat16 bits.
# Kernels index 2-D arrays as a[i, j] rather than taking row views a[i]: a view is a new array
# struct with a reference count, which costs as much as normalizing a 256-wide row.
def _load(a, i, j):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


def _store(a, i, j, v):  # pragma: no cover
    raise NotImplementedError


def _round(v, like):  # pragma: no cover
    raise NotImplementedError


@overload(_load, inline="always", jit_options=_JIT)
def _ol_load(a, i, j):
    if a.dtype == types.float32:
        return lambda a, i, j: a[i, j]
    if a.dtype == types.uint16:
        return lambda a, i, j: _bf16_to_f32(a[i, j])
    return None


@overload(_store, inline="always", jit_options=_JIT)
def _ol_store(a, i, j, v):
    if a.dtype == types.float32:

        def store_f32(a, i, j, v):
            a[i, j] = v

        return store_f32
    if a.dtype == types.uint16:

        def store_bf16(a, i, j, v):
            a[i, j] = _f32_to_bf16(v)

        return store_bf16
    return None


@overload(_round, inline="always", jit_options=_JIT)
def _ol_round(v, like):
    """``v`` rounded to the dtype of array ``like`` (and back to float32)."""
    if like.dtype == types.float32:
        return lambda v, like: v
    if like.dtype == types.uint16:
        return lambda v, like: _bf16_to_f32(_f32_to_bf16(v))
    return None


@njit(**_JIT)
def f32_to_bf16_bits(src, dst):
    """``dst[j] = bits(bfloat16(src[j]))`` (1-D float32 -> uint16); exposed for the tests."""
    for j in range(src.shape[0]):
        dst[j] = _f32_to_bf16(src[j])


@njit(**_JIT)
def bf16_bits_to_f32(src, dst):
    """``dst[j] = float32(bfloat16 with bits src[j])`` (1-D uint16 -> float32)."""
    for j in range(src.shape[0]):
        dst[j] = _bf16_to_f32(src[j])


# --- forward ---------------------------------------------------------------------------------


# Row sums run in blocks of _BLOCK elements: a float32 (vectorized) sum inside a block, the
# blocks added in float64. One running float32 sum over a 4M-element row with a 1e4 offset
# drifts by ~3e-4 of the mean (so the variance, rstd and output by far more); blocks keep the
# error at the level of torch's cascade summation at no measurable cost. (The inner trip
# count is written as "_BLOCK, or the tail for the last block": with range(j0, min(n, j0 +
# _BLOCK)) LLVM does not vectorize the sum and the kernels run 2-3x slower.)
_BLOCK = 2048


@njit(inline="always", **_JIT)
def _row_sum(src, si, n):
    acc = 0.0
    n_full = n // _BLOCK
    for k in range(n_full + 1):
        j0 = k * _BLOCK
        blk = _F32(0.0)
        for jj in range(_BLOCK if k < n_full else n - j0):
            blk += _load(src, si, j0 + jj)
        acc += np.float64(blk)
    return _F32(acc)


@njit(inline="always", **_JIT)
def _row_stats(src, si, n, mean, eps, is_rms):
    """``(mean, 1/sqrt(var + eps))`` from the first pass's ``mean``: the second pass of the
    corrected two-pass algorithm (Chan, Golub & LeVeque 1983), which also sums the residues
    ``d = s - mean`` and refines ``mean += sum(d)/n``, ``var = sum(d^2)/n - (sum(d)/n)^2``.
    A constant row's rounded mean is off by a few ulps; the refinement makes it exact, so the
    row normalizes to 0 (rstd up to 1/sqrt(eps) would amplify the residue). The row is in
    cache by now. RMS norm (``mean = 0``) keeps ``var = mean(s^2)``."""
    ss = 0.0
    sd = 0.0
    n_full = n // _BLOCK
    for k in range(n_full + 1):
        j0 = k * _BLOCK
        blk = _F32(0.0)
        blk_d = _F32(0.0)
        for jj in range(_BLOCK if k < n_full else n - j0):
            d = _load(src, si, j0 + jj) - mean
            blk += d * d
            blk_d += d
        ss += np.float64(blk)
        sd += np.float64(blk_d)
    var = ss / n
    if not is_rms:
        c = sd / n
        mean = _F32(np.float64(mean) + c)
        var = max(var - c * c, 0.0)
    return mean, _F32(1.0) / np.sqrt(_F32(var) + eps)


@njit(inline="always", **_JIT)
def _write_row(src, si, w, b, y, i, n, mean, rstd):
    for j in range(n):
        _store(y, i, j, (_load(src, si, j) - mean) * rstd * w[j] + b[j])


@njit(inline="always", **_JIT)
def _fwd_rows(lo, hi, x, r, w, b, y, s, mean, rstd, buf, eps, is_rms, has_res, store_sum):
    """Rows ``lo:hi``. Without a residual the statistics read ``x`` itself (bf16 converted on
    the fly); with one, the sum rounded once to the input dtype goes to ``buf`` ``(1, N)``
    (and to ``s``), summed in the same pass."""
    n = x.shape[1]
    for i in range(lo, hi):
        mu = _F32(0.0)
        if has_res:
            if store_sum:
                for j in range(n):
                    v = _round(_load(x, i, j) + _load(r, i, j), x)
                    buf[0, j] = v
                    _store(s, i, j, v)  # exact: v is an input-dtype value
            else:
                for j in range(n):
                    buf[0, j] = _round(_load(x, i, j) + _load(r, i, j), x)
            if not is_rms:
                mu = _row_sum(buf, 0, n) / _F32(n)  # buf is in cache
            mu, rs = _row_stats(buf, 0, n, mu, eps, is_rms)
            _write_row(buf, 0, w, b, y, i, n, mu, rs)
        else:
            if not is_rms:
                mu = _row_sum(x, i, n) / _F32(n)
            mu, rs = _row_stats(x, i, n, mu, eps, is_rms)
            _write_row(x, i, w, b, y, i, n, mu, rs)
        if not is_rms:
            mean[i] = mu
        rstd[i] = rs


@njit(**_JIT)
def fwd_serial(x, r, w, b, y, s, mean, rstd, eps, is_rms, has_res, store_sum):
    """Forward over all rows of ``x`` ``(M, N)`` in the calling thread.

    ``r`` (residual), ``s`` (prenorm output) and ``mean`` are only touched when ``has_res``,
    ``store_sum`` and ``not is_rms``; pass any array of the right type otherwise.
    ``w``/``b`` are float32 ``(N,)``; ``mean``/``rstd`` float32 ``(M,)``.
    """
    buf = np.empty((1, x.shape[1]), _F32)
    _fwd_rows(0, x.shape[0], x, r, w, b, y, s, mean, rstd, buf, _F32(eps), is_rms, has_res, store_sum)


@njit(parallel=True, **_JIT)
def fwd_parallel(x, r, w, b, y, s, mean, rstd, eps, is_rms, has_res, store_sum, rows_per_chunk):
    """:func:`fwd_serial` with chunks of ``rows_per_chunk`` rows spread over the thread pool."""
    m_rows, n = x.shape
    n_chunks = (m_rows + rows_per_chunk - 1) // rows_per_chunk
    eps32 = _F32(eps)
    for c in prange(n_chunks):
        buf = np.empty((1, n), _F32)
        lo = c * rows_per_chunk
        hi = min(m_rows, lo + rows_per_chunk)
        _fwd_rows(lo, hi, x, r, w, b, y, s, mean, rstd, buf, eps32, is_rms, has_res, store_sum)


# --- backward --------------------------------------------------------------------------------


@njit(inline="always", **_JIT)
def _bwd_rows(lo, hi, s, dy, dsum, w, mean, rstd, dx, dwp, dbp, c, is_rms, has_dsum):
    """``ds`` of rows ``lo:hi`` into ``dx``; their ``dy * s_hat`` and ``dy`` summed into row
    ``c`` of the partials.

    Two passes over each (cache-resident) row: the two row sums, then ``ds`` and the partials
    with ``s_hat`` and ``g`` recomputed — cheaper than storing and reloading them.
    """
    n = s.shape[1]
    for j in range(n):
        dwp[c, j] = _F32(0.0)
        dbp[c, j] = _F32(0.0)
    for i in range(lo, hi):
        mu = _F32(0.0) if is_rms else mean[i]
        rs = rstd[i]
        sum_g = 0.0
        sum_gx = 0.0
        n_full = n // _BLOCK
        for k in range(n_full + 1):  # blocked like _row_sum
            j0 = k * _BLOCK
            blk_g = _F32(0.0)
            blk_gx = _F32(0.0)
            for jj in range(_BLOCK if k < n_full else n - j0):
                j = j0 + jj
                g = _load(dy, i, j) * w[j]
                blk_g += g
                blk_gx += g * ((_load(s, i, j) - mu) * rs)
            sum_g += np.float64(blk_g)
            sum_gx += np.float64(blk_gx)
        c_gx = _F32(sum_gx) / _F32(n)
        c_g = _F32(0.0) if is_rms else _F32(sum_g) / _F32(n)
        if has_dsum:
            for j in range(n):
                xh = (_load(s, i, j) - mu) * rs
                d = _load(dy, i, j)
                _store(dx, i, j, (d * w[j] - xh * c_gx - c_g) * rs + _load(dsum, i, j))
                dwp[c, j] += d * xh
                dbp[c, j] += d
        else:
            for j in range(n):
                xh = (_load(s, i, j) - mu) * rs
                d = _load(dy, i, j)
                _store(dx, i, j, (d * w[j] - xh * c_gx - c_g) * rs)
                dwp[c, j] += d * xh
                dbp[c, j] += d


@njit(**_JIT)
def bwd_serial(s, dy, dsum, w, mean, rstd, dx, dw, db, is_rms, has_dsum):
    """Backward over all rows in the calling thread; ``dw``/``db`` float32 ``(1, N)`` are
    overwritten. ``dsum`` / ``mean`` are read only when ``has_dsum`` / ``not is_rms``."""
    _bwd_rows(0, s.shape[0], s, dy, dsum, w, mean, rstd, dx, dw, db, 0, is_rms, has_dsum)


@njit(inline="always", **_JIT)
def _bwd_chunk(c, s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, is_rms, has_dsum, rows_per_chunk):
    lo = c * rows_per_chunk
    hi = min(s.shape[0], lo + rows_per_chunk)
    _bwd_rows(lo, hi, s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, c, is_rms, has_dsum)


@njit(parallel=True, **_JIT)
def bwd_parallel(s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, is_rms, has_dsum, rows_per_chunk):
    """Backward with chunk ``c`` (rows ``c*rows_per_chunk ...``) writing its ``dw``/``db``
    partial sums to row ``c`` of ``dw_part``/``db_part`` ``(n_chunks, N)`` float32; sum them
    with :func:`sum_partials`."""
    for c in prange(dw_part.shape[0]):
        _bwd_chunk(c, s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, is_rms, has_dsum, rows_per_chunk)


@njit(**_JIT)
def bwd_chunked_serial(s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, is_rms, has_dsum, rows_per_chunk):
    """:func:`bwd_parallel` in the calling thread, same chunks and partial sums (so the same
    bits): for a one-thread budget, where waking the pool only adds a spinning worker."""
    for c in range(dw_part.shape[0]):
        _bwd_chunk(c, s, dy, dsum, w, mean, rstd, dx, dw_part, db_part, is_rms, has_dsum, rows_per_chunk)


@njit(parallel=True, **_JIT)
def sum_partials(dw_part, db_part, dw, db, cols_per_block):
    """``dw = dw_part.sum(0)``, ``db = db_part.sum(0)``, summed in chunk order (deterministic);
    parallel over blocks of columns."""
    n = dw_part.shape[1]
    for blk in prange((n + cols_per_block - 1) // cols_per_block):
        _sum_block(blk * cols_per_block, min(n, (blk + 1) * cols_per_block), dw_part, db_part, dw, db)


@njit(**_JIT)
def sum_partials_serial(dw_part, db_part, dw, db):
    """:func:`sum_partials` in the calling thread, in the same (chunk) order."""
    _sum_block(0, dw_part.shape[1], dw_part, db_part, dw, db)


@njit(inline="always", **_JIT)
def _sum_block(lo, hi, dw_part, db_part, dw, db):
    for j in range(lo, hi):
        dw[j] = dw_part[0, j]
        db[j] = db_part[0, j]
    for c in range(1, dw_part.shape[0]):
        for j in range(lo, hi):
            dw[j] += dw_part[c, j]
            db[j] += db_part[c, j]
