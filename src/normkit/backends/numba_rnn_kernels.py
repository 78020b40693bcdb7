r"""numba kernels for one time step of the fused LN-LSTM / LN-GRU (float32, CPU).

Each kernel does *all* the elementwise and layer-norm work of one step for the ``bs`` active
rows (packed rows ``off .. off + bs - 1``) in one serial pass, and writes what backward needs
into preallocated ``(N, ·)`` buffers; the recurrent matrix product around it stays in torch
(MKL). :mod:`normkit.nn.rnn_fast` calls them once per step and holds the math; the plain-torch
steps there (``*_step_torch``) compute exactly the same quantities and are the fallback for
other dtypes and devices (and are compared with these kernels in the tests).

Two things make a serial kernel fast without ``fastmath``:

* ``exp`` is a branch-free Cephes-style polynomial with the ``2^n`` factor built from the
  exponent bits, so loops of sigmoids and tanhs vectorize (libm's scalar ``expf``/``tanhf``
  are 3-15 times slower). Max relative error ~6e-8 for exp; sigmoid and
  :math:`\tanh(x) = 1 - 2 / (e^{2x} + 1)` have absolute error ≲ 1.2e-7 (1 ulp of 1.0).
  Inputs are clamped to exp's finite range, so ±inf give the limits and NaN propagates.
* Row sums use eight independent accumulators: the strict left-to-right order a serial sum
  has without reassociation would be latency-bound; a fixed split keeps results deterministic.

``error_model='numpy'`` drops numba's zero-division checks, which would block vectorization.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from normkit._numba_bits import u32_as_f32

__all__ = ["lstm_fwd_step", "lstm_bwd_step", "gru_fwd_step", "gru_bwd_step", "column_dot"]

_F = np.float32
_EXP_HI, _EXP_LO = _F(88.3762626647949), _F(-87.3365478515625)
_LOG2E, _LN2_HI, _LN2_LO = _F(1.44269504088896341), _F(0.693359375), _F(-2.12194440e-4)
_P0, _P1, _P2 = _F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3)
_P3, _P4, _P5 = _F(4.1665795894e-2), _F(1.6666665459e-1), _F(5.0000001201e-1)
_HALF, _ONE, _TWO, _ZERO = _F(0.5), _F(1.0), _F(2.0), _F(0.0)

_jit = dict(cache=True, fastmath=False, error_model="numpy", nogil=True)


@njit(inline="always", **_jit)
def _exp(x):
    x = min(max(x, _EXP_LO), _EXP_HI)
    fx = math.floor(x * _LOG2E + _HALF)
    r = x - fx * _LN2_HI - fx * _LN2_LO
    y = (((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5) * (r * r) + r + _ONE
    return y * u32_as_f32((np.int32(fx) + np.int32(127)) << np.int32(23))


@njit(inline="always", **_jit)
def _sigmoid(x):
    return _ONE / (_ONE + _exp(-x))


@njit(inline="always", **_jit)
def _tanh(x):
    return _ONE - _TWO / (_exp(_TWO * x) + _ONE)


@njit(inline="always", **_jit)
def _sum(v, n):
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _ZERO
    j = 0
    while j + 8 <= n:
        s0 += v[j]
        s1 += v[j + 1]
        s2 += v[j + 2]
        s3 += v[j + 3]
        s4 += v[j + 4]
        s5 += v[j + 5]
        s6 += v[j + 6]
        s7 += v[j + 7]
        j += 8
    while j < n:
        s0 += v[j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(inline="always", **_jit)
def _dot(u, v, n):
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = _ZERO
    j = 0
    while j + 8 <= n:
        s0 += u[j] * v[j]
        s1 += u[j + 1] * v[j + 1]
        s2 += u[j + 2] * v[j + 2]
        s3 += u[j + 3] * v[j + 3]
        s4 += u[j + 4] * v[j + 4]
        s5 += u[j + 5] * v[j + 5]
        s6 += u[j + 6] * v[j + 6]
        s7 += u[j + 7] * v[j + 7]
        j += 8
    while j < n:
        s0 += u[j] * v[j]
        j += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(inline="always", **_jit)
def _normalize_inplace(v, n, eps):
    """v <- (v - mean) * rstd in place (two-pass variance); returns rstd. The mean is refined
    by the mean of the residues (corrected two-pass, Chan, Golub & LeVeque 1983, as
    :func:`normkit.reference.statistics` does), so a constant row centres to exactly 0."""
    mean = _sum(v, n) / _F(n)
    for j in range(n):
        v[j] -= mean
    residue = _sum(v, n) / _F(n)
    for j in range(n):
        v[j] -= residue
    rstd = _ONE / math.sqrt(_dot(v, v, n) / _F(n) + eps)
    for j in range(n):
        v[j] *= rstd
    return rstd


@njit(inline="always", **_jit)
def _norm_backward(g, x_hat, rstd, n, out):
    """out <- rstd * (g - mean(g) - x_hat * mean(g * x_hat)); ``out`` may alias ``g``."""
    mg = _sum(g, n) / _F(n)
    mgx = _dot(g, x_hat, n) / _F(n)
    for j in range(n):
        out[j] = rstd * (g[j] - mg - x_hat[j] * mgx)


@njit(**_jit)
def lstm_fwd_step(off, bs, xg, a, rstd_a, gates, chat, rstd_c, tc, out, hprev, cprev,
                  h_state, c_state, w_h, w_c, b_c, eps):
    H = h_state.shape[1]
    G = 4 * H
    for r in range(bs):
        row = off + r
        hprev[row, :] = h_state[r, :]
        cprev[row, :] = c_state[r, :]
        ah = a[row]
        rstd_a[row] = _normalize_inplace(ah, G, eps)
        g = gates[row]
        x = xg[row]
        for j in range(G):
            g[j] = ah[j] * w_h[j] + x[j]
        # gate blocks as views: loops indexed from 0 carry no negative-index checks and vectorize
        i_f, tg, so = g[: 2 * H], g[2 * H : 3 * H], g[3 * H :]
        for j in range(2 * H):
            i_f[j] = _sigmoid(i_f[j])
        for j in range(H):
            tg[j] = _tanh(tg[j])
        for j in range(H):
            so[j] = _sigmoid(so[j])
        si, sf = g[:H], g[H : 2 * H]
        ch = chat[row]
        c = c_state[r]
        for j in range(H):
            c[j] = sf[j] * c[j] + si[j] * tg[j]
            ch[j] = c[j]
        rstd_c[row] = _normalize_inplace(ch, H, eps)
        t = tc[row]
        h = h_state[r]
        o = out[row]
        for j in range(H):
            t[j] = _tanh(ch[j] * w_c[j] + b_c[j])
            h[j] = so[j] * t[j]
            o[j] = h[j]


@njit(**_jit)
def lstm_bwd_step(off, bs, dout, dh_state, dc_state, ahat, rstd_a, gates, chat, rstd_c, tc,
                  cprev, w_h, w_c, dxg, da, dchat, tmp):
    H = dh_state.shape[1]
    G = 4 * H
    for r in range(bs):
        row = off + r
        g = gates[row]
        si, sf, tg, so = g[:H], g[H : 2 * H], g[2 * H : 3 * H], g[3 * H :]
        dx = dxg[row]
        di, df, dg, do = dx[:H], dx[H : 2 * H], dx[2 * H : 3 * H], dx[3 * H :]
        t = tc[row]
        dch = dchat[row]
        dh_r = dh_state[r]
        dy = dout[row]
        for j in range(H):
            dh = dh_r[j] + dy[j]
            do[j] = dh * t[j] * so[j] * (_ONE - so[j])
            dch[j] = dh * so[j] * (_ONE - t[j] * t[j])
            tmp[j] = dch[j] * w_c[j]
        _norm_backward(tmp, chat[row], rstd_c[row], H, tmp)
        dc_r = dc_state[r]
        cp = cprev[row]
        for j in range(H):
            dc = dc_r[j] + tmp[j]
            di[j] = dc * tg[j] * si[j] * (_ONE - si[j])
            df[j] = dc * cp[j] * sf[j] * (_ONE - sf[j])
            dg[j] = dc * si[j] * (_ONE - tg[j] * tg[j])
            dc_r[j] = dc * sf[j]
        d = da[row]
        for j in range(G):
            d[j] = dx[j] * w_h[j]
        _norm_backward(d, ahat[row], rstd_a[row], G, d)


@njit(**_jit)
def gru_fwd_step(off, bs, xg, a, rstd_a, gates, out, hprev, h_state, w_h, b_h, eps):
    H = h_state.shape[1]
    G = 3 * H
    wn, bn = w_h[2 * H :], b_h[2 * H :]
    for r in range(bs):
        row = off + r
        hprev[row, :] = h_state[r, :]
        ah = a[row]
        rstd_a[row] = _normalize_inplace(ah, G, eps)
        g = gates[row]
        x = xg[row]
        for j in range(2 * H):
            g[j] = _sigmoid(x[j] + ah[j] * w_h[j] + b_h[j])
        rr, z, n = g[:H], g[H : 2 * H], g[2 * H :]
        xn, an = x[2 * H :], ah[2 * H :]
        h = h_state[r]
        o = out[row]
        for j in range(H):
            n[j] = _tanh(xn[j] + rr[j] * (an[j] * wn[j] + bn[j]))
            h[j] = (_ONE - z[j]) * n[j] + z[j] * h[j]
            o[j] = h[j]


@njit(**_jit)
def gru_bwd_step(off, bs, dout, dh_state, ahat, rstd_a, gates, hprev, w_h, b_h, dxg, dgh, da):
    H = dh_state.shape[1]
    G = 3 * H
    wn, bn = w_h[2 * H :], b_h[2 * H :]
    for r in range(bs):
        row = off + r
        g = gates[row]
        rr, z, n = g[:H], g[H : 2 * H], g[2 * H :]
        an = ahat[row][2 * H :]
        dx = dxg[row]
        dxr, dxz, dxn = dx[:H], dx[H : 2 * H], dx[2 * H :]
        dg = dgh[row]
        dgr, dgz, dgn = dg[:H], dg[H : 2 * H], dg[2 * H :]
        dh_r = dh_state[r]
        dy = dout[row]
        hp = hprev[row]
        for j in range(H):
            dh = dh_r[j] + dy[j]
            dnp = dh * (_ONE - z[j]) * (_ONE - n[j] * n[j])
            dz = dh * (hp[j] - n[j]) * z[j] * (_ONE - z[j])
            dr = dnp * (an[j] * wn[j] + bn[j]) * rr[j] * (_ONE - rr[j])
            dh_r[j] = dh * z[j]
            dxr[j] = dr
            dxz[j] = dz
            dxn[j] = dnp
            dgr[j] = dr
            dgz[j] = dz
            dgn[j] = dnp * rr[j]
        d = da[row]
        for j in range(G):
            d[j] = dg[j] * w_h[j]
        _norm_backward(d, ahat[row], rstd_a[row], G, d)


@njit(**_jit)
def column_dot(u, v, out):
    """``out[j] = sum_i u[i, j] * v[i, j]`` (``v`` may be ``u``-shaped ones for a column sum),
    accumulated in float64 and rounded once: the gain/bias gradients over all ``N`` packed rows,
    in one pass and without the ``(N, G)`` temporary of ``(u * v).sum(0)``."""
    n, g = u.shape
    acc = np.zeros(g, dtype=np.float64)
    for i in range(n):
        ui, vi = u[i], v[i]
        for j in range(g):
            acc[j] += ui[j] * vi[j]
    for j in range(g):
        out[j] = acc[j]


@njit(**_jit)
def column_sum(u, out):
    """``out[j] = sum_i u[i, j]``, accumulated in float64."""
    n, g = u.shape
    acc = np.zeros(g, dtype=np.float64)
    for i in range(n):
        ui = u[i]
        for j in range(g):
            acc[j] += ui[j]
    for j in range(g):
        out[j] = acc[j]
