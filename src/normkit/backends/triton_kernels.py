r"""Triton kernels for layer norm and RMS norm with every option of the fused contract
(:mod:`normkit.contract`): one forward kernel, one backward kernel, and a
row-statistics pass for rows too wide to keep on chip. Launchers live in
:mod:`normkit.backends.triton`; the semantics are :func:`normkit.reference.fused_forward` /
``fused_backward``'s.

flash-attn's design (``HAS_RESIDUAL``, ``HAS_X1``, ``HAS_W1``, ``HAS_ROWSCALE``,
``STORE_DROPOUT_MASK``): each option a tensor or flag turns on is a ``tl.constexpr``, so a call
compiles a variant with exactly its options and pays for nothing else; the plain contract
(``TritonBackend.forward/backward``) is the variant with the options off. Dtypes come from the
pointers: ``y``/``y1`` round to ``Y``'s element type, ``dx``/``dx1`` to ``DX``'s, the residual
gradient to ``DRES``'s, the sum to ``SUM_DTYPE`` (a constexpr, because ``S`` is not passed when
the sum is not stored). A residual of its own dtype (float32 beside bfloat16 ``x``) is loaded
as it is: every load is upcast to float32.

Importing this module imports Triton: only :mod:`normkit.backends.triton` does, and only when a
kernel is first launched (``TRITON_INTERPRET=1`` must be set before that for the interpreter).

Layout: every tensor is a contiguous ``(M, N)`` matrix (row ``m`` starts at ``m * N``); a program
works on a tile of ``BLOCK_M`` rows by ``BLOCK_N`` columns. Statistics and partial sums are
float32; the sum is formed in float32 in the contract's order and rounded once to its dtype, and
the statistics are those of that rounded sum.

* ``SINGLE_PASS`` (``BLOCK_N >= N``): the whole tile stays in registers; each element is read
  once and written once. Mean, then one refinement by the mean of the residues (as
  ``reference.statistics``), then the centred second moment.
* looped (``BLOCK_N < N``): the row is walked in ``BLOCK_N`` chunks twice, once for the
  statistics and once to normalize. The layer-norm variance of each chunk is computed about the
  chunk's own mean and chunks are merged with Chan et al.'s parallel formula, so the looped
  path keeps the two-pass accuracy at large means (``E[s^2] - E[s]^2`` would not). Backward
  runs :func:`_fused_bwd_row_stats_kernel` first for the two row means it needs.

Dropout: the keep mask of element ``(m, n)`` is ``rand(seed, m * N + n) >= p`` for ``x``
(stream 0) and ``rand(seed, M * N + m * N + n) >= p`` for ``x1`` (stream 1): Philox with the flat
index as counter, a pure function of ``(seed, stream, M, N, p)``. The backward kernel
regenerates them; ``STORE_DROPOUT_MASK`` also writes them (bool) for the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Triton's interpreter (3.9) rounds float32 -> bfloat16 toward zero, where the GPU rounds to
# nearest even as PyTorch does; under the interpreter the kernels round explicitly (below).
_ROUND_BF16_BY_HAND = tl.constexpr(isinstance(tl.sum, InterpretedFunction))


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """``v.to(dtype)`` rounding to nearest even, on the GPU and under the interpreter alike."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # keep NaN a NaN
    return v.to(dtype)


@triton.jit
def _fused_sum(X, R, X1, ROWSCALE, MASK, MASK1, rows, row_mask, offs, mask, stream1, seed, dropout_p, dropout_scale,
               HAS_RESIDUAL: tl.constexpr, HAS_X1: tl.constexpr, HAS_ROWSCALE: tl.constexpr,
               HAS_DROPOUT: tl.constexpr, STORE_DROPOUT_MASK: tl.constexpr, SUM_DTYPE: tl.constexpr):
    """``s = round_S(x * rowscale * k / (1 - p) + x1 * k1 / (1 - p) + r)`` of one tile, added
    in float32 in the contract's order and returned in float32 (exactly a value of ``SUM_DTYPE``).
    The keep masks are Philox draws at the flat index: stream 0 (``x``) at ``offs``, stream 1
    (``x1``) at ``offs + stream1`` (``stream1 = M * N``, so the two never share a counter)."""
    t = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ROWSCALE:
        t *= tl.load(ROWSCALE + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    if HAS_DROPOUT:
        keep = tl.rand(seed, offs) >= dropout_p
        if STORE_DROPOUT_MASK:
            tl.store(MASK + offs, keep, mask=mask)
        t = tl.where(keep, t * dropout_scale, 0.0)
    if HAS_X1:
        t1 = tl.load(X1 + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep1 = tl.rand(seed, offs + stream1) >= dropout_p
            if STORE_DROPOUT_MASK:
                tl.store(MASK1 + offs, keep1, mask=mask)
            t1 = tl.where(keep1, t1 * dropout_scale, 0.0)
        t += t1
    if HAS_RESIDUAL:
        t += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded once to S: the statistics are those of the stored sum (a no-op for float32 S).
    return _round_to(t, SUM_DTYPE).to(tl.float32)


@triton.jit
def _affine(s_hat, W, B, c, col_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    y = s_hat
    if HAS_W:
        y *= tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(B + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit(do_not_specialize=["seed"])  # a fresh seed per call must not mean a recompile
def _fused_fwd_kernel(
    X, R, X1, ROWSCALE, W, B, W1, B1, Y, Y1, S, MASK, MASK1, MEAN, RSTD,
    M, N, eps, dropout_p, dropout_scale, seed, stream1,
    IS_RMS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_X1: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    STORE_DROPOUT_MASK: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_W1: tl.constexpr,
    HAS_B1: tl.constexpr,
    STORE_SUM: tl.constexpr,
    SUM_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    """One program normalizes rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)`` of the contract's
    sum ``s``: ``y = round_O(s_hat * w + b)``, ``y1 = round_O(s_hat * w1 + b1)`` with ``s_hat =
    (s - mean) * rstd`` (mean = 0 for RMS). ``O`` is ``Y``'s element type, ``S``'s is ``SUM_DTYPE``
    (a constexpr, since ``S`` is not passed when the sum is not stored)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_start = rows.to(tl.int64)[:, None] * N  # (BLOCK_M, 1); int64: M * N may pass 2**31
    cols = tl.arange(0, BLOCK_N)

    if SINGLE_PASS:
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row_start + cols[None, :]
        s = _fused_sum(X, R, X1, ROWSCALE, MASK, MASK1, rows, row_mask, offs, mask, stream1, seed, dropout_p,
                       dropout_scale, HAS_RESIDUAL, HAS_X1, HAS_ROWSCALE, HAS_DROPOUT, STORE_DROPOUT_MASK, SUM_DTYPE)
        if STORE_SUM:
            tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)  # exact: s is a SUM_DTYPE value
        if IS_RMS_NORM:
            xc = s
        else:
            mean = tl.sum(s, axis=1) / N
            # Refine the mean by the mean of the residues (corrected two-pass, as
            # reference.statistics): exact for a constant row, whose rounded mean is off by ulps
            # that rstd would amplify.
            mean += tl.sum(tl.where(mask, s - mean[:, None], 0.0), axis=1) / N
            tl.store(MEAN + rows, mean, mask=row_mask)
            xc = tl.where(mask, s - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        s_hat = xc * rstd[:, None]
        y = _affine(s_hat, W, B, cols, col_mask, HAS_W, HAS_B)
        tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)
        if HAS_W1:
            y1 = _affine(s_hat, W1, B1, cols, col_mask, True, HAS_B1)
            tl.store(Y1 + offs, _round_to(y1, Y1.dtype.element_ty), mask=mask)
    else:
        # Pass 1: statistics chunk by chunk, about the mean of the row's first chunk (s - shift
        # is exact for s near shift), chunks merged with Chan et al.'s parallel formula.
        shift = tl.zeros([BLOCK_M], dtype=tl.float32)
        if not IS_RMS_NORM:
            first = row_mask[:, None] & (cols < N)[None, :]
            s = _fused_sum(X, R, X1, ROWSCALE, MASK, MASK1, rows, row_mask, row_start + cols[None, :], first, stream1,
                           seed, dropout_p, dropout_scale, HAS_RESIDUAL, HAS_X1, HAS_ROWSCALE, HAS_DROPOUT, False,
                           SUM_DTYPE)
            shift = tl.sum(s, axis=1) / tl.minimum(N, BLOCK_N).to(tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)  # of s - shift
        m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of squared deviations (sum s^2 for RMS)
        for start in range(0, N, BLOCK_N):
            c = start + cols
            mask = row_mask[:, None] & (c < N)[None, :]
            offs = row_start + c[None, :]
            s = _fused_sum(X, R, X1, ROWSCALE, MASK, MASK1, rows, row_mask, offs, mask, stream1, seed, dropout_p,
                           dropout_scale, HAS_RESIDUAL, HAS_X1, HAS_ROWSCALE, HAS_DROPOUT, STORE_DROPOUT_MASK,
                           SUM_DTYPE)
            if STORE_SUM:
                tl.store(S + offs, s.to(S.dtype.element_ty), mask=mask)
            if IS_RMS_NORM:
                m2 += tl.sum(s * s, axis=1)
            else:
                n_before = tl.cast(start, tl.float32)
                n_chunk = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                n_after = n_before + n_chunk
                d = tl.where(mask, s - shift[:, None], 0.0)
                chunk_mean = tl.sum(d, axis=1) / n_chunk
                d = tl.where(mask, d - chunk_mean[:, None], 0.0)
                delta = chunk_mean - mean
                mean += delta * (n_chunk / n_after)
                m2 += tl.sum(d * d, axis=1) + delta * delta * (n_before * n_chunk / n_after)
        if not IS_RMS_NORM:
            mean += shift
            tl.store(MEAN + rows, mean, mask=row_mask)
        rstd = 1.0 / tl.sqrt_rn(m2 / N + eps)
        tl.store(RSTD + rows, rstd, mask=row_mask)
        # Pass 2: normalize. s is recomputed from the inputs (and the regenerated masks) rather
        # than read back from S: bit-identical, and no intra-program barrier.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            col_mask = c < N
            mask = row_mask[:, None] & col_mask[None, :]
            offs = row_start + c[None, :]
            s = _fused_sum(X, R, X1, ROWSCALE, MASK, MASK1, rows, row_mask, offs, mask, stream1, seed, dropout_p,
                           dropout_scale, HAS_RESIDUAL, HAS_X1, HAS_ROWSCALE, HAS_DROPOUT, False, SUM_DTYPE)
            if IS_RMS_NORM:
                s_hat = s * rstd[:, None]
            else:
                s_hat = (s - mean[:, None]) * rstd[:, None]
            y = _affine(s_hat, W, B, c, col_mask, HAS_W, HAS_B)
            tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)
            if HAS_W1:
                y1 = _affine(s_hat, W1, B1, c, col_mask, True, HAS_B1)
                tl.store(Y1 + offs, _round_to(y1, Y1.dtype.element_ty), mask=mask)


@triton.jit
def _fused_grad_terms(S, DY, DY1, W, W1, offs, c, mask, col_mask, mean, rstd,
                      IS_RMS_NORM: tl.constexpr, HAS_DY: tl.constexpr, HAS_DY1: tl.constexpr, HAS_W: tl.constexpr):
    """``(dy, dy1, s_hat, g)`` of one tile in float32 with ``g = dy * w + dy1 * w1``; zero
    outside ``mask`` and for a missing ``dy``/``dy1``."""
    s = tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS_NORM:
        s_hat = s * rstd[:, None]
    else:
        s_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.zeros_like(s_hat)
    dy1 = tl.zeros_like(s_hat)
    g = tl.zeros_like(s_hat)
    if HAS_DY:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy
        if HAS_W:
            g = dy * tl.load(W + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_DY1:
        dy1 = tl.load(DY1 + offs, mask=mask, other=0.0).to(tl.float32)
        g += dy1 * tl.load(W1 + c, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return dy, dy1, s_hat, g


@triton.jit
def _fused_bwd_row_stats_kernel(
    S, DY, DY1, W, W1, MEAN, RSTD, C1, C2, M, N,
    IS_RMS_NORM: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_DY1: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Looped backward, pass 1: per row ``c1 = mean(g * s_hat)`` and ``c2 = mean(g)``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_start = rows.to(tl.int64)[:, None] * N
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    mean = rstd
    if not IS_RMS_NORM:
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        c = start + cols
        col_mask = c < N
        mask = row_mask[:, None] & col_mask[None, :]
        offs = row_start + c[None, :]
        _, _, s_hat, g = _fused_grad_terms(S, DY, DY1, W, W1, offs, c, mask, col_mask, mean, rstd,
                                           IS_RMS_NORM, HAS_DY, HAS_DY1, HAS_W)
        c1 += tl.sum(g * s_hat, axis=1)
        c2 += tl.sum(g, axis=1)
    tl.store(C1 + rows, c1 / N, mask=row_mask)
    tl.store(C2 + rows, c2 / N, mask=row_mask)


@triton.jit(do_not_specialize=["seed"])
def _fused_bwd_kernel(
    S, DY, DY1, DSUM, W, W1, ROWSCALE, MEAN, RSTD, C1, C2, DX, DX1, DRES,
    DW_PART, DB_PART, DW1_PART, DB1_PART,
    M, N, dropout_p, dropout_scale, seed, stream1,
    IS_RMS_NORM: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_DY1: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_ROWSCALE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DX1: tl.constexpr,
    NEED_DRES: tl.constexpr,
    NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_DW1: tl.constexpr,
    NEED_DB1: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    """Persistent backward: program ``pid`` of ``G`` takes row tiles ``pid, pid + G, ...``.

    Per row ``ds = rstd * (g - s_hat * c1 - c2) + dsum`` (no ``c2`` for RMS), ``dres =
    round_R(ds)``, ``dx = round_T(ds * rowscale * k / (1 - p))``, ``dx1 = round_T(ds * k1 / (1 -
    p))`` (masks regenerated from the forward's streams). The program's share of each parameter
    gradient asked for (``dw = sum dy * s_hat``, ``db = sum dy``, ``dw1``, ``db1``) accumulates in
    float32 and is written to row ``pid`` of its ``(G, N)`` partial buffer; the caller sums those
    rows in a fixed order. No atomics: the same input gives the same bits every run.

    Looped (``BLOCK_N < N``, ``c1``/``c2`` precomputed by :func:`_fused_bwd_row_stats_kernel`):
    column chunks outside, row tiles inside, so a chunk's partial sums stay in registers.
    """
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, N, BLOCK_N):  # one chunk when SINGLE_PASS (BLOCK_N >= N)
        c = start + cols
        col_mask = c < N
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        dw1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in range(pid, n_tiles, n_programs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + c[None, :]
            rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
            mean = rstd
            if not IS_RMS_NORM:
                mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
            dy, dy1, s_hat, g = _fused_grad_terms(S, DY, DY1, W, W1, offs, c, mask, col_mask, mean, rstd,
                                                  IS_RMS_NORM, HAS_DY, HAS_DY1, HAS_W)
            if SINGLE_PASS:
                c1 = tl.sum(g * s_hat, axis=1) / N
                inner = g - s_hat * c1[:, None]
                if not IS_RMS_NORM:
                    inner -= (tl.sum(g, axis=1) / N)[:, None]
            else:
                c1 = tl.load(C1 + rows, mask=row_mask, other=0.0)
                inner = g - s_hat * c1[:, None]
                if not IS_RMS_NORM:
                    inner -= tl.load(C2 + rows, mask=row_mask, other=0.0)[:, None]
            ds = inner * rstd[:, None]
            if HAS_DSUM:
                ds += tl.load(DSUM + offs, mask=mask, other=0.0).to(tl.float32)
            if NEED_DRES:
                tl.store(DRES + offs, _round_to(ds, DRES.dtype.element_ty), mask=mask)
            if NEED_DX:
                dx = ds
                if HAS_ROWSCALE:
                    dx = dx * tl.load(ROWSCALE + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
                if HAS_DROPOUT:
                    dx = tl.where(tl.rand(seed, offs) >= dropout_p, dx * dropout_scale, 0.0)
                tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty), mask=mask)
            if NEED_DX1:
                dx1 = ds
                if HAS_DROPOUT:
                    dx1 = tl.where(tl.rand(seed, offs + stream1) >= dropout_p, dx1 * dropout_scale, 0.0)
                tl.store(DX1 + offs, _round_to(dx1, DX1.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += dy * s_hat
            if NEED_DB:
                db += dy
            if NEED_DW1:
                dw1 += dy1 * s_hat
            if NEED_DB1:
                db1 += dy1
        part = pid.to(tl.int64) * N + c
        if NEED_DW:
            tl.store(DW_PART + part, tl.sum(dw, axis=0), mask=col_mask)
        if NEED_DB:
            tl.store(DB_PART + part, tl.sum(db, axis=0), mask=col_mask)
        if NEED_DW1:
            tl.store(DW1_PART + part, tl.sum(dw1, axis=0), mask=col_mask)
        if NEED_DB1:
            tl.store(DB1_PART + part, tl.sum(db1, axis=0), mask=col_mask)
